"""TensorRT runtime for a stage-3 engine: prefill and decode with the KV cache kept in device buffers.

    eng = TrtEngine.from_artifacts("artifacts", "tiny", "fp16")     # artifacts/tiny/engine/trt11.4-fp16/model.plan
    logits, state = eng.prefill(ids, mask, pos); logits, state = eng.decode(state, nxt, mask, pos)

The engine has two optimization profiles (optimize/build_trt_engine.py): 0 = prefill (past length 0), 1 = decode
(one new token). Each gets its own execution context, bound once to its profile, so no call switches profiles.
Device buffers are torch CUDA tensors (torch's caching allocator makes the per-step `present` buffers cheap; the
docs/tensorrt.md, "TensorRT runtime", says why torch rather than cuda-python or pycuda); the state between steps is
the list of `present.*` tensors, which become the next step's `past_key_values.*` without leaving the GPU. Every
TensorRT name used here is listed in lmopt/trt_api.py.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import UserError
from ..nvtx_ranges import nvtx_range
from .base import Engine, EngineInfo

PREFILL, DECODE = 0, 1


def torch_for_device_memory():
    """torch, whose CUDA tensors hold this runtime's device memory, or one line saying what to install."""
    try:
        import torch
    except ImportError:
        raise UserError("the TensorRT runtime keeps its device buffers in torch CUDA tensors, and torch is not "
                        "installed — pip install torch (a CUDA build, e.g. from https://download.pytorch.org/whl/cu130)"
                        ) from None
    if not torch.cuda.is_available():
        raise UserError(f"the TensorRT runtime needs a CUDA build of torch for its device buffers (this torch "
                        f"{torch.__version__} sees no CUDA device) — pip install torch from "
                        "https://download.pytorch.org/whl/cu130 on a GPU machine")
    return torch


