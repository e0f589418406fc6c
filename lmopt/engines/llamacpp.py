"""llama.cpp (through llama-cpp-python, installed by `make llamacpp`) behind the Engine interface: the GGUF files of
convert/export_gguf.py, F32 / Q8_0 / Q4_0 for our fp32 / int8 / int4.

The same calls llama.cpp's own generation makes, timed by our loop like every engine: prefill = clear the KV cache
and decode the prompt in one batch, decode = one token; the logits of the last position are copied to the host
(float32 [1, V]), and sampling happens in lmopt.generate. Batch 1 only (one sequence); a larger batch raises a
ValueError that the benchmark records as a failed cell."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..llamacpp import gguf_tensors, gguf_weight_bytes, import_llama_cpp
from .base import Engine, EngineInfo


class LlamaCppEngine(Engine):
    def __init__(self, gguf_path: str | os.PathLike, precision: str, threads: int | None = None,
                 variant: str = "", max_positions: int = 2048, n_ctx: int | None = None, n_batch: int = 512):
        ll = import_llama_cpp()
        self.path = Path(gguf_path)
        threads = threads or len(os.sched_getaffinity(0))
        self.llm = ll.Llama(model_path=str(self.path), n_ctx=n_ctx or max_positions, n_batch=n_batch,
                            n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads, logits_all=False,
                            verbose=False)
        self._ll = ll
        self.n_vocab = self.llm.n_vocab()
        self.threads = threads
        self.info = EngineInfo("llamacpp", precision, "cpu", variant or self.path.parent.name, str(self.path),
                               min(max_positions, self.llm.n_ctx()), self.n_vocab)

    def _logits(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)[None, :]

    @staticmethod
    def _one_row(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[int]:
        if input_ids.shape[0] != 1:
            raise ValueError(f"engine llamacpp runs batch 1 only (got batch {input_ids.shape[0]})")
        return [int(t) for t, m in zip(input_ids[0], attention_mask[0, -input_ids.shape[1]:]) if m]

    def prefill(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, Any]:
        toks = self._one_row(input_ids, attention_mask)
        self.llm.reset()  # n_tokens = 0: eval() drops the cached positions from there on
        self.llm.eval(toks)
        return self._logits(), self.llm.n_tokens

    def decode(self, state, input_ids, attention_mask, position_ids):
        if state != self.llm.n_tokens:
            raise RuntimeError("engine llamacpp holds one sequence: decode continues the latest prefill only")
        self.llm.eval(self._one_row(input_ids, attention_mask))
        return self._logits(), self.llm.n_tokens

    def weight_bytes(self) -> int:
        return gguf_weight_bytes(gguf_tensors(self.path))

    def close(self) -> None:
        self.llm.close()
