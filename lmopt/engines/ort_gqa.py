"""ONNX Runtime on the fused GroupQueryAttention graph (lmopt/onnx_gqa.py) with a fixed-size KV buffer and IO binding.

    create_engine("ort-gqa", "llama-1b", precision="fp16", device="cuda")   # after export_onnx.py --attention gqa

The KV buffers ([batch, kv_heads, max_len, head_dim] per layer) are allocated once per batch size and bound as both
the past inputs and the present outputs, so GroupQueryAttention writes each step's keys/values in place and no
tensor changes address or shape between decode steps. That is what ONNX Runtime's CUDA graphs require: with
`cuda_graph=True` (CUDA EP) the decode step's inputs live in device buffers updated in place, and the step is
captured once per batch size (`gpu_graph_id`) and replayed; prefill runs uncaptured (`gpu_graph_id` -1).

The caller's left-padded batch (lmopt.generate) is re-packed right-padded, GQA's convention: each row's length is
its own (`seqlens_k`), so the rows of one decode step may sit at different positions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..nvtx_ranges import nvtx_range
from .base import Engine, EngineInfo, cuda_device_id
from .ort_engine import _ORT_TO_NP, _layer_key, make_session, onnx_weight_bytes


@dataclass
class _Buffers:
    kv: list                 # OrtValues, one per past_key_values.N.{key,value}, [batch, kv_heads, max_len, head_dim]
    step: dict | None = None  # device OrtValues of the decode step's inputs (CUDA graph mode)
    logits: Any = None        # the decode step's logits OrtValue [batch, 1, vocab] (CUDA graph mode)
    graph_id: int = 0
    captured: bool = False
    busy: bool = False
    io: Any = None            # the IO binding with the KV buffers bound, kept across steps (no CUDA graph)


@dataclass
class _State:
    batch: int
    lens: np.ndarray         # tokens in each row's cache


class OrtGqaEngine(Engine):
    def __init__(self, onnx_path: str | os.PathLike, precision: str = "fp16", device: str = "cpu",
                 threads: int | None = None, variant: str = "fp16-gqa", max_len: int = 2048,
                 max_positions: int = 2048, cuda_graph: bool = True):
        import onnxruntime as ort

        self.ort, self.device = ort, ("cuda" if device.startswith("cuda") else "cpu")
        self.device_id = cuda_device_id(device)  # the GPU of an instance placed on "cuda:N"
        self.cuda_graph = cuda_graph and self.device == "cuda"
        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"missing ONNX model {path} — run: python convert/export_onnx.py --attention gqa")
        if self.device == "cuda" and precision != "fp16":
            raise UserError(f"GroupQueryAttention runs FP16 on ONNX Runtime's CUDA EP (got {precision}) — export "
                            "with --dtype fp16 --attention gqa")
        self.session = make_session(path, device if self.device == "cuda" else "cpu", threads,
                                    cuda_options={"enable_cuda_graph": "1" if self.cuda_graph else "0"})
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")), key=_layer_key)
        if "seqlens_k" not in ins or not self.past_names:
            raise UserError(f"{path} is not a GQA decoder graph — export it with convert/export_onnx.py "
                            "--attention gqa")
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        p0 = ins[self.past_names[0]]
        self.kv_heads, self.head_dim = int(p0.shape[1]), int(p0.shape[3])
        self.kv_dtype = _ORT_TO_NP[p0.type]
        self.max_len = max_len
        vocab = self.session.get_outputs()[0].shape[-1]
        self.info = EngineInfo("ort-gqa", precision, self.device, variant, str(path), min(max_positions, max_len),
                               int(vocab) if isinstance(vocab, int) else -1)
        self.onnx_path = path
        self.buffers: dict[int, _Buffers] = {}

    # ---- buffers ----------------------------------------------------------------------------------------------
    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _buffers(self, batch: int) -> _Buffers:
        b = self.buffers.get(batch)
        if b is None:
            shape = (batch, self.kv_heads, self.max_len, self.head_dim)
            b = _Buffers([self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, self.device_id)
                          for _ in self.past_names], graph_id=len(self.buffers) + 1)
            self.buffers[batch] = b
        if b.busy:
            raise UserError(f"engine 'ort-gqa' already runs a generation of batch {batch} — release it first")
        return b

    def _run(self, b: _Buffers, feeds: dict, graph_id: int):
        if not self.cuda_graph:
            return self._run_bound(b, feeds)
        io = self.session.io_binding()
        with nvtx_range("h2d"):
            for k, v in feeds.items():
                if isinstance(v, np.ndarray):
                    io.bind_cpu_input(k, v)
                else:
                    io.bind_ortvalue_input(k, v)
        # bound first: outputs come back in binding order. A captured graph needs the output at a fixed address
        if self.cuda_graph and graph_id >= 0:
            if b.logits is None:
                batch = b.kv[0].shape()[0]
                b.logits = self.ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, self.info.vocab_size),
                                                                         self.kv_dtype, self.device, self.device_id)
            io.bind_ortvalue_output("logits", b.logits)
        else:
            io.bind_output("logits", self.device, self.device_id)
        for past, present, buf in zip(self.past_names, self.present_names, b.kv):
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)   # the same buffer: GQA writes the new keys/values in place
        ro = self.ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(io, ro)
        with nvtx_range("d2h"):
            return io.get_outputs()[0].numpy()[:, -1, :].astype(np.float32)

    def _run_bound(self, b: _Buffers, feeds: dict):
        """Without a CUDA graph: the KV buffers are bound once per batch size; a step binds its small inputs."""
        if b.io is None:
            b.io = self.session.io_binding()
            b.io.bind_output("logits", self.device)  # first: outputs come back in binding order
            for past, present, buf in zip(self.past_names, self.present_names, b.kv):
                b.io.bind_ortvalue_input(past, buf)
                b.io.bind_ortvalue_output(present, buf)
        io = b.io
        with nvtx_range("h2d"):
            for k, v in feeds.items():
                io.bind_cpu_input(k, v)
        io.bind_output("logits", self.device)  # rebinding a name keeps its place: a fresh logits tensor per step
        self.session.run_with_iobinding(io)
        with nvtx_range("d2h"):
            out = io.get_outputs()[0].numpy()[:, -1, :].astype(np.float32)
        return out

    # ---- Engine -----------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, Any]:
        batch = input_ids.shape[0]
        rows = [input_ids[i][attention_mask[i, -input_ids.shape[1]:].astype(bool)] for i in range(batch)]
        lens = np.array([len(r) for r in rows], dtype=np.int32)
        s = int(lens.max())
        if s >= self.max_len:
            raise UserError(f"prompt of {s} tokens fills the engine's KV buffer of {self.max_len} — export with a "
                            "larger --max-len")
        ids = np.zeros((batch, s), dtype=np.int64)
        for i, r in enumerate(rows):  # right padding: GQA's convention
            ids[i, : len(r)] = r
        b = self._buffers(batch)
        feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (batch, s)).copy(),
                 "seqlens_k": lens - 1, "total_sequence_length": np.array(s, dtype=np.int32),
                 "last_index": (lens - 1).astype(np.int64)}
        logits = self._run(b, feeds, -1)
        b.busy = True
        return logits, _State(batch, lens)

    def decode(self, state: _State, input_ids, attention_mask, position_ids):
        b = self.buffers[state.batch]
        pos = state.lens.astype(np.int64)             # each row's next position = its length so far
        if int(pos.max()) >= self.max_len:
            raise UserError(f"engine 'ort-gqa' KV buffer of {self.max_len} positions is full — export with a larger "
                            "--max-len")
        state.lens = state.lens + 1
        batch = state.batch
        step = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), "position_ids": pos[:, None].copy(),
                "seqlens_k": state.lens - 1, "last_index": np.zeros(batch, dtype=np.int64)}
        # GQA reads total_sequence_length on the host; the buffer length bounds every row and never changes, so a
        # captured graph stays valid. Without a CUDA graph (the CPU) it is the longest row: attention then spans the
        # cached positions only, not the whole buffer
        total = np.array(self.max_len if self.cuda_graph else int(state.lens.max()), dtype=np.int32)
        if not self.cuda_graph:
            return self._run(b, {**step, "total_sequence_length": total}, 0), state
        if b.step is None:
            b.step = {k: self._value(v) for k, v in step.items()}
        else:
            for k, v in step.items():
                b.step[k].update_inplace(np.ascontiguousarray(v))
        return self._run(b, {**b.step, "total_sequence_length": total}, b.graph_id), state

    def release(self, state) -> None:
        if isinstance(state, _State) and state.batch in self.buffers:
            self.buffers[state.batch].busy = False

    def weight_bytes(self) -> int:
        return onnx_weight_bytes(self.onnx_path)

    def close(self) -> None:
        self.buffers.clear()
        del self.session
