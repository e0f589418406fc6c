"""Which grammar engine constrains decoding here: xgrammar, llguidance and outlines-core, measured side by side on the
CPU (what they cost on the host is what matters: the mask is computed on the host while the device runs a step).

    python profile/grammar_choice.py --out results/cpu-amd-epyc-2c/structured/grammar-choice.json
    python profile/grammar_choice.py --big-vocab ""          # the built-in tokenizer only

For each library that imports (each is optional: pip install xgrammar / llguidance / outlines-core), on each
tokenizer — the built-in one (4,096 tokens) and a 128,256-token byte-level BPE (Llama 3's vocabulary size) trained
here on Python source files, since no Llama 3 tokenizer is available offline — it measures:
  tokenizer_s  preparing the library's view of the vocabulary (once per process)
  compile_ms   a nested JSON schema (objects in objects, an enum, an array of objects, required fields) to a grammar,
               cold (no cache), and the first mask after it (llguidance builds its lexer lazily: its first mask is
               part of what a request pays before its first token)
  mask_ms      the next-token bitmask at each step of a valid document (the tokens of a JSON document that satisfies
               the schema), and accept_ms, advancing the matcher by that token; each step also checks that the
               document's token is allowed by the mask (a library that refuses a valid token fails the check)

Reads:  the built-in tokenizer; --big-vocab's tokenizer.json (trained into that path on the first run, ~1 min)
Writes: --out (a result JSON, kind "grammar_choice")
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import glob
import json
import sys
import time
from dataclasses import asdict, dataclass

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("grammar-choice")

# objects in objects, an enum, an array of objects, required fields: what structured-output requests look like
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                   "zip": {"type": "string"}},
                    "required": ["street", "city"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}},
        "orders": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "integer"}, "total": {"type": "number"},
                                             "paid": {"type": "boolean"}},
            "required": ["id", "total", "paid"], "additionalProperties": False}},
    },
    "required": ["name", "age", "role", "address", "tags", "orders"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "role": "admin",
            "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
            "tags": ["math", "engines", "poetry"],
            "orders": [{"id": 1, "total": 12.5, "paid": True}, {"id": 2, "total": 7.25, "paid": False},
                       {"id": 3, "total": 100.0, "paid": True}]}


@dataclass
class ChoiceSettings:
    big_vocab: str = "artifacts/grammar-choice/bpe-128k/tokenizer.json"  # the 128k tokenizer ("" = skip)
    libraries: str = "llguidance,xgrammar,outlines-core"  # comma-separated; those that do not import are skipped
    repeats: int = 5               # cold compiles per library and tokenizer (the median is reported)
    passes: int = 3                # walks over the document's tokens per library and tokenizer (masks timed)
    out: str = ""                  # result JSON (default: artifacts/grammar-choice/result.json)


def train_big_vocab(path: str, vocab: int = 128256) -> None:
    """A byte-level BPE of `vocab` tokens trained on the Python source files at hand (Llama 3's vocabulary size; its
    tokens are not Llama 3's, but the mask's cost depends on the count and the byte structure of the tokens)."""
    import os
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    files = sorted(f for r in roots for f in glob.glob(f"{r}/**/*.py", recursive=True))

    def texts(limit=200e6):
        n = 0
        for f in files:
            try:
                t = open(f, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            n += len(t)
            yield t
            if n > limit:
                return

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    if tok.get_vocab_size() < vocab:
        raise UserError(f"only {tok.get_vocab_size()} tokens could be trained from {len(files)} files — pass "
                        "--big-vocab ''")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(folder)
    log.info("trained a %d-token byte-level BPE in %.0f s -> %s", vocab, time.perf_counter() - t0, folder)


# ---- one adapter per library: prepare(tokenizer), compile(schema) -> matcher factory, step functions ----------------
class _LLGuidance:
    name, package = "llguidance", "llguidance"

    def prepare(self, tok):
        import llguidance.hf

        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        self.n = self.tok.vocab_size

    def compile(self, schema: str):
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def mask(self, m, buf):
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def accept(self, m, t):
        return m.consume_token(t)


class _XGrammar:
    name, package = "xgrammar", "xgrammar"

    def prepare(self, tok):
        import xgrammar

        self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.n = len(tok)

    def compile(self, schema: str):
        import xgrammar

        c = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return xgrammar.GrammarMatcher(c.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))

    def mask(self, m, buf):
        import torch

        m.fill_next_token_bitmask(torch.from_numpy(buf.reshape(1, -1)))

    def accept(self, m, t):
        return m.accept_token(t)


class _OutlinesCore:
    name, package = "outlines-core", "outlines_core"

    def prepare(self, tok):
        from outlines_core import Vocabulary
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

        back = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tok.all_special_ids)
        vocab: dict[bytes, list[int]] = {}
        for s, i in tok.get_vocab().items():  # byte-level BPE: each character of a token stands for one byte
            if i not in special:
                vocab.setdefault(bytes(back[c] for c in s), []).append(i)
        self.vocab = Vocabulary(tok.eos_token_id, vocab)
        self.n = len(tok)

    def compile(self, schema: str):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        return Guide(Index(build_regex_from_schema(schema, whitespace_pattern=""), self.vocab))

    def mask(self, m, buf):
        m.write_mask_into(buf.ctypes.data, buf.size, buf.itemsize)

    def accept(self, m, t):
        m.advance(t)
        return True


ADAPTERS = {"llguidance": _LLGuidance, "xgrammar": _XGrammar, "outlines-core": _OutlinesCore}


def _measure(lib, tok, s: ChoiceSettings) -> dict:
    import numpy as np

    from lmopt.results import stats

    t0 = time.perf_counter()
    lib.prepare(tok)
    tokenizer_s = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    doc_ids = tok(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)["input_ids"]
    buf = np.zeros((lib.n + 31) // 32, dtype=np.int32)
    compile_s, first_mask_s = [], []
    for _ in range(s.repeats):
        t0 = time.perf_counter()
        m = lib.compile(schema)
        t1 = time.perf_counter()
        lib.mask(m, buf)
        compile_s.append(t1 - t0)
        first_mask_s.append(time.perf_counter() - t1)
    mask_s, accept_s, refused = [], [], 0
    for _ in range(s.passes):
        m = lib.compile(schema)
        for t in doc_ids:
            t0 = time.perf_counter()
            lib.mask(m, buf)
            t1 = time.perf_counter()
            allowed = bool((int(buf[t // 32]) >> (t % 32)) & 1)
            ok = lib.accept(m, t) if allowed else False
            t2 = time.perf_counter()
            mask_s.append(t1 - t0)
            accept_s.append(t2 - t1)
            if not (allowed and ok):
                refused += 1
                break
    return {"library": lib.name, "vocab": lib.n, "tokenizer_s": round(tokenizer_s, 3),
            "compile_ms": stats(compile_s, 1e3), "first_mask_ms": stats(first_mask_s, 1e3),
            "mask_ms": stats(mask_s, 1e3), "accept_ms": stats(accept_s, 1e3), "document_tokens": len(doc_ids),
            "valid_document_refused": refused}


def choose(*, settings: ChoiceSettings) -> dict:
    import importlib.util
    import os

    from lmopt.models import load_tokenizer
    from lmopt.results import envelope, versions, write_json

    s = settings
    names = [n.strip() for n in s.libraries.split(",") if n.strip()]
    for n in names:
        if n not in ADAPTERS:
            raise UserError(f"unknown library {n!r} — pick from {', '.join(ADAPTERS)}")
    libs = [ADAPTERS[n]() for n in names if importlib.util.find_spec(ADAPTERS[n].package) is not None]
    if not libs:
        raise UserError(f"none of {', '.join(names)} is installed — pip install llguidance (or xgrammar, "
                        "outlines-core)")
    toks = {"builtin-4k": load_tokenizer("tiny")}
    if s.big_vocab:
        if not os.path.exists(s.big_vocab):
            train_big_vocab(s.big_vocab)
        from transformers import PreTrainedTokenizerFast

        toks["bpe-128k"] = PreTrainedTokenizerFast.from_pretrained(os.path.dirname(s.big_vocab))
    rows = []
    for tname, tok in toks.items():
        for lib in libs:
            log.info("%s on %s (%d tokens)", lib.name, tname, len(tok))
            r = dict(tokenizer=tname, **_measure(type(lib)(), tok, s))
            log.info("  compile p50 %.2f ms + first mask %.2f ms, mask p50 %.3f ms p99 %.3f ms, accept p50 %.3f ms%s",
                     r["compile_ms"]["p50"], r["first_mask_ms"]["p50"], r["mask_ms"]["p50"], r["mask_ms"]["p99"],
                     r["accept_ms"]["p50"], "  REFUSED A VALID TOKEN" if r["valid_document_refused"] else "")
            rows.append(r)
    doc = envelope("grammar_choice", settings=asdict(s), schema_under_test=SCHEMA,
                   versions=versions("llguidance", "xgrammar", "outlines-core", "tokenizers", "torch"),
                   summary=[{k: (r[k]["p50"] if isinstance(r[k], dict) else r[k])
                             for k in ("tokenizer", "library", "vocab", "tokenizer_s", "compile_ms", "first_mask_ms",
                                       "mask_ms", "accept_ms", "valid_document_refused")} for r in rows],
                   samples=rows)
    out = s.out or "artifacts/grammar-choice/result.json"
    write_json(out, doc)
    log.info("Saving the result to %s", out)
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, ChoiceSettings)
    return p


main = cli.main_for(build_parser, ChoiceSettings, choose)

if __name__ == "__main__":
    cli.run(main)
