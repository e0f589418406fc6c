"""What a TensorRT engine build needs besides TensorRT itself, shared by the two ways stage 3 builds an engine
(optimize/build_trt_engine.py through the Python API; optimize/trtexec_command.sh through trtexec):

- the settings and their checks; the stage-2 graph to build from (lmopt.artifacts) and its inputs;
- shapes -> the two optimization profiles (prefill, decode) for every KV-cache input;
- the precision proof from the engine inspector's layer information (an "fp16"/"int8" engine without a single layer
  in that precision fails);
- the exact trtexec command, and the manifest of an engine trtexec built:

    python -m lmopt.trt_build record --folder DIR --seconds S [build flags]   # what trtexec_command.sh runs
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lmopt.errors import UserError, cli_main
from lmopt.log import add_verbosity_args, get_logger, setup_logging

log = get_logger("trt_build")

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
    precision: str = "fp16"        # which stage-2 graph to build from (the graph decides the engine's precision)
    onnx: str = ""                 # explicit ONNX file instead of the stage-2 output found through its manifest
    min_batch: int = 1
    opt_batch: int = 1             # the batch TensorRT tunes kernels for
    max_batch: int = 8
    max_seq_len: int = 0           # prompt + generated tokens (0 = the model's context, at most 1024)
    opt_prompt_len: int = 0        # prefill length tuned for; 0 = max_seq_len // 4
    opt_past_len: int = 0          # decode past length tuned for; 0 = max_seq_len // 2
    workspace_mib: int = 4096      # workspace memory-pool limit
    opt_level: int = 3             # builder optimization level 0..5 (TensorRT's default is 3)
    timing_cache: str = ""         # "" = artifacts/<model>/engine/timing-trt<ver>.cache
    greedy_tokens: int = 32
    atol: float = 0.0              # max |Δlogits| vs ONNX Runtime (0 = per precision)
    min_agreement: float = 0.0     # fraction of greedy tokens that must match (0 = per precision)
    skip_if_unavailable: bool = False  # without TensorRT or a GPU, print a note and exit 0 (make demo)
    emit_trtexec: bool = False     # print the equivalent trtexec command and exit (optimize/trtexec_command.sh)
    trt_version: str = ""  # with --emit-trtexec: TensorRT version for the engine folder name when it is not installed


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
    from lmopt.artifacts import find_onnx, onnx_file
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


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The build's arguments, shared by optimize/build_trt_engine.py and the trtexec wrapper's record step."""
    from lmopt import cli

    cli.add_settings(p, EngineSettings, choices={"precision": PRECISIONS}, verbosity=False)


def record_trtexec_build(folder: Path, s: EngineSettings, onnx_path: Path, upstream: dict, shape: dict, graph: dict,
                         profiles: list[dict], seconds: float) -> dict:
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
           "settings": asdict(s), "timings_s": {"trtexec_s": seconds},
           "validation": {"passed": None, "checks": [], "note": "not validated against ONNX Runtime: use "
                          "build_trt_engine.py for a validated engine"}}
    write_manifest(folder, man)
    return man


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmopt.trt_build", description="record the manifest of an engine "
                                "optimize/trtexec_command.sh built (not meant to be run by hand)")
    p.add_argument("command", choices=["record"])
    p.add_argument("--folder", required=True, help="the staging folder trtexec built into")
    p.add_argument("--seconds", type=float, required=True, help="how long trtexec ran")
    add_engine_args(p)
    add_verbosity_args(p)
    args = p.parse_args(argv)
    setup_logging(args)
    s = EngineSettings(**{f.name: getattr(args, f.name) for f in fields(EngineSettings) if hasattr(args, f.name)})
    onnx_path, upstream, shape = locate_onnx(s)
    graph = inspect_onnx(onnx_path)
    check_graph_precision(onnx_path, graph, s.precision)
    profiles = derive_profiles(shape, graph["inputs"], s)
    record_trtexec_build(Path(args.folder), s, onnx_path, upstream, shape, graph, profiles, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
