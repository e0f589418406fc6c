"""Where a CPU decode step of an ONNX Runtime engine goes, per operator type: ONNX Runtime's own profiler over the
decode steps of one greedy generation (its prefill's events are left out), then over the prefills of
--prefill-runs more generations of one token each (the warm prompt pass, reported apart as "prefill").

    python profile/decode_ops.py --model tiny --rows ort:fp32,ort:int8,ort-gqa:fp32 --threads 2
    python profile/decode_ops.py --model llama-small --rows ort-gqa:int4 --prompt 128

Reads:  the engines' graphs (stage 1/2 artifacts, found by lmopt.engines.create_engine).
Writes: artifacts/<model>/profile/decode-ops-cpu.json (or --out): per row, decode ms/step (our loop's clock), ONNX
        Runtime's model_run ms/step and the sum of its kernels, and per operator type the ms/step, the share of kernel
        time and the nodes run per step. Profiling adds overhead to every node: compare shares, not the absolute
        figures with the benchmark's.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging

log = get_logger("decode-ops")


@dataclass
class DecodeOpsSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    rows: str = "ort:fp32,ort:int8,ort-gqa:fp32"   # comma-separated engine:precision (ONNX Runtime engines)
    prompt: int = 128                # prompt tokens
    max_new_tokens: int = 33         # generated tokens (max_new_tokens - 1 decode steps are profiled)
    threads: int = 2
    prefill_runs: int = 3            # warm prefills profiled after the generation (0: decode only)
    out: str = ""                    # result file (default artifacts/<model>/profile/decode-ops-cpu.json)


def profile_row(engine_name: str, precision: str, s: DecodeOpsSettings, prompt: list[int]) -> dict:
    import onnxruntime as ort

    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate

    eng = create_engine(engine_name, s.model, precision=precision, artifacts=s.artifacts, threads=s.threads)
    if not hasattr(eng, "session"):
        raise UserError(f"engine '{engine_name}' is not an ONNX Runtime engine — profile ort or ort-gqa rows")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmopt-ops-") as d:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(d) / "ort")
        so.intra_op_num_threads, so.inter_op_num_threads = s.threads, 1
        so.log_severity_level = 3
        eng.session = ort.InferenceSession(str(eng.info.source), so, providers=["CPUExecutionProvider"])
        out = generate(eng, [prompt], SamplingParams(max_new_tokens=s.max_new_tokens))
        prefill_s = [generate(eng, [prompt], SamplingParams(max_new_tokens=1)).ttft_s for _ in range(s.prefill_runs)]
        events = json.loads(Path(eng.session.end_profiling()).read_text())
    eng.close()
    runs = [e for e in events if e.get("name") == "model_run"]
    extra = runs[len(runs) - s.prefill_runs:]  # the one-token generations' prefills come last
    runs = runs[: len(runs) - s.prefill_runs]
    t0 = runs[1]["ts"]  # the first run is the prefill
    t1 = extra[0]["ts"] if extra else float("inf")
    steps = len(runs) - 1
    ms, nodes = _ops(events, t0, t1)
    kernel = sum(ms.values())
    row = {"engine": engine_name, "precision": precision, "variant": eng.info.variant, "decode_steps": steps,
            "decode_ms_per_step": round(sum(out.step_s) / len(out.step_s) * 1e3, 4),
            "model_run_ms_per_step": round(sum(r["dur"] for r in runs[1:]) / steps / 1e3, 4),
            "kernel_ms_per_step": round(kernel / steps, 4),
            "nodes_per_step": round(sum(nodes.values()) / steps, 1),
            "ops": {op: {"ms_per_step": round(v / steps, 4), "share": round(v / kernel, 4),
                         "nodes_per_step": round(nodes[op] / steps, 1)} for op, v in ms.most_common()}}
    if extra:
        pms, pnodes = _ops(events, t1, float("inf"))
        pk, n = sum(pms.values()), len(extra)
        row["prefill"] = {"prompt_tokens": len(prompt), "runs": n,
                          "ttft_ms": round(sum(prefill_s) / n * 1e3, 4),
                          "model_run_ms": round(sum(r["dur"] for r in extra) / n / 1e3, 4),
                          "kernel_ms": round(pk / n, 4),
                          "ops": {op: {"ms": round(v / n, 4), "share": round(v / pk, 4),
                                       "nodes": round(pnodes[op] / n, 1)} for op, v in pms.most_common()}}
    return row


def _ops(events: list, t0: float, t1: float):
    """Kernel ms and node count per operator type over the profiler's node events in [t0, t1)."""
    import collections

    ms, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and t0 <= e["ts"] < t1:
            op = e["args"].get("op_name", "?")
            ms[op] += e["dur"] / 1e3
            nodes[op] += 1
    return ms, nodes


def run(*, settings: DecodeOpsSettings) -> dict:
    from lmopt.data import builtin_text
    from lmopt.models import load_tokenizer
    from lmopt.paths import stage_dir
    from lmopt.results import envelope, versions, write_json

    s = settings
    rows = []
    for item in [x.strip() for x in s.rows.split(",") if x.strip()]:
        if ":" not in item:
            raise UserError(f"--rows takes engine:precision items like ort:int8 (got '{item}')")
        rows.append(tuple(item.split(":", 1)))
    if not rows:
        raise UserError("--rows is empty — give engine:precision items like ort:fp32,ort:int8")
    prompt = load_tokenizer(s.model)(builtin_text("eval"))["input_ids"][: s.prompt]
    results = []
    for e, p in rows:
        r = profile_row(e, p, s, prompt)
        log.info("%s %s: decode %.2f ms/step, %.0f nodes/step, kernels %.2f ms (%s)", e, p, r["decode_ms_per_step"],
                 r["nodes_per_step"], r["kernel_ms_per_step"],
                 ", ".join(f"{op} {v['share']:.0%}" for op, v in list(r["ops"].items())[:4]))
        if "prefill" in r:
            pf = r["prefill"]
            log.info("%s %s: prefill of %d tokens %.2f ms, kernels %.2f ms (%s)", e, p, pf["prompt_tokens"],
                     pf["ttft_ms"], pf["kernel_ms"],
                     ", ".join(f"{op} {v['share']:.0%}" for op, v in list(pf["ops"].items())[:4]))
        results.append(r)
    doc = envelope("decode-ops", settings=asdict(s), versions=versions("onnxruntime", "torch"), model=s.model,
                   rows=results)
    out = Path(s.out) if s.out else stage_dir(s.artifacts, s.model, "profile", "decode-ops-cpu.json")
    write_json(out, doc)
    log.info("Saving decode-ops profile to %s", out)
    return doc


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_settings(p, DecodeOpsSettings)
    args = p.parse_args(argv)
    setup_logging(args)
    run(settings=cli.settings_from(DecodeOpsSettings, args))
    return 0


if __name__ == "__main__":
    cli.run(main)
