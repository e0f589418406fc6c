"""Stage 3: build a TensorRT engine from a stage-2 ONNX graph, prove its precision, and check it against ONNX Runtime.

    python optimize/build_trt_engine.py --model tiny --precision fp16     # from artifacts/tiny/quantize/fp16
    python optimize/build_trt_engine.py --model tiny --precision int8     # from the INT8 Q/DQ graph for TensorRT
    python optimize/build_trt_engine.py --model tiny --precision int8 --emit-trtexec   # print the trtexec command

Reads:  the stage-2 graph made for TensorRT (lmopt.engines.find_onnx(..., "tensorrt"): artifacts/<model>/quantize/
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

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path


from lmopt.errors import UserError, cli_main
from lmopt.log import add_verbosity_args, get_logger, setup_logging, timed

log = get_logger("build_trt_engine")

PRECISIONS = ("fp16", "int8", "fp32")
# Validation limits per precision, vs the FP32 ONNX graph in ONNX Runtime: max |Δlogits| and the fraction of greedy
# tokens that must match. FP16 rounding moves logits by ~1e-3 of their range; INT8 Q/DQ moves them by far more, and
# one flipped token changes everything after it, so INT8 is held to a looser agreement (its perplexity budget is
# stage 2's job).
VALIDATION_PRESETS = {"fp32": (1e-3, 1.0), "fp16": (0.1, 0.9), "int8": (2.0, 0.5)}


@dataclass
class EngineSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    precision: str = "fp16"
    onnx: str = ""                 # explicit ONNX file instead of the stage-2 output found through its manifest
    min_batch: int = 1
    opt_batch: int = 1             # the batch TensorRT tunes kernels for
    max_batch: int = 8
    max_seq_len: int = 0           # prompt + generated tokens; 0 = the model's context, at most 1024
    opt_prompt_len: int = 0        # prefill length tuned for; 0 = max_seq_len // 4
    opt_past_len: int = 0          # decode past length tuned for; 0 = max_seq_len // 2
    workspace_mib: int = 4096      # workspace memory-pool limit
    opt_level: int = 3             # builder optimization level 0..5 (TensorRT's default is 3)
    timing_cache: str = ""         # "" = artifacts/<model>/engine/timing-trt<ver>.cache
    greedy_tokens: int = 32
    atol: float = 0.0              # 0 = VALIDATION_PRESETS[precision]
    min_agreement: float = 0.0     # 0 = VALIDATION_PRESETS[precision]
    skip_if_unavailable: bool = False
    emit_trtexec: bool = False     # print the equivalent trtexec command and exit (used by trtexec_command.sh)
    trt_version: str = ""          # for --emit-trtexec without TensorRT here: the version trtexec will be (e.g. 11.4)
    record_trtexec: str = ""       # folder trtexec_command.sh built into: write its manifest (layer summary, timing)
    trtexec_seconds: float = 0.0   # with --record-trtexec: how long trtexec ran


# ---- shapes ----------------------------------------------------------------------------------------------------------
def resolved_lengths(shape: dict, s: EngineSettings) -> dict[str, int]:
    """The batch/length limits after defaults, checked: min <= opt <= max everywhere, a one-line error otherwise."""
    ctx = int(shape["max_positions"])
    max_seq = s.max_seq_len or min(ctx, 1024)
    r = dict(min_batch=s.min_batch, opt_batch=s.opt_batch, max_batch=s.max_batch, max_seq_len=max_seq,
             opt_prompt_len=s.opt_prompt_len or max(1, max_seq // 4),
             opt_past_len=s.opt_past_len or max(1, max_seq // 2))
    if r["min_batch"] < 1:
        raise UserError(f"--min-batch must be >= 1 (got {r['min_batch']})")
    if r["max_batch"] < r["min_batch"]:
        raise UserError(f"max shapes smaller than min: --max-batch {r['max_batch']} < --min-batch {r['min_batch']} "
                        "— raise --max-batch")
    if not r["min_batch"] <= r["opt_batch"] <= r["max_batch"]:
        raise UserError(f"--opt-batch {r['opt_batch']} is outside [--min-batch {r['min_batch']}, --max-batch "
                        f"{r['max_batch']}] — pick a batch inside the range")
    if max_seq < 2:
        raise UserError(f"max shapes smaller than min: --max-seq-len {max_seq} < 2 (decode needs one cached token and "
                        "one new token) — raise --max-seq-len")
    if max_seq > ctx:
        raise UserError(f"--max-seq-len {max_seq} exceeds the model's context of {ctx} positions — lower it")
    if not 1 <= r["opt_prompt_len"] <= max_seq:
        raise UserError(f"--opt-prompt-len {r['opt_prompt_len']} is outside [1, --max-seq-len {max_seq}]")
    if not 1 <= r["opt_past_len"] <= max_seq - 1:
        raise UserError(f"--opt-past-len {r['opt_past_len']} is outside [1, --max-seq-len - 1 = {max_seq - 1}]")
    return r


def default_input_names(shape: dict, position_ids: bool = True) -> list[str]:
    """The inputs of optimum's merged text-generation-with-past export (used when no graph is at hand)."""
    names = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    for i in range(int(shape["num_layers"])):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def derive_profiles(shape: dict, input_names: list[str], s: EngineSettings) -> list[dict]:
    """Two optimization profiles: 0 = prefill (past 0, prompt 1..max), 1 = decode (1 new token, past 1..max-1).

    Every input's dims are functions of the same batch B, new-token count S and past length P, so the KV inputs
    cannot disagree (TensorRT #1808/#4199 are profiles whose mask and past lengths contradict each other):
    input_ids/position_ids [B, S], attention_mask [B, P+S], past_key_values.N.* [B, kv_heads, P, head_dim].
    """
    r = resolved_lengths(shape, s)
    kvh, hd, max_seq = int(shape["num_kv_heads"]), int(shape["head_dim"]), r["max_seq_len"]
    b = (r["min_batch"], r["opt_batch"], r["max_batch"])
    regimes = {
        # (S min/opt/max, P min/opt/max)
        "prefill": ((1, r["opt_prompt_len"], max_seq), (0, 0, 0)),
        "decode": ((1, 1, 1), (1, r["opt_past_len"], max_seq - 1)),
    }
    profiles = []
    for name, (seq, past) in regimes.items():
        shapes = {}
        for inp in input_names:
            per = []
            for k in range(3):
                if inp in ("input_ids", "position_ids"):
                    per.append([b[k], seq[k]])
                elif inp == "attention_mask":
                    per.append([b[k], past[k] + seq[k]])
                elif inp.startswith("past_key_values."):
                    per.append([b[k], kvh, past[k], hd])
                else:
                    raise UserError(f"unexpected graph input '{inp}' — this stage handles optimum's "
                                    "text-generation-with-past export (input_ids, attention_mask, position_ids, "
                                    "past_key_values.N.key/value); re-export with convert/export_onnx.py")
            shapes[inp] = dict(zip(("min", "opt", "max"), per))
        profiles.append({"name": name, "shapes": shapes})
    return profiles