class TrtEngine(Engine):
    def __init__(self, engine, precision: str, variant: str = "", source: str = "", max_positions: int = 2048,
                 vocab_size: int = -1, device: str = "cuda", weights: int = 0):
        """`engine` is a deserialized ICudaEngine (the builder passes the one it just built); `weights` the bytes
        of the graph it was built from (0 = unknown)."""
        from .. import trt_api

        trt = trt_api.import_tensorrt()
        problem = trt_api.gpu_problem()
        if problem:
            raise UserError(problem)
        torch = torch_for_device_memory()
        self.trt, self.torch = trt, torch
        self.engine = engine
        if engine.num_optimization_profiles < 2:
            raise UserError(f"{source or 'the engine'} has {engine.num_optimization_profiles} optimization profile(s); "
                            "this runtime needs prefill + decode — rebuild it with optimize/build_trt_engine.py")
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.stream = torch.cuda.Stream(device=self.device)
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.BF16: torch.bfloat16, trt.DataType.INT8: torch.int8,
                       trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                       trt.DataType.BOOL: torch.bool}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.past_names = sorted((n for n in self.inputs if n.startswith("past_key_values.")), key=_layer_key)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        if "logits" not in self.outputs or not self.past_names or set(self.present_names) - set(self.outputs):
            raise UserError(f"{source or 'the engine'} lacks logits / KV-cache tensors — build it from the export of "
                            "convert/export_onnx.py")
        self.has_position_ids = "position_ids" in self.inputs
        self.tensor_dtype = {n: self.dtypes[engine.get_tensor_dtype(n)] for n in names}
        # per profile: the largest batch and total length it accepts
        self.limits = []
        for k in (PREFILL, DECODE):
            _, _, mx = engine.get_tensor_profile_shape("attention_mask", k)
            self.limits.append((int(mx[0]), int(mx[1])))
        self.contexts = []
        for k in (PREFILL, DECODE):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(k, self.stream.cuda_stream)
            self.contexts.append(context)
        self.stream.synchronize()
        p0 = self.past_names[0]
        mn, _, _ = engine.get_tensor_profile_shape(p0, DECODE)
        self.kv_heads, self.head_dim = int(mn[1]), int(mn[3])
        # TensorRT wants a non-null address even for the zero-length past of a prefill
        self._dummy = torch.zeros(64, dtype=torch.uint8, device=self.device)
        self.info = EngineInfo("trt", precision, "cuda", variant, source, max_positions, vocab_size)
        self._weights = int(weights)

    @classmethod
    def from_artifacts(cls, artifacts, model: str, precision: str, **kw) -> "TrtEngine":
        """The stage-3 engine of `precision` built by the installed TensorRT version, found through its manifest."""
        from .. import trt_api
        from ..artifacts import find_trt_engines, make_hint, trt_plan

        trt = trt_api.import_tensorrt()
        tag = trt_api.version_tag(trt)
        found = find_trt_engines(artifacts, model, precision, version_tag=tag, installed=trt.__version__)
        variant, man = list(found.items())[-1]
        plan = trt_plan(artifacts, model, variant, man)
        folder = plan.parent
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT {trt.__version__} could not load {plan} (other GPU or corrupt file) — delete "
                            f"{folder} and {make_hint('engine', model)}")
        shape = man.get("model_shape", {})
        eng = cls(engine, precision, variant=variant, source=str(plan),
                  max_positions=int(shape.get("max_positions", 2048)), vocab_size=int(shape.get("vocab_size", -1)),
                  weights=int(man.get("weight_bytes", 0)), **kw)
        eng._runtime = runtime  # the engine must not outlive its runtime
        return eng

    # ------------------------------------------------------------------------------------------------------------
    def _check(self, k: int, batch: int, total: int) -> None:
        max_b, max_t = self.limits[k]
        if batch > max_b or total > max_t:
            raise UserError(f"batch {batch} / length {total} exceeds the engine's {('prefill', 'decode')[k]} profile "
                            f"(batch <= {max_b}, length <= {max_t}) — rebuild with larger --max-batch/--max-seq-len")

    def _run(self, k: int, input_ids, attention_mask, position_ids, past: list) -> tuple[np.ndarray, list]:
        torch = self.torch
        context = self.contexts[k]
        b, s = input_ids.shape
        self._check(k, b, attention_mask.shape[1])
        with torch.cuda.stream(self.stream):
            with nvtx_range("h2d"):
                host = {"input_ids": input_ids, "attention_mask": attention_mask}
                if self.has_position_ids:
                    host["position_ids"] = position_ids
                feeds = {n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.tensor_dtype[n],
                                                                          non_blocking=True)
                         for n, a in host.items()}
            for n, t in feeds.items():
                context.set_input_shape(n, tuple(t.shape))
                context.set_tensor_address(n, t.data_ptr())
            for n, t in zip(self.past_names, past):
                context.set_input_shape(n, tuple(t.shape))
                context.set_tensor_address(n, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            outs = {}
            for n in self.outputs:
                shape = tuple(context.get_tensor_shape(n))
                t = torch.empty(shape, dtype=self.tensor_dtype[n], device=self.device)
                outs[n] = t
                context.set_tensor_address(n, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            with nvtx_range("d2h"):
                logits = outs["logits"][:, -1, :].float().cpu().numpy()  # waits for the stream
        # keep the inputs alive until the stream is done with them
        self._last_feeds = feeds
        return logits, [outs[n] for n in self.present_names]

    def prefill(self, input_ids, attention_mask, position_ids) -> tuple[np.ndarray, Any]:
        b = input_ids.shape[0]
        empty = [self.torch.empty((b, self.kv_heads, 0, self.head_dim), dtype=self.tensor_dtype[n],
                                  device=self.device) for n in self.past_names]
        return self._run(PREFILL, input_ids, attention_mask, position_ids, empty)

    def decode(self, state, input_ids, attention_mask, position_ids):
        return self._run(DECODE, input_ids, attention_mask, position_ids, state)

    def weight_bytes(self) -> int:
        """Bytes of the ONNX graph the engine was built from (its weights in the engine's precision; 0 = unknown)."""
        return self._weights

    def release(self, state) -> None:
        # dropping the references hands the KV buffers back to torch's caching allocator
        if isinstance(state, list):
            state.clear()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.synchronize()
        self.contexts.clear()
        self.engine = None


def _layer_key(name: str):
    m = re.match(r"past_key_values\.(\d+)\.(key|value)", name)
    return (int(m.group(1)), m.group(2)) if m else (1 << 30, name)

