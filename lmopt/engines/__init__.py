"""Engines behind one interface (see base.py), created by name and precision; inputs found by lmopt.artifacts.

    create_engine("torch", "tiny", precision="fp32")          # PyTorch eager, the baseline
    create_engine("ort", "tiny", precision="int8")            # stage-2 INT8 graph for ONNX Runtime
    create_engine("trt", "tiny", precision="fp16", device="cuda")   # stage-3 TensorRT engine
"""
from __future__ import annotations

from ..artifacts import PRECISIONS, find_onnx, onnx_file
from ..errors import UserError
from .base import Engine, EngineInfo

ENGINES = ("torch", "ort", "trt")


def create_engine(engine: str, model: str, precision: str = "fp32", device: str = "cpu",
                  artifacts="artifacts", threads: int | None = None, **kwargs) -> Engine:
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}' — use one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' — use one of {', '.join(PRECISIONS)}")
    if engine == "torch":
        if precision == "int8":
            raise UserError("the PyTorch baseline runs fp32 or fp16, not int8 — use --engine ort for INT8")
        if precision == "fp16" and not device.startswith("cuda"):
            raise UserError("PyTorch fp16 needs a GPU (--device cuda) — use fp32 on CPU")
        from .torch_engine import TorchEngine

        return TorchEngine(model, precision, device, threads)
    if engine == "ort":
        from ..models import load_config, model_shape
        from .ort_engine import OrtEngine

        folder, man = find_onnx(artifacts, model, precision, "onnxruntime")
        max_pos = man.get("model_shape", {}).get("max_positions") or model_shape(load_config(model))["max_positions"]
        return OrtEngine(onnx_file(folder, man), precision, device, threads, variant=folder.name,
                         max_positions=max_pos, **kwargs)
    reason = trt_unavailable_reason(device)
    if reason:
        raise UserError(f"cannot run engine 'trt': {reason}")
    from .trt_engine import TrtEngine  # noqa: PLC0415  (needs the tensorrt package)

    return TrtEngine.from_artifacts(artifacts, model, precision, **kwargs)


def trt_unavailable_reason(device: str = "cuda") -> str | None:
    """Why TensorRT engines cannot run here (one line with the fix), or None when they can be tried."""
    import importlib.util

    if not device.startswith("cuda"):
        return "TensorRT needs an NVIDIA GPU — pass --device cuda on a GPU machine"
    try:
        have_trt = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        have_trt = False
    if not have_trt:
        return "TensorRT not installed — pip install tensorrt-cu13 from NVIDIA's package index (or use an NGC container)"
    if importlib.util.find_spec(__name__ + ".trt_engine") is None:
        return "this checkout has no TensorRT runtime (lmopt/engines/trt_engine.py)"
    return None


__all__ = ["Engine", "EngineInfo", "ENGINES", "PRECISIONS", "create_engine", "trt_unavailable_reason"]
