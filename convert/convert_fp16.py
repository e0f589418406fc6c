"""Stage 2 (FP16): convert the FP32 ONNX to FP16 for strongly typed TensorRT 11, and prove it against FP32.

    python convert/convert_fp16.py --model tiny
    python convert/convert_fp16.py --model llama-small --max-ppl-increase 0.2

Reads:  artifacts/<model>/export/fp32/{manifest.json, model.onnx, tokenizer}  (stage 1, hash-checked)
        evaluation text: the built-in held-out split (data/eval.txt)
Writes: artifacts/<model>/quantize/fp16/{model.onnx, manifest.json}

TensorRT 11 has no FP16 builder flag: precision lives in the graph. The converter is NVIDIA ModelOpt AutoCast
(`modelopt.onnx.autocast`), with the model's inputs and outputs kept FP32 and the overflow-prone ops kept FP32:
the RMSNorm/LayerNorm reductions (ReduceMean, Pow, Sqrt, Reciprocal/Div), Softmax, and any node whose data or
initializers exceed FP16's safe range (AutoCast's data_max/init_max rules, measured on the calibration feed).
Validation on ONNX Runtime CPU: perplexity increase (default budget 0.1%), top-1 agreement, max |Δlogits|,
greedy agreement over 32 tokens; out of budget means exit 1 and nothing written.
ONNX Runtime 1.24.4's SimplifiedLayerNormFusion breaks on AutoCast's FP16 Llama graph (ENVIRONMENT.md), so the
validation session disables that one optimizer; TensorRT parses the graph itself and is unaffected.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("fp16")

# overflow-prone in FP16: variance reductions of RMSNorm/LayerNorm, exp in Softmax, and the ops around them
KEEP_FP32_OPS = ["ReduceMean", "Pow", "Sqrt", "Reciprocal", "Softmax", "LayerNormalization",
                 "SimplifiedLayerNormalization"]
# the validation session's workaround for onnxruntime 1.24.4 (ENVIRONMENT.md; fixed in 1.32.0)
ORT_DISABLED_OPTIMIZERS = ["SimplifiedLayerNormFusion"]


@dataclass
class Fp16Settings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    max_ppl_increase: float = 0.1     # percent, relative to FP32 perplexity
    eval_samples: int = 64            # held-out windows (64 x 128 = 8,192 tokens)
    eval_seq_len: int = 128
    greedy_prompts: int = 4
    greedy_tokens: int = 32
    keep_fp32_ops: list[str] = field(default_factory=lambda: list(KEEP_FP32_OPS))
    data_max: float = 512.0           # AutoCast: nodes with |activations| above this stay FP32
    threads: int = 0


def convert(*, settings: Fp16Settings) -> dict:
    from lmopt.artifacts import find_onnx, onnx_file
    from lmopt.paths import check_writable, stage_dir, staging_dir
    from lmopt.quantization import parse_budget

    s = settings
    # the user's mistakes first, before the slow imports: a bad budget or a missing export fails at once
    parse_budget(s.max_ppl_increase)
    check_writable(s.artifacts)
    src_folder, src_man = find_onnx(s.artifacts, s.model, "fp32")
    fp32_path = onnx_file(src_folder, src_man)

    import onnx
    from transformers import AutoTokenizer

    from lmopt.data import builtin_text, token_windows
    from lmopt.engines.ort_engine import make_session
    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.quantization import Evaluator, accuracy_table, calibration_feeds
    from lmopt.validate import Checklist

    timings: dict[str, float] = {}
    shape = src_man.get("model_shape", {})
    fp32_session = make_session(fp32_path, threads=s.threads or None)
    tokenizer = AutoTokenizer.from_pretrained(str(src_folder))
    windows = token_windows(tokenizer, builtin_text("eval"), s.eval_samples, s.eval_seq_len, "evaluation text")

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise UserError("ModelOpt is not installed — pip install nvidia-modelopt==0.47.0 (without the [onnx] extra)") \
            from None
    import logging

    # AutoCast logs one INFO line per node it skips; its summary is what matters
    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"):
        logging.getLogger(name).setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)

    final = stage_dir(s.artifacts, s.model, "quantize", "fp16")
    with tempfile.TemporaryDirectory(prefix="lmopt-fp16-") as work:
        # AutoCast's data_max rule needs real activations: a calibration prefill from the built-in calib split
        import numpy as np

        feed = calibration_feeds(fp32_session, token_windows(tokenizer, builtin_text("calib"), 1, s.eval_seq_len,
                                                             "calibration text"))[0]
        calib = Path(work) / "calib.npz"
        np.savez(calib, **feed)
        with timed(log, "AutoCast FP16 conversion", timings, "convert_s"):
            model = convert_to_mixed_precision(str(fp32_path), low_precision_type="fp16", keep_io_types=True,
                                               op_types_to_exclude=s.keep_fp32_ops, data_max=s.data_max,
                                               calibration_data=str(calib), providers=["cpu"])
        candidate = Path(work) / "model.onnx"
        onnx.save(model, str(candidate))
        counts = _precision_counts(model)
        log.info("FP16 graph: %d nodes compute in FP16, %d kept FP32 (%s)", counts["fp16_nodes"],
                 counts["fp32_nodes"], ", ".join(f"{k} {v}" for k, v in counts["fp32_by_op"].items()))
        with timed(log, "FP32 reference + FP16 validation", timings, "validate_s"):
            ev = Evaluator(fp32_path, windows, [w[:16] for w in windows[: s.greedy_prompts]], s.greedy_tokens,
                           shape.get("max_positions", 2048))
            acc = ev.full(candidate, {"disable_optimizers": ORT_DISABLED_OPTIMIZERS})
        print(accuracy_table({"fp32": {"ppl": round(ev.ref_ppl, 4), "ppl_increase_pct": 0.0, "top1_agreement": 1.0,
                                       "max_abs_dlogits": 0.0, "greedy_agreement": 1.0}, "fp16": acc}), flush=True)
        ck = Checklist("fp16 validation (vs FP32, ONNX Runtime CPU)")
        ck.add("perplexity increase % within budget", acc["ppl_increase_pct"] <= s.max_ppl_increase,
               acc["ppl_increase_pct"], s.max_ppl_increase)
        ck.add("I/O types kept FP32", counts["io_fp32"], None, None, "engines feed and read float32")
        ck.add("nodes computing in FP16", counts["fp16_nodes"] > 0, counts["fp16_nodes"])
        ck.print(log)
        if not ck.passed:
            raise UserError(f"FP16 graph fails validation ({', '.join(c.name for c in ck.checks if not c.passed)}; "
                            f"Δppl {acc['ppl_increase_pct']:+.3f}%) — nothing written; keep more ops FP32 "
                            "(--keep-fp32-ops) or pass a larger --max-ppl-increase on purpose")
        with staging_dir(final) as tmp:
            candidate.replace(tmp / "model.onnx")
            log.info("Saving ONNX model to %s", final / "model.onnx")
            payload = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
            manifest = {
                "stage": "quantize", "variant": "fp16", "model": src_man.get("model", s.model),
                "model_spec": s.model, "precision": "fp16",
                # FP16 on CPU is no faster than FP32 (ENVIRONMENT.md): this graph is for TensorRT
                "targets": ["tensorrt"], "default": True,
                "converter": "modelopt.onnx.autocast.convert_to_mixed_precision",
                "outputs": {"onnx": "model.onnx", "files": {n: file_entry(tmp / n) for n in payload}},
                "model_shape": shape,
                "inputs": {"onnx": file_entry(fp32_path), "export_manifest": str(src_folder / "manifest.json"),
                           "evaluation_text": "builtin:eval"},
                "settings": asdict(s),
                "versions": package_versions("onnx", "onnxruntime", "nvidia-modelopt"),
                "timings_s": timings,
                "validation": ck.to_dict(),
                "accuracy": acc,
                "precision_counts": counts,
                "onnxruntime_disabled_optimizers": ORT_DISABLED_OPTIMIZERS,
            }
            write_manifest(tmp, manifest)
    log.info("fp16 finished: %s", final)
    return manifest


def _precision_counts(model) -> dict:
    """Which nodes compute in FP16 vs FP32 (by the element type of their first float output)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    fp16, fp32, by_op = 0, 0, {}
    for n in model.graph.node:
        if n.op_type in ("Cast", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Range"):
            continue
        t = types.get(n.output[0]) if n.output else None
        if t == TensorProto.FLOAT16:
            fp16 += 1
        elif t == TensorProto.FLOAT:
            fp32 += 1
            by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
    io_fp32 = all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
                  for v in list(model.graph.input) + list(model.graph.output))
    return {"fp16_nodes": fp16, "fp32_nodes": fp32, "fp32_by_op": dict(sorted(by_op.items())), "io_fp32": io_fp32}


def build_parser() -> argparse.ArgumentParser:
    from lmopt.quantization import add_budget_flag

    p = cli.parser(__doc__)
    d = Fp16Settings()
    cli.add_settings(p, Fp16Settings, skip=("max_ppl_increase", "keep_fp32_ops"))
    add_budget_flag(p, d.max_ppl_increase)
    p.add_argument("--keep-fp32-ops", nargs="*", default=d.keep_fp32_ops, metavar="OP",
                   help="op types kept in FP32")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = cli.settings_from(Fp16Settings, args)
    t0 = time.time()
    convert(settings=settings)
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
