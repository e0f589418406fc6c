"""PyTorch eager on the Hugging Face model: the baseline every other engine is measured against."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..models import load_model, model_shape
from ..nvtx_ranges import nvtx_range
from .base import Engine, EngineInfo


class TorchEngine(Engine):
    extra: dict = {}  # extra forward kwargs; class default keeps engines built with __new__ (export validation) working
    def __init__(self, model: str, precision: str = "fp32", device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
        self.torch = torch
        self.device = device
        self.model = load_model(model, dtype=dtype, device=device)
        shape = model_shape(self.model.config)
        self.info = EngineInfo("torch", precision, device, "hf", model, shape["max_positions"], shape["vocab_size"])
        # only the last position's logits are used: skip the LM head elsewhere, as HF generate() does
        # (matters for TTFT with a large vocabulary); older/other architectures lack the argument
        import inspect

        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters \
            else {}

    def _run(self, input_ids, attention_mask, position_ids, past):
        t = self.torch
        with t.inference_mode():
            with nvtx_range("h2d"):
                ids = t.from_numpy(input_ids).to(self.device)
                mask = t.from_numpy(attention_mask).to(self.device)
                pos = t.from_numpy(position_ids).to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                             use_cache=True, **self.extra)
            with nvtx_range("d2h"):
                logits = out.logits[:, -1, :].float().cpu().numpy()
        return logits, out.past_key_values

    def prefill(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, Any]:
        # past_key_values=None + use_cache lets the model build its own cache: the same call works on
        # transformers 4.57 (CPU CI) and 5.x (the GPU machines), whose DynamicCache constructors differ
        return self._run(input_ids, attention_mask, position_ids, None)

    def decode(self, state, input_ids, attention_mask, position_ids):
        return self._run(input_ids, attention_mask, position_ids, state)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def weight_bytes(self) -> int:
        """Bytes of weights read per decode step (the bandwidth floor's numerator; see lmopt.results)."""
        from lmopt.results import torch_weight_bytes

        return torch_weight_bytes(self.model)

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()
