"""Engines behind one interface (see base.py), created by name and precision; inputs found by lmopt.artifacts.

    create_engine("torch", "tiny", precision="fp32")          # PyTorch eager, the baseline
    create_engine("ort", "tiny", precision="int8")            # stage-2 INT8 graph for ONNX Runtime
    create_engine("trt", "tiny", precision="fp16", device="cuda")   # stage-3 TensorRT engine
    create_engine("compiled", "llama-1b", precision="fp16", device="cuda")   # slotted static KV + CUDA graphs
    create_engine("cudagraph", "llama-1b", precision="fp16", device="cuda")  # HF model, static KV + CUDA graphs
    create_engine("ort-gqa", "llama-1b", precision="fp16", device="cuda")    # fused GQA graph, fixed KV buffer
    create_engine("llamacpp", "llama-small", precision="int4")               # llama.cpp Q4_0 (make llamacpp)
"""
from __future__ import annotations

from ..artifacts import PRECISIONS, find_onnx, onnx_file
from ..errors import UserError
from ..paths import stage_dir
from .base import Engine, EngineInfo

ENGINES = ("torch", "ort", "trt", "compiled", "cudagraph", "ort-gqa", "llamacpp")


def create_engine(engine: str, model: str, precision: str = "fp32", device: str = "cpu",
                  artifacts="artifacts", threads: int | None = None, **kwargs) -> Engine:
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}' — use one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' — use one of {', '.join(PRECISIONS)}")
    if engine == "compiled":
        from .compiled import CompiledEngine

        return CompiledEngine(model, precision, device, threads, **kwargs)
    if engine == "llamacpp":
        return _llamacpp(model, precision, device, artifacts, threads, **kwargs)
    if precision == "int4" and engine not in ("ort", "ort-gqa"):
        raise UserError(f"engine '{engine}' has no int4 build — use --engine ort (MatMulNBits) or llamacpp for int4")
    if precision == "bf16" and engine not in ("torch", "cudagraph"):
        raise UserError(f"engine '{engine}' has no bf16 build — use --engine compiled, cudagraph or torch for bf16")
    if engine == "torch":
        if precision == "int8":
            raise UserError("the PyTorch baseline runs fp32 or fp16, not int8 — use --engine ort for INT8")
        if precision in ("fp16", "bf16") and not device.startswith("cuda"):
            raise UserError(f"PyTorch {precision} needs a GPU (--device cuda) — use fp32 on CPU")
        from .torch_engine import TorchEngine

        return TorchEngine(model, precision, device, threads)
    if engine == "cudagraph":
        if precision not in ("fp16", "bf16"):
            raise UserError(f"engine 'cudagraph' runs fp16 or bf16, not {precision} — pass --precisions fp16")
        from .cudagraph import CudaGraphEngine

        return CudaGraphEngine(model, precision, device, threads, **kwargs)
    if engine == "ort-gqa":
        from ..manifest import list_variants
        from .ort_gqa import OrtGqaEngine

        model_arg = "" if model == "tiny" else f" --model {model}"
        if precision in ("int4", "int8"):  # stage 2's weight-only graphs of the fused export
            found = sorted((v, m) for v, m in list_variants(artifacts, model, "quantize").items()
                           if m.get("engine") == "ort-gqa" and m.get("precision") == precision)
            if not found:
                raise UserError(f"no {precision} GQA graph under {stage_dir(artifacts, model, 'quantize', '')} — run: "
                                f"python convert/quantize_model.py{model_arg} --target "
                                f"{'onnxruntime-int4' if precision == 'int4' else 'onnxruntime-int8-nbits'} "
                                "--attention gqa")
            variant, man = found[0]
            folder = stage_dir(artifacts, model, "quantize", variant)
            return OrtGqaEngine(onnx_file(folder, man), precision, device, threads, variant=variant,
                                max_len=man["graph"]["max_len"], max_positions=man["model_shape"]["max_positions"], **kwargs)
        variant = f"{precision}-gqa"
        man = list_variants(artifacts, model, "export").get(variant)
        if man is None:
            raise UserError(f"no {variant} ONNX under {stage_dir(artifacts, model, 'export', '')} — run: python "
                            f"convert/export_onnx.py{model_arg} --dtype {precision} --attention gqa")
        folder = stage_dir(artifacts, model, "export", variant)
        return OrtGqaEngine(onnx_file(folder, man), precision, device, threads, variant=variant,
                            max_len=man["graph"]["max_len"], max_positions=man["model_shape"]["max_positions"],
                            **kwargs)
    if engine == "ort":
        from ..models import as_model
        from .ort_engine import OrtEngine

        variant = kwargs.pop("variant", None)
        if variant:   # one stage-2 graph by name (e.g. a smoothed INT8 graph beside the default one)
            from ..manifest import load_stage

            folder, man = load_stage(artifacts, model, "quantize", variant)
            if man.get("precision") != precision or "onnxruntime" not in man.get("targets", []):
                raise UserError(f"{variant} is a {man.get('precision')} graph for {', '.join(man.get('targets', []))}"
                                f", not {precision} for onnxruntime — pick a variant under "
                                f"{stage_dir(artifacts, model, 'quantize', '')} made for onnxruntime")
        else:
            folder, man = find_onnx(artifacts, model, precision, "onnxruntime")
        max_pos = man.get("model_shape", {}).get("max_positions") or as_model(model).context_length
        return OrtEngine(onnx_file(folder, man), precision, device, threads, variant=folder.name,
                         max_positions=max_pos, **kwargs)
    reason = trt_unavailable_reason(device)
    if reason:
        raise UserError(f"cannot run engine 'trt': {reason}")
    from .trt_engine import TrtEngine  # noqa: PLC0415  (needs the tensorrt package)

    return TrtEngine.from_artifacts(artifacts, model, precision, **kwargs)


def _llamacpp(model: str, precision: str, device: str, artifacts, threads: int | None, **kwargs) -> Engine:
    from ..llamacpp import FILE_TYPES, import_llama_cpp
    from ..manifest import list_variants

    if device != "cpu":
        raise UserError("engine 'llamacpp' is built for the CPU here — pass --device cpu")
    if precision not in FILE_TYPES:
        raise UserError(f"engine 'llamacpp' runs {', '.join(FILE_TYPES)} (F32, Q8_0, Q4_0), not {precision}")
    import_llama_cpp()  # a missing install says `make llamacpp` before anything else
    ftype = FILE_TYPES[precision]
    man = list_variants(artifacts, model, "gguf").get(ftype)
    if man is None:
        model_arg = "" if model == "tiny" else f" --model {model}"
        raise UserError(f"no {ftype} GGUF under {stage_dir(artifacts, model, 'gguf', '')} — run: python "
                        f"convert/export_gguf.py{model_arg} --types {ftype}")
    from .llamacpp import LlamaCppEngine

    folder = stage_dir(artifacts, model, "gguf", ftype)
    return LlamaCppEngine(folder / man["outputs"]["gguf"], precision, threads, variant=ftype,
                          max_positions=man["model_shape"]["max_positions"], **kwargs)


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
