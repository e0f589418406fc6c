"""Engines behind one interface (see base.py), created by name and precision; ONNX files found via manifests.

    create_engine("torch", "tiny", precision="fp32")          # PyTorch eager, the baseline
    create_engine("ort", "tiny", precision="int8")            # stage-2 INT8 graph for ONNX Runtime
    create_engine("trt", "tiny", precision="fp16", device="cuda")   # stage-3 TensorRT engine
    create_engine("cudagraph", "llama-1b", precision="fp16", device="cuda")   # static KV cache + CUDA graphs
    create_engine("ort-gqa", "llama-1b", precision="fp16", device="cuda")     # fused GQA graph, fixed KV buffer
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..manifest import MANIFEST, list_variants, load_stage, read_manifest
from ..paths import stage_dir
from .base import Engine, EngineInfo

ENGINES = ("torch", "ort", "trt", "cudagraph", "ort-gqa")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# which stage/make target produces each ONNX precision
_PRECISION_TARGET = {"fp32": "export", "int8": "quantize", "fp16": "fp16"}


def find_onnx(artifacts, model: str, precision: str, target: str = "onnxruntime") -> tuple[Path, dict]:
    """(folder, manifest) of the ONNX graph of `precision` made for `target` ("onnxruntime" or "tensorrt")."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' — use one of {', '.join(PRECISIONS)}")
    if precision not in _PRECISION_TARGET:
        raise UserError(f"there is no {precision} ONNX stage — use fp32, fp16 or int8 with ONNX Runtime or TensorRT")
    if precision == "fp32":
        return load_stage(artifacts, model, "export", "fp32")
    if precision == "fp16" and target == "onnxruntime":
        # the FP16 graph for ONNX Runtime is a stage-1 option (export_onnx.py --dtype fp16); stage 2's FP16 graph
        # is TensorRT's
        exported = list_variants(artifacts, model, "export").get("fp16")
        if exported is not None:
            return stage_dir(artifacts, model, "export", "fp16"), exported
    variants = list_variants(artifacts, model, "quantize")
    found = {v: m for v, m in variants.items() if m.get("precision") == precision and target in m.get("targets", [])}
    if not found:
        where = stage_dir(artifacts, model, "quantize", "")
        other = sorted({t for m in variants.values() if m.get("precision") == precision for t in m.get("targets", [])})
        if other:  # e.g. the FP16 graph is built for TensorRT only: rebuilding it would not help
            raise UserError(f"the {precision} ONNX under {where} is made for {', '.join(other)} only, not {target} "
                            f"— use --engine {'trt' if 'tensorrt' in other else 'ort'} for {precision}")
        model_arg = "" if model == "tiny" else f" MODEL={model}"
        if precision == "fp16" and target == "onnxruntime":
            raise UserError(f"no fp16 ONNX for onnxruntime under {stage_dir(artifacts, model, 'export', '')} — run: "
                            f"make export-fp16{model_arg} (python convert/export_onnx.py --dtype fp16)")
        raise UserError(f"no {precision} ONNX for {target} under {where} — run: make "
                        f"{_PRECISION_TARGET[precision]}{model_arg}")
    best = sorted(found.items(), key=lambda kv: (not kv[1].get("default", False), kv[1].get("created", "")),
                  reverse=False)[0]
    folder = stage_dir(artifacts, model, "quantize", best[0])
    return folder, best[1]


def onnx_file(folder: Path, manifest: dict, verify_hash_below: int = 512 << 20) -> Path:
    """The ONNX file a manifest names, checked against the size and hash the manifest recorded, so a truncated or
    replaced file fails with one line instead of deep inside ONNX Runtime."""
    outputs = manifest.get("outputs", {})
    p = folder / outputs.get("onnx", "model.onnx")
    stage = manifest.get("stage", "export")
    target = {"export": "export", "quantize": "quantize"}.get(stage, stage)
    if not p.is_file():
        raise UserError(f"{folder / MANIFEST} names {p.name}, which is missing — delete {folder} and run: make {target}")
    from ..manifest import sha256_file

    for name, entry in outputs.get("files", {}).items():
        f = folder / name
        size = f.stat().st_size if f.is_file() else -1
        if size != entry.get("bytes"):
            raise UserError(f"{f} is truncated or changed ({size} bytes, manifest says {entry.get('bytes')}) — "
                            f"delete {folder} and run: make {target}")
        if size < verify_hash_below and sha256_file(f) != entry.get("sha256"):
            raise UserError(f"{f} does not match the sha256 in its manifest (corrupt or edited) — delete {folder} and "
                            f"run: make {target}")
    return p


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
        if precision == "bf16" and not device.startswith("cuda"):
            raise UserError("PyTorch bf16 is measured on a GPU here (--device cuda) — use fp32 on CPU")
        from .torch_engine import TorchEngine

        return TorchEngine(model, precision, device, threads)
    if engine == "ort-gqa":
        from ..manifest import list_variants
        from .ort_gqa import OrtGqaEngine

        variant = f"{precision}-gqa"
        man = list_variants(artifacts, model, "export").get(variant)
        if man is None:
            model_arg = "" if model == "tiny" else f" --model {model}"
            raise UserError(f"no {variant} ONNX under {stage_dir(artifacts, model, 'export', '')} — run: python "
                            f"convert/export_onnx.py{model_arg} --dtype {precision} --attention gqa")
        folder = stage_dir(artifacts, model, "export", variant)
        return OrtGqaEngine(onnx_file(folder, man), precision, device, threads, variant=variant,
                            max_len=man["graph"]["max_len"], max_positions=man["model_shape"]["max_positions"],
                            **kwargs)
    if engine == "cudagraph":
        if precision not in ("fp16", "bf16"):
            raise UserError(f"engine 'cudagraph' runs fp16 or bf16, not {precision} — pass --precisions fp16")
        from .cudagraph import CudaGraphEngine

        return CudaGraphEngine(model, precision, device, threads, **kwargs)
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


__all__ = ["Engine", "EngineInfo", "ENGINES", "PRECISIONS", "create_engine", "find_onnx", "onnx_file",
           "read_manifest", "trt_unavailable_reason"]
