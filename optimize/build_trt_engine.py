"""Stage 3: build a TensorRT engine from a stage-2 ONNX graph, prove its precision, and check it against ONNX Runtime.

    python optimize/build_trt_engine.py --model tiny --precision fp16     # from artifacts/tiny/quantize/fp16
    python optimize/build_trt_engine.py --model tiny --precision int8     # from the INT8 Q/DQ graph for TensorRT
    python optimize/build_trt_engine.py --model tiny --precision int8 --emit-trtexec   # print the trtexec command

The build plan (shapes -> optimization profiles, the graph check, the precision proof, the trtexec command) is
lmopt.trt_build, shared with the trtexec wrapper optimize/trtexec_command.sh.

Reads:  the stage-2 graph made for TensorRT (lmopt.artifacts.find_onnx(..., "tensorrt"): artifacts/<model>/quantize/
        <variant>/{model.onnx, manifest.json}) or --onnx PATH; for validation the stage-1 FP32 export
        (artifacts/<model>/export/fp32), run by ONNX Runtime on the CPU.
Writes: artifacts/<model>/engine/trt<major>.<minor>-<precision>/{model.plan, layers.json, build.log, manifest.json}
        and the persistent timing cache artifacts/<model>/engine/timing-trt<major>.<minor>.cache

TensorRT 11 builds strongly typed networks only: there are no FP16/INT8 builder flags any more, so the engine's
precision is the graph's (AutoCast FP16 graph, explicit Q/DQ INT8 graph). The network is built with two optimization
profiles, prefill (past length 0, prompt 1..max) and decode (one new token, past 1..max-1), whose batch and length
ranges are the same for every KV-cache input. After the build the engine inspector's layer information (DETAILED
verbosity) is written to layers.json and summarised per precision; an "fp16" or "int8" engine without a single layer
in that precision fails. The engine then runs prefill + greedy decode against ONNX Runtime on fixed inputs.

Needs an NVIDIA GPU, TensorRT 11 (10.x also works) and a CUDA build of torch (device buffers). Without them the
script exits with one line saying what is missing; --skip-if-unavailable turns that into a note and exit 0.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import add_verbosity_args, get_logger, timed
from lmopt.trt_build import (PRECISIONS, VALIDATION_PRESETS, EngineSettings, add_engine_args, check_graph_precision,
                             check_precision_proof, derive_profiles, engine_dir, graph_weight_bytes, inspect_onnx,
                             layer_precision_summary, locate_onnx, resolved_lengths, timing_cache_path,
                             trtexec_command)

log = get_logger("build_trt_engine")

def _capture_logger(trt, lines: list[str]):
    """A TensorRT logger that keeps every message for build.log and forwards warnings and errors to ours."""
    sev = trt.ILogger.Severity  # tests/test_trt_api.py reads `sev.X` as ILogger.Severity.X
    names = {sev.INTERNAL_ERROR: "INTERNAL_ERROR", sev.ERROR: "ERROR", sev.WARNING: "WARNING", sev.INFO: "INFO",
             sev.VERBOSE: "VERBOSE"}

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = names.get(severity, str(severity))
            lines.append(f"[{level}] {msg}")
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CaptureLogger()


def build_engine(*, settings: EngineSettings) -> dict | None:
    """Build, prove and validate one engine; returns its manifest (None when skipped for lack of TensorRT/GPU)."""
    from lmopt import trt_api
    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.paths import check_writable, model_slug, staging_dir

    s = settings
    if s.precision not in PRECISIONS:
        raise UserError(f"unknown precision '{s.precision}' — use one of {', '.join(PRECISIONS)}")
    if not 0 <= s.opt_level <= 5:
        raise UserError(f"--opt-level must be 0..5 (got {s.opt_level})")
    if s.workspace_mib < 1:
        raise UserError(f"--workspace-mib must be >= 1 (got {s.workspace_mib})")
    onnx_path, upstream, shape = locate_onnx(s)
    graph = inspect_onnx(onnx_path)
    check_graph_precision(onnx_path, graph, s.precision)
    profiles = derive_profiles(shape, graph["inputs"], s)

    if s.emit_trtexec:
        if s.trt_version:
            tag = "trt" + ".".join(s.trt_version.split(".")[:2])
        else:
            trt = trt_api.import_tensorrt()
            tag = trt_api.version_tag(trt)
        out = engine_dir(s, tag, "-trtexec")
        print(shlex.join(trtexec_command(onnx=onnx_path, out_dir=out, profiles=profiles, s=s,
                                         timing_cache=timing_cache_path(s, tag))))
        return None

    trt, missing = trt_api.availability()
    if missing:
        if s.skip_if_unavailable:
            print(f"note: skipping the TensorRT {s.precision} engine: {missing}", flush=True)
            return None
        raise UserError(missing)
    check_writable(s.artifacts)
    tag = trt_api.version_tag(trt)
    final = engine_dir(s, tag)
    cache_path = timing_cache_path(s, tag)
    timings: dict[str, float] = {}
    build_log: list[str] = []
    trt_logger = _capture_logger(trt, build_log)
    log.info("TensorRT %s: building %s engine from %s", trt.__version__, s.precision, onnx_path)

    with staging_dir(final) as tmp:
        builder = trt.Builder(trt_logger)
        network = builder.create_network(trt_api.network_flags(trt))
        parser = trt.OnnxParser(network, trt_logger)
        with timed(log, "ONNX parse", timings, "parse_s"):
            ok = parser.parse_from_file(str(onnx_path))
        if not ok:
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT could not parse {onnx_path}: {errs[:300]} — see the stage-2 graph")
        net_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        if net_inputs != set(profiles[0]["shapes"]):
            raise UserError(f"network inputs {sorted(net_inputs)} differ from the profile inputs "
                            f"{sorted(profiles[0]['shapes'])} — re-export the model")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
        config.builder_optimization_level = s.opt_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # a cache from another GPU or TensorRT version: start a fresh one rather than mix tactics
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_path)
            cache_bytes = b""
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        for p in profiles:
            profile = builder.create_optimization_profile()
            for name, v in p["shapes"].items():
                profile.set_shape(name, v["min"], v["opt"], v["max"])
            config.add_optimization_profile(profile)

        with timed(log, "engine build", timings, "build_s"):
            plan = builder.build_serialized_network(network, config)
        if plan is None:
            errors = [l for l in build_log if l.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
            raise UserError(f"TensorRT build failed: {(errors[-1] if errors else 'no error logged')[:300]} — "
                            f"see the messages above")
        (tmp / "model.plan").write_bytes(bytes(plan))
        log.info("Saving engine to %s", final / "model.plan")
        cache = config.get_timing_cache()
        new_cache = bytes(cache.serialize())
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_cache = cache_path.with_name(cache_path.name + ".tmp")
        tmp_cache.write_bytes(new_cache)
        tmp_cache.replace(cache_path)
        log.info("Saving timing cache to %s (%d bytes, %s)", cache_path, len(new_cache),
                 "updated" if cache_bytes else "new")

        runtime = trt.Runtime(trt_logger)
        with timed(log, "deserialize + inspect", timings, "inspect_s"):
            engine = runtime.deserialize_cuda_engine(bytes(plan))
            inspector = engine.create_engine_inspector()
            # with a context whose input shapes are set, the inspector resolves dynamic dims and prints each
            # tensor's format/type (TensorRT's IEngineInspector docs); profile 0 at its opt shapes
            context = engine.create_execution_context()
            for name, v in profiles[0]["shapes"].items():
                context.set_input_shape(name, v["opt"])
            inspector.execution_context = context
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
            del inspector, context
        (tmp / "layers.json").write_text(json.dumps(info, indent=1) + "\n")
        log.info("Saving layer information to %s", final / "layers.json")
        summary = layer_precision_summary(info)
        log.info("layers by precision: %s", summary["by_precision"])
        check_precision_proof(summary, s.precision)

        from lmopt.engines.trt_engine import TrtEngine

        with timed(log, "validation vs ONNX Runtime", timings, "validate_s"):
            trt_engine = TrtEngine(engine, s.precision, variant=final.name, source=str(final / "model.plan"),
                                   max_positions=int(shape["max_positions"]), vocab_size=int(shape["vocab_size"]),
                                   weights=graph_weight_bytes(onnx_path))
            checks = validate_engine(trt_engine, onnx_path, s, shape)
            trt_engine.close()
        checks.print(log)
        (tmp / "build.log").write_text("\n".join(build_log) + "\n")
        log.info("Saving build log to %s (%d lines)", final / "build.log", len(build_log))

        files = {n: file_entry(tmp / n) for n in ("model.plan", "layers.json", "build.log")}
        manifest = {
            "stage": "engine", "variant": final.name, "model": model_slug(s.model), "model_spec": s.model,
            "precision": s.precision, "engine": "tensorrt", "tensorrt_version": trt.__version__,
            "model_shape": shape,
            "inputs": {"onnx": file_entry(onnx_path), "onnx_variant": upstream.get("variant"),
                       "timing_cache": str(cache_path)},
            "outputs": {"engine": "model.plan", "layer_info": "layers.json", "build_log": "build.log",
                        "files": files},
            "profiles": profiles, "limits": resolved_lengths(shape, s),
            "graph": graph, "layer_precision": summary, "weight_bytes": graph_weight_bytes(onnx_path),
            "engine_info": {"num_layers": engine.num_layers, "num_profiles": engine.num_optimization_profiles,
                            "device_memory_bytes": int(engine.device_memory_size_v2),
                            "plan_bytes": files["model.plan"]["bytes"]},
            "build_log_summary": {k: sum(1 for l in build_log if l.startswith(f"[{k}]"))
                                  for k in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")},
            # warnings are where TensorRT says why a layer fell back to FP32 or a tactic was skipped
            "build_log_warnings": [l for l in build_log if l.startswith(("[WARNING]", "[ERROR]"))][-50:],
            "settings": asdict(s),
            "versions": {**package_versions("onnx", "onnxruntime", "torch"), "tensorrt": trt.__version__},
            "timings_s": timings,
            "validation": checks.to_dict(),
        }
        if not checks.passed:
            raise UserError(f"engine validation failed ({', '.join(c.name for c in checks.checks if not c.passed)}) "
                            "— nothing written; pass --atol / --min-agreement only if you accept the difference")
        write_manifest(tmp, manifest)
    log.info("engine finished: %s", final)
    return manifest


def validate_engine(trt_engine, onnx_path: Path, s: EngineSettings, shape: dict):
    """Engine vs ONNX Runtime (CPU) on fixed inputs: logits of a batch-2 prefill and decode steps, greedy tokens.

    The reference is the stage-1 FP32 export when present (what the user's accuracy is measured against), else the
    input graph itself."""
    import numpy as np

    from lmopt.data import builtin_text
    from lmopt.artifacts import find_onnx, onnx_file
    from lmopt.engines.ort_engine import OrtEngine
    from lmopt.generate import SamplingParams, generate, pad_batch
    from lmopt.models import load_tokenizer
    from lmopt.validate import Checklist

    atol0, agree0 = VALIDATION_PRESETS[s.precision]
    atol, min_agree = s.atol or atol0, s.min_agreement or agree0
    try:
        folder, man = find_onnx(s.artifacts, s.model, "fp32")
        ref_path = onnx_file(folder, man)
    except UserError:
        ref_path = onnx_path
    ref = OrtEngine(ref_path, "fp32", "cpu", max_positions=int(shape["max_positions"]),
                    session_kwargs={"disable_optimizers": ["SimplifiedLayerNormFusion"]})
    checks = Checklist(f"engine validation ({s.precision} TensorRT vs ONNX Runtime on {ref_path.name})")
    tok = load_tokenizer(s.model)
    ids = tok(builtin_text("eval"))["input_ids"]
    prompts = [ids[:24], ids[100:113]]
    x, mask, pos = pad_batch(prompts, tok.pad_token_id or 0)
    worst = 0.0
    l_t, st_t = trt_engine.prefill(x, mask, pos)
    l_r, st_r = ref.prefill(x, mask, pos)
    worst = max(worst, float(np.abs(l_t - l_r).max()))
    last, nxt = pos[:, -1].copy(), l_r.argmax(-1)
    for _ in range(4):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        last += 1
        step = nxt[:, None].astype(np.int64)
        l_t, st_t = trt_engine.decode(st_t, step, mask, last[:, None].copy())
        l_r, st_r = ref.decode(st_r, step, mask, last[:, None].copy())
        worst = max(worst, float(np.abs(l_t - l_r).max()))
        nxt = l_r.argmax(-1)
    trt_engine.release(st_t)
    checks.add("prefill + 4 decode steps (batch 2, left-padded) max |Δlogits|", worst <= atol, worst, atol)
    p = SamplingParams(max_new_tokens=s.greedy_tokens)
    g_t = generate(trt_engine, [ids[:16]], p).tokens[0]
    g_r = generate(ref, [ids[:16]], p).tokens[0]
    agree = sum(a == b for a, b in zip(g_t, g_r)) / max(1, len(g_r))
    checks.add(f"{s.greedy_tokens} greedy tokens agree", agree >= min_agree, round(agree, 4), min_agree)
    ref.close()
    return checks


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    add_engine_args(p)
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    settings, _ = cli.parse(build_parser, EngineSettings, argv)
    t0 = time.time()
    man = build_engine(settings=settings)
    if man is not None:
        log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
