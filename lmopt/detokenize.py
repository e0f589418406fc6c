"""Incremental detokenization: the text of each new token, without decoding the whole output again.

A token's text depends on its neighbours (byte-level BPE splits a UTF-8 character over several tokens; SentencePiece
drops or adds a leading space depending on what precedes it). So the text of a new token is taken as the difference
between decoding a short window ending with it and the same window without it — the prefix-offset method of Hugging
Face's text-generation-inference and vLLM. Text whose last character is incomplete ("\ufffd") is held back until
the next token completes it. Each step decodes a window of a few tokens: linear in the output length, not quadratic.

    d = IncrementalDetokenizer(tokenizer, prompt_ids)
    for tok in generated:
        piece = d.add(tok)          # "" while a character is incomplete
    tail = d.flush()                # whatever is still held back at the end
"""
from __future__ import annotations

from typing import Sequence

# tokens of context kept before the new ones; enough for any merge rule of the tokenizers we load
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = [int(t) for t in list(prompt_ids)[-_CONTEXT:]]
        self.prefix = 0               # window start: context for the tokens not yet emitted
        self.read = len(self.ids)     # first token whose text has not been emitted
        self.text = ""                # everything emitted so far
        # a fast tokenizer's own decode is its Rust tokenizer's (clean-up off): call that directly, without
        # transformers' per-call conversions, twice per token
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend_decode = backend.decode if backend is not None else None

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip)
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _emit(self, force: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not force):
            return ""
        piece = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 4 * _CONTEXT:  # keep the window short
            self.ids, self.read, self.prefix = self.ids[self.prefix:], self.read - self.prefix, 0
        self.text += piece
        return piece

    def add(self, token_id: int) -> str:
        """Text that token_id completes ("" while a multi-byte character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._emit(force=False)

    def flush(self) -> str:
        """Text held back (an incomplete character at the very end), emitted as is."""
        return self._emit(force=True) if self.read < len(self.ids) else ""