# ---- the graph -------------------------------------------------------------------------------------------------------
def inspect_onnx(path: Path) -> dict:
    """Inputs and what decides the engine's precision under strong typing: Q/DQ nodes and FP16 tensors."""
    import onnx
    from onnx import TensorProto

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise UserError(f"{path} is not a valid ONNX model ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                        " — rebuild it (make quantize / make fp16)") from None
    g = m.graph
    init_names = {i.name for i in g.initializer}
    ops: dict[str, int] = {}
    fp16_casts = 0
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute):
            fp16_casts += 1
    fp16_inits = sum(1 for i in g.initializer if i.data_type == TensorProto.FLOAT16)
    return {
        "inputs": [i.name for i in g.input if i.name not in init_names],
        "qdq_nodes": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0),
        "fp16_initializers": fp16_inits, "fp16_casts": fp16_casts, "nodes": len(g.node),
    }


def graph_weight_bytes(path: Path) -> int:
    """Bytes of the graph's file(s), model.onnx + external data: the weights a decode step reads, in the precision
    the engine runs them (the benchmark's memory-bandwidth floor)."""
    files = [path, *path.parent.glob(path.name + "_data"), *path.parent.glob(path.name + ".data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def check_graph_precision(path: Path, info: dict, precision: str) -> None:
    """Strong typing builds what the graph says: refuse graphs that cannot give the asked-for precision, instead of
    building an engine that silently stays FP32 (rf-detr #1453)."""
    if precision == "int8" and info["qdq_nodes"] == 0:
        raise UserError(f"{path} has no QuantizeLinear/DequantizeLinear nodes, so a TensorRT 11 engine from it "
                        "cannot run in INT8 — pass the Q/DQ graph made for TensorRT (run: make quantize)")
    if precision == "fp16" and info["fp16_initializers"] == 0 and info["fp16_casts"] == 0:
        raise UserError(f"{path} has no FP16 weights or casts, so a TensorRT 11 engine from it would stay FP32 — pass "
                        "the FP16 graph (run: make fp16)")


def locate_onnx(s: EngineSettings) -> tuple[Path, dict, dict]:
    """(onnx file, upstream manifest or {}, model shape) — through the stage-2 manifest unless --onnx is given."""
    from lmopt.engines import find_onnx, onnx_file
    from lmopt.manifest import read_manifest
    from lmopt.models import load_config, model_shape

    if s.onnx:
        p = Path(s.onnx)
        if not p.is_file():
            raise UserError(f"ONNX file {p} does not exist — pass the model.onnx of a stage-2 output "
                            "(make quantize / make fp16) or omit --onnx")
        man = read_manifest(p.parent) if (p.parent / "manifest.json").is_file() else {}
    else:
        folder, man = find_onnx(s.artifacts, s.model, s.precision, "tensorrt")
        p = onnx_file(folder, man)
    shape = man.get("model_shape") or model_shape(load_config(s.model))
    return p, man, shape


# ---- precision proof -------------------------------------------------------------------------------------------------
_DTYPE_PATTERNS = (("int8", re.compile(r"\bInt8\b|\bINT8\b")), ("fp8", re.compile(r"\bFP8\b|\bFp8\b")),
                   ("fp16", re.compile(r"\bHalf\b|\bFP16\b")), ("bf16", re.compile(r"\bBF16\b|\bBFloat16\b")),
                   ("fp32", re.compile(r"\bFloat\b|\bFP32\b")))
_RANK = ["int8", "fp8", "fp16", "bf16", "fp32"]
_DATA_MOVEMENT = re.compile(r"quantize|reformat|copy|shuffle|cast", re.IGNORECASE)  # matches Dequantize too


def _tensor_precision(t: dict) -> str | None:
    # 11: separate "DataType" ("Half", "Int8", "Float"); 10: one "Format/Datatype" string ("Row major linear FP16")
    text = " ".join(str(t.get(k, "")) for k in ("DataType", "Format/Datatype", "Format"))
    for name, pat in _DTYPE_PATTERNS:
        if pat.search(text):
            return name
    return None


def layer_precision_summary(engine_info: dict) -> dict:
    """Count layers by the lowest float/int8 precision among their tensors (a Q/DQ-fused GEMM reads INT8 and writes
    Half or Float: it counts as INT8). Layers that only move integers or shapes count as "other"."""
    counts = {k: 0 for k in (*_RANK, "other")}
    per_type: dict[str, dict[str, int]] = {}
    int8_compute = 0
    for layer in engine_info.get("Layers", []):
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY verbosity gives bare names
            counts["other"] += 1
            continue
        precs = {_tensor_precision(t) for t in (*layer.get("Inputs", []), *layer.get("Outputs", []))
                 if isinstance(t, dict)} - {None}
        p = min(precs, key=_RANK.index) if precs else "other"
        counts[p] += 1
        kind = str(layer.get("LayerType", "?"))
        # a lone Quantize/Reformat touching Int8 is no INT8 math (TensorRT #4554: "INT8" engines no faster than FP16)
        # (by LayerType only: a fused GEMM's name often contains its DequantizeLinear's name)
        if p == "int8" and not _DATA_MOVEMENT.search(kind):
            int8_compute += 1
        per_type.setdefault(kind, {}).setdefault(p, 0)
        per_type[kind][p] += 1
    return {"layers": sum(counts.values()), "by_precision": counts, "int8_compute_layers": int8_compute,
            "by_layer_type": per_type}


def check_precision_proof(summary: dict, precision: str) -> None:
    if precision in ("fp16", "int8") and summary["by_precision"].get(precision, 0) == 0:
        raise UserError(f"the {precision} engine has no {precision.upper()} layer ({summary['by_precision']}) — "
                        f"the graph's precision did not survive the build; check the stage-2 graph and build.log")
    if precision == "int8" and summary.get("int8_compute_layers", 0) == 0:
        raise UserError("the int8 engine has INT8 tensors only in quantize/reformat layers, no INT8 math — the Q/DQ "
                        "pairs were not fused into GEMMs; check the stage-2 Q/DQ placement and build.log")


# ---- trtexec -------------------------------------------------------------------------------------------------------
def _spec(shapes: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in v[which])}" for name, v in shapes.items())


def trtexec_command(*, onnx: Path, out_dir: Path, profiles: list[dict], s: EngineSettings,
                    timing_cache: Path) -> list[str]:
    """The same build through trtexec 11: same profiles, workspace, optimization level, timing cache and layer
    information. No precision flag: 11 removed --fp16/--int8/--best; the graph carries the precision."""
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={out_dir / 'model.plan'}"]
    for i, p in enumerate(profiles):
        cmd += [f"--profile={i}", f"--minShapes={_spec(p['shapes'], 'min')}",
                f"--optShapes={_spec(p['shapes'], 'opt')}", f"--maxShapes={_spec(p['shapes'], 'max')}"]
    cmd += [f"--memPoolSize=workspace:{s.workspace_mib}M", f"--builderOptimizationLevel={s.opt_level}",
            f"--timingCacheFile={timing_cache}", "--profilingVerbosity=detailed",
            f"--exportLayerInfo={out_dir / 'layers.json'}", "--skipInference"]
    return cmd


def engine_dir(s: EngineSettings, tag: str, suffix: str = "") -> Path:
    from lmopt.paths import stage_dir

    return stage_dir(s.artifacts, s.model, "engine", f"{tag}-{s.precision}{suffix}")


def timing_cache_path(s: EngineSettings, tag: str) -> Path:
    if s.timing_cache:
        return Path(s.timing_cache)
    return engine_dir(s, tag).parent / f"timing-{tag}.cache"


# ---- the build -------------------------------------------------------------------------------------------------------
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

    if s.record_trtexec:
        return record_trtexec_build(Path(s.record_trtexec), s, onnx_path, upstream, shape, graph, profiles)
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


def record_trtexec_build(folder: Path, s: EngineSettings, onnx_path: Path, upstream: dict, shape: dict, graph: dict,
                         profiles: list[dict]) -> dict:
    """Manifest for an engine that trtexec_command.sh built into `folder` (its staging folder): the precision proof
    from trtexec's --exportLayerInfo, the command, the build time. Validation against ONNX Runtime needs the Python
    runtime: build with build_trt_engine.py for that."""
    from lmopt.manifest import file_entry, write_manifest
    from lmopt.paths import model_slug

    layers = folder / "layers.json"
    if not (folder / "model.plan").is_file() or not layers.is_file():
        raise UserError(f"{folder} lacks model.plan or layers.json — trtexec did not finish; see {folder / 'build.log'}")
    summary = layer_precision_summary(json.loads(layers.read_text()))
    check_precision_proof(summary, s.precision)
    log.info("layers by precision: %s", summary["by_precision"])
    files = {n: file_entry(folder / n) for n in ("model.plan", "layers.json", "build.log") if (folder / n).is_file()}
    tag = folder.name.lstrip(".").split("-")[0]
    man = {"stage": "engine", "variant": f"{tag}-{s.precision}-trtexec", "model": model_slug(s.model),
           "model_spec": s.model, "precision": s.precision, "engine": "tensorrt-trtexec", "tensorrt_version": tag[3:],
           "model_shape": shape, "inputs": {"onnx": file_entry(onnx_path), "onnx_variant": upstream.get("variant")},
           "outputs": {"engine": "model.plan", "layer_info": "layers.json", "build_log": "build.log", "files": files},
           "profiles": profiles, "limits": resolved_lengths(shape, s), "graph": graph, "layer_precision": summary,
           "settings": asdict(s), "timings_s": {"trtexec_s": s.trtexec_seconds},
           "validation": {"passed": None, "checks": [], "note": "not validated against ONNX Runtime: use "
                          "build_trt_engine.py for a validated engine"}}
    write_manifest(folder, man)
    return man


def validate_engine(trt_engine, onnx_path: Path, s: EngineSettings, shape: dict):
    """Engine vs ONNX Runtime (CPU) on fixed inputs: logits of a batch-2 prefill and decode steps, greedy tokens.

    The reference is the stage-1 FP32 export when present (what the user's accuracy is measured against), else the
    input graph itself."""
    import numpy as np

    from lmopt.data import builtin_text
    from lmopt.engines import find_onnx, onnx_file
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EngineSettings()
    p.add_argument("--model", default=d.model, help="tiny (built-in), a preset, a local HF folder or a hub id")
    p.add_argument("--artifacts", default=d.artifacts, help="artifacts root folder")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="which stage-2 graph to build from (the graph decides the engine's precision)")
    p.add_argument("--onnx", default=d.onnx, help="build from this ONNX file instead of the stage-2 output")
    p.add_argument("--min-batch", type=int, default=d.min_batch)
    p.add_argument("--opt-batch", type=int, default=d.opt_batch)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="prompt + generated tokens (0 = the model's context, at most 1024)")
    p.add_argument("--opt-prompt-len", type=int, default=d.opt_prompt_len, help="0 = max-seq-len / 4")
    p.add_argument("--opt-past-len", type=int, default=d.opt_past_len, help="0 = max-seq-len / 2")
    p.add_argument("--workspace-mib", type=int, default=d.workspace_mib, help="workspace memory-pool limit")
    p.add_argument("--opt-level", type=int, default=d.opt_level, help="builder optimization level 0..5")
    p.add_argument("--timing-cache", default=d.timing_cache, help="timing cache file (read and updated)")
    p.add_argument("--greedy-tokens", type=int, default=d.greedy_tokens)
    p.add_argument("--atol", type=float, default=d.atol, help="max |Δlogits| vs ONNX Runtime (0 = per precision)")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement,
                   help="fraction of greedy tokens that must match (0 = per precision)")
    p.add_argument("--skip-if-unavailable", action="store_true",
                   help="without TensorRT or a GPU, print a note and exit 0 (make demo)")
    p.add_argument("--emit-trtexec", action="store_true", help="print the equivalent trtexec command and exit")
    p.add_argument("--trt-version", default=d.trt_version,
                   help="with --emit-trtexec: TensorRT version for the engine folder name when it is not installed")
    p.add_argument("--record-trtexec", default=d.record_trtexec, help=argparse.SUPPRESS)  # trtexec_command.sh
    p.add_argument("--trtexec-seconds", type=float, default=d.trtexec_seconds, help=argparse.SUPPRESS)
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = EngineSettings(**{f.name: getattr(args, f.name) for f in fields(EngineSettings)})
    t0 = time.time()
    man = build_engine(settings=settings)
    if man is not None:
        log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
