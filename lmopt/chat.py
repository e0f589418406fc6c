"""Chat messages to prompt token ids: the tokenizer's own chat template, or a simple one for models without one.

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "What is a list?"}])

The built-in model (and any tokenizer without `chat_template`) gets SIMPLE_CHAT_TEMPLATE: one line per message,
`Role: content`, then `Assistant:` for the model to continue. For the messages above that is

    User: What is a list?
    Assistant:

The built-in model was not trained on conversations; the template only makes chat requests well defined.
The rendered text is tokenized without adding special tokens: templates that want a BOS token write it themselves.
"""
from __future__ import annotations

from typing import Sequence

from .models import encode

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or SIMPLE_CHAT_TEMPLATE


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list into the prompt (the built-in one does not)."""
    return "tools" in chat_template(tokenizer)


def render_chat(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
    """The prompt text for `messages` (each {"role", "content": str}), ending where the assistant's reply starts;
    `tools` (OpenAI's list) are rendered where the template supports them."""
    kw = {"tools": list(tools)} if tools and template_supports_tools(tokenizer) else {}
    return tokenizer.apply_chat_template(list(messages), chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=True, **kw)


def chat_prompt_ids(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    return encode(tokenizer, render_chat(tokenizer, messages, tools), add_special_tokens=False)
