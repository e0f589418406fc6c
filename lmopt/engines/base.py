"""The engine interface every backend implements: prefill, decode step with KV cache, release.

Inputs are host numpy arrays (int64): input_ids [B, S], attention_mask [B, past+S], position_ids [B, S].
Outputs are the last position's logits as host float32 [B, V] (or, from an engine that keeps them on its device,
a lmopt.engines.slots.StepLogits: np.asarray converts it, argmax runs on the device) plus an opaque state holding
the KV cache (kept on the engine's device between steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def cuda_device_id(device: str) -> int:
    """The GPU index of a device string: "cuda:1" -> 1, "cuda" -> 0 (the first visible GPU)."""
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


@dataclass
class EngineInfo:
    engine: str          # torch | ort | trt
    precision: str       # fp32 | fp16 | int8
    device: str          # cpu | cuda
    variant: str         # artifact variant it came from (or "hf")
    source: str          # file or folder it was loaded from
    max_positions: int
    vocab_size: int


class Engine:
    info: EngineInfo

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def decode(self, state: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def release(self, state: Any) -> None:
        """Free the KV cache of one generation (device buffers go back to the pool)."""

    def close(self) -> None:
        """Free the engine itself."""

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (0 = unknown); used for the memory-bandwidth floor."""
        return 0

    def synchronize(self) -> None:
        """Wait for queued device work (timers call this)."""
