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

On top of it, the one output path of every way this project generates (lmopt.generate.generate_text offline, the
scheduler's requests, the Triton model in both batching modes, the OpenAI gateway): `TextStream` turns token ids into
the text to send, matches stop strings on that text (the earliest match wins; text that could still become a stop
string is held back until the next tokens rule it out; the text ends before the stop string), and decides the finish
reason (`finish_reason`). Nothing else in the repository matches stop strings or derives a finish reason.

    ts = TextStream(tokenizer, prompt_ids, stop_strings=("\n\n",))
    for tok in generated:
        send(ts.add(tok))             # "" while held back
        if ts.stopped:                # a stop string ended the text: stop generating
            break
    send(ts.finish())                 # text held back at the end (nothing after a stop string)
    reason = ts.finish_reason("length")   # "stop" when a stop string ended it, else the engine's own reason
"""
from __future__ import annotations

from typing import Sequence

# why a request ended, the vocabulary of every layer (OpenAI's finish_reason takes the first two)
FINISH_REASONS = ("stop", "length", "cancelled", "error")

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


def check_stop_strings(text: str, new_from: int, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, searching only where one could newly appear (from len(s)-1
    characters before `new_from`, the start of the text not yet checked); None when none does."""
    cut = None
    for s in stops:
        if s:
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0 and (cut is None or i < cut):
                cut = i
    return cut


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class TextStream:
    """Token ids in, text out, for one request: incremental detokenization, then stop strings (see the module
    docstring). `text` is everything handed out so far; `tokens` the ids accepted (none after a stop string's
    end); `stopped` whether a stop string ended the text. Without a tokenizer: token ids only (no text, no stop
    strings)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self.stops = tuple(s for s in stop_strings if s)
        if self.stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens) if tokenizer is not None \
            else None
        self.full = ""            # all decoded text, stop string included
        self.text = ""            # text handed out (never past a stop string)
        self.tokens: list[int] = []
        self.stopped = False

    def _push(self, piece: str) -> str:
        checked = len(self.full)
        self.full += piece
        end = len(self.full)
        if self.stops:
            cut = check_stop_strings(self.full, checked, self.stops)
            if cut is not None:
                end, self.stopped = cut, True
            else:
                end -= held_back(self.full, self.stops)
        out = self.full[len(self.text):end] if end > len(self.text) else ""
        self.text += out
        return out

    def add(self, token_id: int) -> str:
        """Accept one generated token (ignored once stopped); the text it lets out now ("" while held back)."""
        if self.stopped:
            return ""
        self.tokens.append(int(token_id))
        return self._push(self.detok.add(token_id)) if self.detok is not None else ""

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """The end of the request: text still held back (an incomplete character, a possible stop-string start),
        unless a stop string ended the text."""
        if self.stopped or self.detok is None:
            return ""
        out = self._push(self.detok.flush())
        if not self.stopped:
            out += self.full[len(self.text):]
            self.text = self.full
        return out

    def finish_reason(self, engine_reason: str) -> str:
        """The request's finish reason: "stop" when a stop string ended its text, else what ended it in the engine
        (stop token: "stop", max tokens: "length", "cancelled", "error")."""
        if engine_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {engine_reason!r}")
        return "stop" if self.stopped and engine_reason in ("stop", "length", "cancelled") else engine_reason
