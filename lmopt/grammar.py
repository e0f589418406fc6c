"""Grammar-constrained decoding: a JSON schema becomes a token mask at every step (llguidance; why that library:
docs/structured_output.md).

    spec = json_schema_spec({"type": "object", ...})      # or json_object_spec(); the text travels with the request
    check_spec(spec)                                      # UserError with one line naming the problem (gateway: 400)
    g = Grammars.for_tokenizer(tokenizer, vocab_size=engine.info.vocab_size)   # one per tokenizer and logits width
    m = g.matcher(spec)                                   # per request; compiled grammars are cached by spec text
    mask = g.new_bitmask(rows)                            # int32 [rows, ceil(vocab / 32)], bit t = token t allowed
    g.fill(mask, [(m, 0)])                                # the next token's mask (several matchers in parallel)
    m.accept(token); m.done                               # done: the grammar is complete (the request stops: "stop")

A spec is JSON text: {"type": "json_object"} (any JSON object) or {"type": "json_schema", "schema": {...}} (the
output must validate against the schema). JSON is generated compact — no whitespace between tokens (llguidance's
`whitespace_flexible: false`): a model cannot spend its tokens on blank space, so a small model's output ends inside
a modest max_tokens, and the text is what `json.dumps(..., separators=(",", ":"))` would write. Once the grammar is
complete only the end-of-sequence token is allowed; the scheduler ends the request there with finish reason "stop",
without the extra step an end-of-sequence token would take.

Mask layout (llguidance's and xgrammar's): bit t % 32 of int32 word t // 32 of a row says whether token t may come
next. Token ids the tokenizer does not have (a logits row wider than the vocabulary, as the random presets have) are
never allowed. The mask is applied to the logits on the engine's device (lmopt.engines.slots.StepLogits.apply_mask).
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Sequence

import numpy as np

from .errors import UserError

# JSON generated without whitespace between tokens (see the module docstring)
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 256              # compiled grammars kept per tokenizer (a grammar is a few KB of text)


def json_object_spec() -> str:
    return json.dumps({"type": "json_object"})


def json_schema_spec(schema: dict) -> str:
    return json.dumps({"type": "json_schema", "schema": schema}, separators=(",", ":"))   # properties keep their order


def _schema_of(spec: str) -> dict:
    try:
        d = json.loads(spec)
    except (TypeError, json.JSONDecodeError) as e:
        raise UserError(f"the grammar is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("type") not in ("json_object", "json_schema"):
        raise UserError('a grammar is {"type": "json_object"} or {"type": "json_schema", "schema": {...}}')
    if d["type"] == "json_object":
        return {"type": "object"}
    schema = d.get("schema")
    if not isinstance(schema, dict):
        raise UserError("the JSON schema must be an object")
    return schema


def _grammar_text(spec: str) -> str:
    """llguidance's grammar for a spec, checked (UserError naming the first problem, on one line)."""
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance — pip install -r requirements.txt") from None

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_schema_of(spec), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise UserError(f"invalid JSON schema: {_one_line(str(e))}") from None
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise UserError(f"invalid JSON schema: {_one_line(err)}")
    return grammar


_checked: collections.OrderedDict[str, str] = collections.OrderedDict()
_checked_lock = threading.Lock()


def _cached_grammar(spec: str) -> str:
    with _checked_lock:
        g = _checked.get(spec)
        if g is not None:
            _checked.move_to_end(spec)
            return g
    g = _grammar_text(spec)
    with _checked_lock:
        _checked[spec] = g
        while len(_checked) > CACHE_SIZE:
            _checked.popitem(last=False)
    return g


def check_spec(spec: str) -> None:
    """Raise UserError (one line) when `spec` is not a grammar this module can compile; cached, so the compile that
    follows for the same spec costs nothing more."""
    _cached_grammar(spec)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())[:300]


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def accept(self, token: int) -> bool:
        """Advance by the token chosen from this step's mask; False if the grammar refused it (a bug: the mask
        allowed it)."""
        return self.m.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return self.m.is_stopped()

    @property
    def error(self) -> str:
        return self.m.get_error()


class Grammars:
    """The grammar engine for one tokenizer and logits width: its view of the vocabulary (built once: ~1 s for a
    128k vocabulary), compiled grammars cached by spec text, and a thread pool that fills several masks at once."""

    _by_tokenizer: dict = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int | None = None):
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise UserError("structured output needs llguidance — pip install -r requirements.txt") from None
        if tokenizer.eos_token_id is None:
            raise UserError("structured output needs a tokenizer with an end-of-sequence token")
        n = max(int(vocab_size or 0), len(tokenizer))
        self.vocab_size = n
        self.words = (n + 31) // 32
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n)
        self._executor = llguidance.LLExecutor()
        self._llg = llguidance

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> "Grammars":
        key = (id(tokenizer), int(vocab_size or 0))
        with cls._lock:
            g = cls._by_tokenizer.get(key)
            if g is None:
                g = cls._by_tokenizer[key] = cls(tokenizer, vocab_size)
        return g

    def matcher(self, spec: str) -> Matcher:
        """A new matcher at the start of the spec's grammar; UserError for a spec that does not compile."""
        m = self._llg.LLMatcher(self._tok, _cached_grammar(spec), log_level=0)
        if m.is_error():
            raise UserError(f"invalid JSON schema: {_one_line(m.get_error())}")
        return Matcher(m)

    def new_bitmask(self, rows: int) -> np.ndarray:
        return np.zeros((rows, self.words), dtype=np.int32)

    def fill(self, bitmask: np.ndarray, items: Sequence[tuple[Matcher, int]]) -> None:
        """Each matcher's next-token mask into row `index` of `bitmask` (C-contiguous int32 [rows, words]); the
        masks are computed in parallel, with the interpreter lock released."""
        if not items:
            return
        if bitmask.dtype != np.int32 or not bitmask.flags["C_CONTIGUOUS"] or bitmask.shape[1] != self.words:
            raise ValueError(f"the bitmask must be C-contiguous int32 [rows, {self.words}]")
        if len(items) == 1:
            m, i = items[0]
            row = bitmask[i]
            m.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            return
        self._executor.unsafe_compute_mask_ptr([(m.m, int(i)) for m, i in items], bitmask.ctypes.data,
                                               self.words * 4, bitmask.shape[0])


def allowed_tokens(row: np.ndarray) -> np.ndarray:
    """The token ids a bitmask row allows (for tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little")
    return np.nonzero(bits)[0]


def expand_bitmask(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """bool [rows, vocab]: True where the bitmask allows the token (the host form of the device kernel)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab].astype(bool)
