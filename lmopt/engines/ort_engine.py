"""ONNX Runtime over the exported graph with KV cache (CPU EP; CUDA EP with IO binding when onnxruntime-gpu is
installed, so the KV cache stays on the GPU between steps)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..nvtx_ranges import nvtx_range
from .base import Engine, EngineInfo, cuda_device_id

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bfloat16)": np.float32}


def make_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 optimized_model_path: str | None = None, extra_config: dict[str, str] | None = None,
                 disable_optimizers: list[str] | None = None, cuda_options: dict[str, str] | None = None):
    """An InferenceSession with a clear error for a missing or corrupt file; `cuda_options` go to the CUDA EP."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing ONNX model {path} — run: make export")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    for k, v in (extra_config or {}).items():
        so.add_session_config_entry(k, v)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("ONNX Runtime has no CUDA execution provider — pip install onnxruntime-gpu (CUDA 13 build)")
        providers = [("CUDAExecutionProvider", {"device_id": cuda_device_id(device), **(cuda_options or {})}), "CPUExecutionProvider"]
    try:
        kw = {"disabled_optimizers": disable_optimizers} if disable_optimizers else {}
        return ort.InferenceSession(str(path), so, providers=providers, **kw)
    except Exception as e:  # onnxruntime raises its own exception types for protobuf/graph errors
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "INVALID_PROTOBUF" in msg or "Protobuf parsing failed" in msg or "corrupt" in msg.lower() \
                or "external data" in msg.lower():
            raise UserError(f"{path} is not a valid ONNX model ({msg}) — delete it and rebuild it (make export)") \
                from None
        raise


class OrtEngine(Engine):
    def __init__(self, onnx_path: str | os.PathLike, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, variant: str = "fp32", max_positions: int = 2048,
                 session_kwargs: dict | None = None):
        self.session = make_session(onnx_path, device, threads, **(session_kwargs or {}))
        self.device = device
        self.device_id = cuda_device_id(device)  # the GPU of an instance placed on "cuda:N"
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")), key=_layer_key)
        if not self.past_names or "input_ids" not in ins:
            raise UserError(f"{onnx_path} has no KV-cache inputs — export it with convert/export_onnx.py")
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = "position_ids" in ins
        p0 = ins[self.past_names[0]]
        self.kv_heads, self.head_dim = int(p0.shape[1]), int(p0.shape[3])
        self.kv_dtype = _ORT_TO_NP.get(p0.type, np.float32)
        vocab = self.session.get_outputs()[0].shape[-1]
        self.info = EngineInfo("ort", precision, device, variant, str(onnx_path), max_positions,
                               int(vocab) if isinstance(vocab, int) else -1)
        self.onnx_path = Path(onnx_path)

    # --- CPU path: numpy in, numpy out -------------------------------------------------------------
    def _feeds(self, input_ids, attention_mask, position_ids):
        f = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            f["position_ids"] = position_ids
        return f

    def _run_cpu(self, feeds: dict, past: list[np.ndarray]):
        feeds.update(zip(self.past_names, past))
        outs = self.session.run(None, feeds)
        with nvtx_range("d2h"):
            logits = np.ascontiguousarray(outs[0][:, -1, :], dtype=np.float32)
        return logits, outs[1:]

    # --- CUDA path: IO binding, KV cache as device OrtValues ----------------------------------------
    def _run_cuda(self, feeds: dict, past: list):

        io = self.session.io_binding()
        with nvtx_range("h2d"):
            for k, v in feeds.items():
                io.bind_cpu_input(k, v)
        for name, val in zip(self.past_names, past):
            io.bind_ortvalue_input(name, val)
        io.bind_output("logits", "cuda", self.device_id)
        for name in self.present_names:
            io.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        with nvtx_range("d2h"):
            logits = outs[0].numpy()[:, -1, :].astype(np.float32)
        return logits, outs[1:]

    def prefill(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, Any]:
        b = input_ids.shape[0]
        empty = np.zeros((b, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        feeds = self._feeds(input_ids, attention_mask, position_ids)
        if self.device.startswith("cuda"):
            import onnxruntime as ort

            past = [ort.OrtValue.ortvalue_from_numpy(empty, "cuda", self.device_id) for _ in self.past_names]
            return self._run_cuda(feeds, past)
        return self._run_cpu(feeds, [empty] * len(self.past_names))

    def decode(self, state, input_ids, attention_mask, position_ids):
        feeds = self._feeds(input_ids, attention_mask, position_ids)
        if self.device.startswith("cuda"):
            return self._run_cuda(feeds, state)
        return self._run_cpu(feeds, state)

    def weight_bytes(self) -> int:
        return onnx_weight_bytes(self.onnx_path)

    def release(self, state) -> None:
        # drop the references so device OrtValues go back to the arena before the next generation
        if isinstance(state, list):
            state.clear()

    def close(self) -> None:
        del self.session


def onnx_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of weights one decode step reads from a graph: every initializer once, except tables read only by Gather
    nodes (input and position embeddings: a step reads just its rows of them). A tied embedding stored twice (once
    for the Gather, once for the LM head MatMul) counts once, as the MatMul's copy."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    users: dict[str, set] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    total = 0
    for t in g.initializer:
        if users.get(t.name) == {"Gather"}:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    return total


def _layer_key(name: str):
    m = re.match(r"past_key_values\.(\d+)\.(key|value)", name)
    return (int(m.group(1)), m.group(2)) if m else (1 << 30, name)
