"""Benchmark the served non-streaming model with Triton's real perf_analyzer: concurrency and request-rate sweeps.

    python profile/perf_analyzer_sweep.py --model tiny --url 127.0.0.1:8001 --label batching-on
    python profile/perf_analyzer_sweep.py --concurrency 1,2,4,8 --request-rate 2,4 --max-new-tokens 16

Needs a running server (bash serve/run_triton.sh, or `make serve-bench`, which starts and stops it).

Reads:  data/eval.txt (held-out text: prompts of --prompt-tokens tokens), the model's tokenizer
Writes: artifacts/<model>/profile/serving-pa-<label>/input_data.json  (perf_analyzer --input-data file)
        artifacts/<model>/profile/serving-pa-<label>/<mode><N>.csv      (perf_analyzer -f output, one per level)
        artifacts/<model>/profile/serving-pa-<label>.json               (result: settings, raw CSV rows, summary)

perf_analyzer comes from the pinned tritonclient 2.51.0 wheel (the only one whose binary runs on glibc 2.36, see
docs/ENVIRONMENT.md); its libb64/libcudart are linked from nvidia_pytriton.libs into a folder inside the venv
by `perf_analyzer_env()`, so nothing is set up by hand. One perf_analyzer run per level, so Triton's statistics
(requests vs model executions: the dynamic batcher at work) are recorded per level. perf_analyzer only sees the
first response of a decoupled model (Triton server #4530), so streaming metrics come from load_generator.py.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.serving import PerfAnalyzerSettings

log = get_logger("perf_analyzer")


def perf_analyzer_env() -> tuple[str, dict[str, str]]:
    """(binary, environment) for the perf_analyzer of the tritonclient wheel.

    tritonclient 2.51.0's binary needs libb64.so.0d and libcudart.so.12, which are not installed system-wide; the
    nvidia-pytriton wheel ships both under mangled names, so link them under the names the binary asks for.
    """
    exe = Path(sys.executable).parent / "perf_analyzer"
    binary = str(exe) if exe.is_file() else shutil.which("perf_analyzer")
    if not binary:
        raise UserError("perf_analyzer not found — pip install tritonclient[grpc,http]==2.51.0 (make setup)")
    env = dict(os.environ)
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # located, not imported: only its bundled libraries are needed
    if spec is None or not spec.origin:
        raise UserError("nvidia-pytriton is not installed — pip install nvidia-pytriton==0.7.0 (make setup)")
    libs = Path(spec.origin).resolve().parent.parent / "nvidia_pytriton.libs"
    link_dir = Path(sys.prefix) / "lib" / "perf_analyzer_libs"
    link_dir.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        if not found:
            raise UserError(f"{libs} has no {pattern} — reinstall nvidia-pytriton==0.7.0")
        link = link_dir / name
        if not link.exists():
            tmp = link_dir / f".{name}.{os.getpid()}"
            tmp.symlink_to(found[0])
            os.replace(tmp, link)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(link_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def write_input_data(path: Path, prompts: list[str], s: PerfAnalyzerSettings) -> Path:
    """perf_analyzer --input-data JSON: one entry per prompt (shape excludes the batch dimension)."""
    from lmopt.results import write_json
    from lmopt.triton_client import GenRequest, perf_analyzer_entry

    names = {"max_tokens": s.max_tokens_input}
    if s.prompt_input == "input_ids":  # the prompt as token ids (no STRING tensor)
        from lmopt.models import load_tokenizer

        tok = load_tokenizer(s.model)
        reqs = [GenRequest(input_ids=tok(p)["input_ids"], max_tokens=s.max_new_tokens, names=names) for p in prompts]
    else:
        reqs = [GenRequest(prompt=p, max_tokens=s.max_new_tokens, names={**names, "text_input": s.prompt_input})
                for p in prompts]
    write_json(path, {"data": [perf_analyzer_entry(r) for r in reqs]})
    return path


def parse_csv(path: Path) -> list[dict]:
    """perf_analyzer's -f CSV -> rows of project fields (latencies in ms, throughput in requests/s).

    The CSV's latency columns are microseconds; the first column is "Concurrency" or "Request Rate".
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        r = {k.strip(): v.strip() for k, v in r.items() if k}
        level_key = "Concurrency" if "Concurrency" in r else "Request Rate"
        us = {k: float(r[k]) for k in r if k not in (level_key, "Inferences/Second") and _is_number(r[k])}
        row = {"mode": "concurrency" if level_key == "Concurrency" else "request_rate",
               "level": float(r[level_key]), "throughput_rps": float(r["Inferences/Second"])}
        for col, key in (("p50 latency", "p50"), ("p90 latency", "p90"), ("p95 latency", "p95"),
                         ("p99 latency", "p99"), ("Avg latency", "mean")):
            if col in us:
                row[f"latency_ms_{key}"] = us[col] / 1000.0
        row["server_ms"] = {k: us[k] / 1000.0 for k in ("Server Queue", "Server Compute Input",
                                                         "Server Compute Infer", "Server Compute Output") if k in us}
        row["raw"] = r
        out.append(row)
    return out


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _levels(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be a comma list of numbers (got '{text}')") from None
    if any(v <= 0 for v in vals):
        raise UserError(f"--{what} values must be > 0 (got '{text}')")
    return vals


def run_sweep(*, settings: PerfAnalyzerSettings) -> dict:
    from lmopt.serving import held_out_prompts, model_stats, result_path, stats_delta, wait_ready, write_result

    s = settings
    conc = [int(c) for c in _levels(s.concurrency, "concurrency")]
    rates = _levels(s.request_rate, "request-rate")
    if not conc and not rates:
        raise UserError("nothing to run — give --concurrency and/or --request-rate levels")
    if s.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0 (got {s.max_new_tokens})")
    binary, env = perf_analyzer_env()
    wait_ready(s.url, s.triton_model, 10.0)
    out_json = result_path(s.artifacts, s.model, f"pa-{s.label}")
    work = out_json.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    inputs = write_input_data(work / "input_data.json", held_out_prompts(s.model, s.num_prompts, s.prompt_tokens), s)
    log.info("Saving perf_analyzer input data to %s", inputs)

    rows, runs = [], []
    plan = [("concurrency", c) for c in conc] + [("request_rate", r) for r in rates]
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        tqdm = lambda x, **k: x  # noqa: E731
    for mode, level in tqdm(plan, desc="perf_analyzer", unit="level"):
        csv_path = work / f"{mode}{level:g}.csv"
        cmd = [binary, "-m", s.triton_model, "-u", s.url, "-i", "grpc", "--input-data", str(inputs),
               "--measurement-mode", "count_windows", "--measurement-request-count", str(s.measurement_requests),
               "--stability-percentage", f"{s.stability_percentage:g}", "--max-trials", str(s.max_trials),
               "--percentile", "95", "-f", str(csv_path)]
        cmd += ["--concurrency-range", f"{level}:{level}"] if mode == "concurrency" else \
            ["--request-rate-range", f"{level:g}:{level:g}"]
        before = model_stats(s.url, s.triton_model)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"perf_analyzer ran over {s.timeout_s:g} s at {mode} {level:g} — lower "
                            "--measurement-requests or raise --timeout-s") from None
        wall = time.perf_counter() - t0
        after = model_stats(s.url, s.triton_model)
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[:400]
        if proc.returncode != 0 and "stable measurement" in tail:
            # a noisy machine: keep the other levels, record this one as unmeasured (never as a number)
            log.warning("perf_analyzer found no stable measurement at %s %g — recorded as unstable", mode, level)
            rows.append({"mode": mode, "level": level, "unstable": True, "error": tail,
                         "server_stats": stats_delta(before, after)})
            runs.append({"mode": mode, "level": level, "command": cmd, "wall_s": round(wall, 2), "error": tail})
            continue
        if proc.returncode != 0 or not csv_path.is_file():
            raise UserError(f"perf_analyzer failed at {mode} {level:g} (exit {proc.returncode}): {tail}")
        parsed = parse_csv(csv_path)
        for r in parsed:
            r["server_stats"] = stats_delta(before, after)
            r["csv"] = csv_path.name
        rows += parsed
        runs.append({"mode": mode, "level": level, "command": cmd, "wall_s": round(wall, 2),
                     "stdout_tail": proc.stdout.strip().splitlines()[-12:]})
        log.info("Saving %s (%s %g: %.1f req/s, p95 %.1f ms, %.2f requests per execution; %.1f s)", csv_path, mode,
                 level, parsed[0]["throughput_rps"], parsed[0].get("latency_ms_p95", float("nan")),
                 parsed[0]["server_stats"]["requests_per_execution"] or 0, wall)

    if all(r.get("unstable") for r in rows):
        log.warning("perf_analyzer found no stable measurement at any level — raise --measurement-requests or "
                    "--stability-percentage, or run on a quieter machine")
    summary = [{k: r[k] for k in r if k not in ("raw", "csv", "error")} for r in rows]
    write_result(out_json, "perf_analyzer", asdict(s), {"csv_rows": rows, "runs": runs}, summary,
                 {"tool": {"binary": binary, "protocol": "grpc"}, "input_data": str(inputs)})
    log.info("Saving results to %s", out_json)
    _print_table(summary, s)
    return {"path": str(out_json), "summary": summary}


def _print_table(summary: list[dict], s: PerfAnalyzerSettings) -> None:
    print(f"perf_analyzer {s.triton_model} [{s.label}] prompt {s.prompt_tokens} tok, max_tokens {s.max_new_tokens}")
    print(f"{'mode':>12} {'level':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/exec':>8}")
    for r in summary:
        if r.get("unstable"):
            print(f"{r['mode']:>12} {r['level']:>6g}  no stable measurement")
            continue
        print(f"{r['mode']:>12} {r['level']:>6g} {r['throughput_rps']:>8.2f} {r.get('latency_ms_p50', 0):>8.1f} "
              f"{r.get('latency_ms_p95', 0):>8.1f} {r.get('latency_ms_p99', 0):>8.1f} "
              f"{r['server_stats']['requests_per_execution'] or 0:>8.2f}")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, PerfAnalyzerSettings)
    return p


main = cli.main_for(build_parser, PerfAnalyzerSettings, run_sweep)


if __name__ == "__main__":
    cli.run(main)
