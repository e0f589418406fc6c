"""Benchmark the served model end to end: dynamic batching on vs off (or in-flight vs static batching),
perf_analyzer and streaming sweeps, overhead.

    python profile/serve_bench.py --model tiny                      # what `make serve-bench` runs
    python profile/serve_bench.py --model tiny --compare scheduler  # in-flight (lmopt.scheduler) vs static batching
    python profile/serve_bench.py --concurrency 1,4 --requests 8 --measurement-requests 20   # a quick look

Reads:  artifacts/<model>/serve/<variant>/manifest.json + model_repository (make serve-repo); newest variant unless
        --serve-variant names one
Writes: artifacts/<model>/profile/serving-repos/<variant>-batching-off/  the same repository without dynamic batching
        artifacts/<model>/profile/serving-pa-batching-{on,off}.json        perf_analyzer sweeps (perf_analyzer_sweep.py)
        artifacts/<model>/profile/serving-stream-batching-{on,off}.json    streaming sweeps (load_generator.py)
        artifacts/<model>/profile/serving-batching.json                    on vs off side by side, with the verdict
        with --compare scheduler: serving-repos/<variant>-static/, serving-{pa,stream}-{inflight,static}.json and
        serving-scheduler.json (in-flight vs static side by side)
        artifacts/<model>/profile/serving-stream-floor.json                lm_empty at concurrency 1 (the floor)

Same model, same load, two server configs: the repository made by serve/make_model_repository.py (dynamic batching)
and a copy whose config.pbtxt files lose only the `dynamic_batching { ... }` block (max_batch_size and every tensor
shape stay, so the clients send identical requests; Triton then runs each request alone). Both servers run at the
same time on free loopback ports, and each tool alternates between them, so machine noise hits both alike.
Serving overhead (Triton streaming vs the same engine in-process, concurrency 1) is measured on both servers, and
the floor under it on the first: the same stream from `lm_empty`, a decoupled model with no engine that sends
max_tokens responses at once (Triton's own cost per request and per response; serving-stream-floor.json).
--compare scheduler pairs the in-flight repository with a copy set to `batching: static` (Triton's dynamic batcher
groups requests and each execute() runs its group as one generation to the end: the behaviour before in-flight
batching), same engine, slots = max batch size.
The tools run as subprocesses in their own session, as the server does (see _run_tool: Linux autogroup).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, timed
from lmopt.serving import LoadSettings, PerfAnalyzerSettings

log = get_logger("serve_bench")
RUN_TRITON = Path(__file__).resolve().parent.parent / "serve" / "run_triton.sh"
PAIRS = {"batching": ("batching-on", "batching-off"), "scheduler": ("inflight", "static")}
CONFIGS = PAIRS["batching"]
EMPTY_MODEL = re.compile(r'key: "engine" value: \{ string_value: "empty" \}')


@dataclass
class ServeBenchSettings:
    # the tools' own defaults, so one load definition holds for every script
    model: str = "tiny"
    artifacts: str = "artifacts"
    serve_variant: str = ""          # artifacts/<model>/serve/<variant>; empty = the newest one
    host: str = "127.0.0.1"                                               # address both servers bind to
    concurrency: str = LoadSettings.concurrency                           # both tools
    request_rate: str = PerfAnalyzerSettings.request_rate                 # perf_analyzer only
    prompt_tokens: int = LoadSettings.prompt_tokens
    max_new_tokens: int = LoadSettings.max_new_tokens
    measurement_requests: int = PerfAnalyzerSettings.measurement_requests
    stability_percentage: float = PerfAnalyzerSettings.stability_percentage
    requests: int = LoadSettings.requests                                 # load generator, per level
    duration_s: float = LoadSettings.duration_s
    overhead_requests: int = 24      # concurrency-1 requests for the serving-overhead comparison
    startup_timeout_s: float = 180.0
    prompt_input: str = LoadSettings.prompt_input   # "input_ids": both tools send token ids instead of text
    compare: str = "batching"        # batching: dynamic batching on vs off; scheduler: in-flight vs static batching
    skip_perf_analyzer: bool = False  # streaming sweeps, overhead and floor only (no perf_analyzer sweeps)
    skip_floor: bool = False          # skip streaming from lm_empty (no engine) at concurrency 1: Triton's own floor


def pick_serve_variant(artifacts: str, model: str, variant: str) -> tuple[Path, dict]:
    from lmopt.manifest import list_variants, load_stage
    from lmopt.paths import stage_dir

    if variant:
        return load_stage(artifacts, model, "serve", variant)
    found = list_variants(artifacts, model, "serve")
    if not found:
        model_arg = "" if model == "tiny" else f" MODEL={model}"
        raise UserError(f"no model repository under {stage_dir(artifacts, model, 'serve', '')} — run: make "
                        f"serve-repo{model_arg}")
    name = max(found, key=lambda v: found[v].get("created", ""))
    return stage_dir(artifacts, model, "serve", name), found[name]


def batching_off_repository(src_repo: Path, dst: Path) -> Path:
    """Copy a model repository with each config.pbtxt's dynamic_batching block removed (nothing else changes)."""
    from lmopt.paths import staging_dir

    block = re.compile(r"^dynamic_batching\s*\{[^{}]*\}\s*\n", re.M)
    with staging_dir(dst) as tmp:
        repo = tmp / "model_repository"
        shutil.copytree(src_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
        for cfg in sorted(repo.glob("*/config.pbtxt")):
            text, n = block.subn("# dynamic_batching removed by profile/serve_bench.py: one request per execution\n",
                                 cfg.read_text())
            if n > 1:  # none: the model already takes one request per execution (in-flight lm_stream)
                raise UserError(f"{cfg} has {n} dynamic_batching blocks (expected 0 or 1) — regenerate it: make "
                                "serve-repo")
            cfg.write_text(text)
    log.info("Saving batching-off repository to %s", dst / "model_repository")
    return dst / "model_repository"


def static_repository(src_repo: Path, dst: Path, queue_delay_us: int) -> Path:
    """Copy an in-flight model repository as the static-batching configuration: parameter `batching` set to static and
    a dynamic_batching block in every config (the same engine, tensors and max batch size)."""
    from lmopt.paths import staging_dir

    param = re.compile(r'(key: "batching" value: \{ string_value: )"inflight"')
    with staging_dir(dst) as tmp:
        repo = tmp / "model_repository"
        shutil.copytree(src_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
        for cfg in sorted(repo.glob("*/config.pbtxt")):
            if EMPTY_MODEL.search(cfg.read_text()):
                continue  # lm_empty has no engine to batch
            text, n = param.subn(r'\1"static"', cfg.read_text())
            if n != 1:
                raise UserError(f"{cfg} is not an in-flight batching repository — regenerate it: make serve-repo")
            text = re.sub(r"^# no dynamic batching:.*\n", "", text, flags=re.M)
            if not re.search(r"^dynamic_batching\s*\{", text, re.M):
                text = re.sub(r"^(max_batch_size: \d+\n)", rf"\1dynamic_batching {{\n  max_queue_delay_microseconds: "
                              rf"{queue_delay_us}\n}}\n", text, count=1, flags=re.M)
            cfg.write_text(text)
    log.info("Saving static-batching repository to %s", dst / "model_repository")
    return dst / "model_repository"


def free_ports(host: str, n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@contextmanager
def triton_server(repo: Path, host: str, pid_file: Path, timeout_s: float):
    """serve/run_triton.sh in the background on free ports; always stopped (with its backend stubs) on exit."""
    http, grpc, metrics = free_ports(host, 3)
    cmd = ["bash", str(RUN_TRITON), str(repo), "--background", "--pid-file", str(pid_file), "--host", host,
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--timeout", f"{timeout_s:.0f}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[:400]
        raise UserError(f"Triton did not start on {repo}: {tail}")
    log.info("triton up: %s (gRPC %s:%d, log %s.log)", repo, host, grpc, pid_file)
    try:
        yield f"{host}:{grpc}"
    finally:
        subprocess.run(["bash", str(RUN_TRITON), "stop", "--pid-file", str(pid_file)], capture_output=True, text=True)


def _run_tool(script: str, settings, result_name: str) -> dict:
    """Run a benchmark CLI with these settings in its own session; return its result file (+ "path").

    Own session because Linux groups CPU time per session (autogroup): tritonserver runs under setsid
    (serve/run_triton.sh), and a client left in a crowded session of a shared machine gets a smaller share than the
    server, which biases latencies and the in-process baseline. On a dedicated machine this changes nothing.
    """
    from lmopt.serving import result_path

    argv = []
    for f in fields(settings):
        v = getattr(settings, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            argv += [flag] if v else []
        else:
            argv += [flag, str(v)]
    if log.getEffectiveLevel() > 20:
        argv.append("-q")
    cmd = [sys.executable, str(Path(__file__).resolve().parent / script), *argv]
    proc = subprocess.run(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        raise UserError(f"{script} failed: {err[-1][7:] if err else 'exit ' + str(proc.returncode)}")
    path = result_path(settings.artifacts, settings.model, result_name)
    return {**json.loads(path.read_text()), "path": str(path)}


def _floor(result: dict) -> dict:
    """Triton's own cost from the lm_empty stream at concurrency 1: TTFT and per-response gap with no engine."""
    row = result["summary"][0]
    return {"requests": row.get("requests"), "ttft_ms": row["ttft_ms"], "itl_ms": row["itl_ms"],
            "result": result["path"]}


def compare(pa: dict[str, dict], st: dict[str, dict], configs: tuple[str, str] = CONFIGS) -> dict:
    """The first config ("on") vs the second ("off") per level: throughput ratio and p95 latency side by side; for
    dynamic batching on vs off the "+40% throughput" claim checked."""
    rows = []
    on, off = configs
    on_rows = {int(r["level"]): r for r in pa[on]["summary"] if r["mode"] == "concurrency"} if pa else {}
    off_rows = {int(r["level"]): r for r in pa[off]["summary"] if r["mode"] == "concurrency"} if pa else {}
    st_on = {r["concurrency"]: r for r in st[on]["summary"]}
    st_off = {r["concurrency"]: r for r in st[off]["summary"]}
    for level in sorted(set(on_rows) & set(off_rows) | set(st_on) & set(st_off)):
        a, b = on_rows.get(level), off_rows.get(level)
        row = {"concurrency": level}
        if a and b and not a.get("unstable") and not b.get("unstable"):
            row.update({
                "pa_rps_on": a["throughput_rps"], "pa_rps_off": b["throughput_rps"],
                "pa_throughput_ratio": a["throughput_rps"] / b["throughput_rps"],
                "pa_p95_ms_on": a["latency_ms_p95"], "pa_p95_ms_off": b["latency_ms_p95"],
                "pa_requests_per_execution_on": a["server_stats"]["requests_per_execution"],
                "pa_requests_per_execution_off": b["server_stats"]["requests_per_execution"],
            })
        c = level
        if c in st_on and c in st_off:
            x, y = st_on[c], st_off[c]
            row.update({
                "stream_tok_s_on": x["output_tok_per_s"], "stream_tok_s_off": y["output_tok_per_s"],
                "stream_throughput_ratio": (x["output_tok_per_s"] / y["output_tok_per_s"]
                                            if x["output_tok_per_s"] and y["output_tok_per_s"] else None),
                "stream_e2e_p95_ms_on": x["e2e_ms"]["p95"], "stream_e2e_p95_ms_off": y["e2e_ms"]["p95"],
                "stream_ttft_p95_ms_on": x["ttft_ms"]["p95"], "stream_ttft_p95_ms_off": y["ttft_ms"]["p95"],
                "stream_ttft_p50_ms_on": x["ttft_ms"]["p50"], "stream_ttft_p50_ms_off": y["ttft_ms"]["p50"],
            })
        rows.append(row)
    measured = [r for r in rows if "pa_throughput_ratio" in r]
    best = max(measured, key=lambda r: r["pa_throughput_ratio"], default=None)
    claim = None
    if best is not None and configs == PAIRS["batching"]:
        ok = best["pa_throughput_ratio"] >= 1.4 and best["pa_p95_ms_on"] <= best["pa_p95_ms_off"]
        claim = {
            "claim": "dynamic batching improves throughput by 40% with no latency trade-off",
            "best_concurrency": best["concurrency"], "throughput_ratio": best["pa_throughput_ratio"],
            "p95_ms_on": best["pa_p95_ms_on"], "p95_ms_off": best["pa_p95_ms_off"],
            "confirmed": ok,
            "levels_with_ratio_ge_1_4_and_p95_not_worse": [r["concurrency"] for r in measured
                                                           if r["pa_throughput_ratio"] >= 1.4
                                                           and r["pa_p95_ms_on"] <= r["pa_p95_ms_off"]],
        }
    return {"configs": list(configs), "rows": rows, "claim_40pct": claim}


def serve_bench(*, settings: ServeBenchSettings) -> dict:
    from lmopt.serving import result_path, write_result

    s = settings
    if not RUN_TRITON.is_file():
        raise UserError(f"missing {RUN_TRITON} — the serve stage is not in this checkout")
    folder, man = pick_serve_variant(s.artifacts, s.model, s.serve_variant)
    repo_on = folder / man.get("outputs", {}).get("model_repository", "model_repository")
    prof = result_path(s.artifacts, s.model, "x").parent
    srv = man.get("settings", {})
    if s.compare not in PAIRS:
        raise UserError(f"unknown --compare '{s.compare}' — use one of {', '.join(PAIRS)}")
    configs = PAIRS[s.compare]
    if s.compare == "scheduler":
        if man.get("batching", "static") != "inflight":
            raise UserError(f"{folder} serves static batching — rebuild it with in-flight batching: make serve-repo")
        repo_off = static_repository(repo_on, prof / "serving-repos" / f"{folder.name}-static",
                                     int(srv.get("queue_delay_us", 2000)))
    else:
        repo_off = batching_off_repository(repo_on, prof / "serving-repos" / f"{folder.name}-batching-off")
    pa_base = PerfAnalyzerSettings(model=s.model, artifacts=s.artifacts, concurrency=s.concurrency,
                                   request_rate=s.request_rate, prompt_tokens=s.prompt_tokens,
                                   max_new_tokens=s.max_new_tokens, measurement_requests=s.measurement_requests,
                                   stability_percentage=s.stability_percentage, prompt_input=s.prompt_input)
    ld_base = LoadSettings(model=s.model, artifacts=s.artifacts, concurrency=s.concurrency,
                           prompt_tokens=s.prompt_tokens, max_new_tokens=s.max_new_tokens, requests=s.requests,
                           prompt_input=s.prompt_input,
                           duration_s=s.duration_s, in_process=False, engine=man.get("engine", "ort"),
                           precision=man.get("precision", "fp32"), device=man.get("device", "cpu"), threads=int(srv.get("threads", 0) or 0))
    timings: dict[str, float] = {}
    pa, st, over, floor = {}, {}, {}, None
    with ExitStack() as stack:
        urls = {}
        with timed(log, "start both servers", timings, "startup_s"):
            for name, repo in zip(configs, (repo_on, repo_off)):
                urls[name] = stack.enter_context(triton_server(repo, s.host, prof / f".triton-{name}.pid",
                                                               s.startup_timeout_s))
        # each tool alternates between the two servers so both see the same machine
        with timed(log, "perf_analyzer sweeps", timings, "perf_analyzer_s"):
            for name in configs if not s.skip_perf_analyzer else ():
                pa[name] = _run_tool("perf_analyzer_sweep.py", replace(pa_base, url=urls[name], label=name),
                                     f"pa-{name}")
        with timed(log, "streaming sweeps", timings, "streaming_s"):
            for name in configs:
                st[name] = _run_tool("load_generator.py", replace(ld_base, url=urls[name], label=name),
                                     f"stream-{name}")
        with timed(log, "serving overhead", timings, "overhead_s"):
            for name in configs:
                r = _run_tool("load_generator.py", replace(ld_base, url=urls[name], label=f"overhead-{name}",
                                                           concurrency="1", requests=s.overhead_requests,
                                                           in_process=True), f"stream-overhead-{name}")
                over[name] = {k: v for k, v in r["overhead"].items() if k != "samples"}
                over[name]["result"] = r["path"]
        if not s.skip_floor:
            with timed(log, "floor (lm_empty)", timings, "floor_s"):
                r = _run_tool("load_generator.py", replace(ld_base, url=urls[configs[0]], label="floor",
                                                           triton_model="lm_empty", concurrency="1",
                                                           requests=s.overhead_requests), "stream-floor")
                floor = _floor(r)
    cmp = compare(pa, st, configs)
    summary = {**cmp, "overhead_c1": over, "floor_c1": floor,
               "results": {"perf_analyzer": {k: v["path"] for k, v in pa.items()},
                           "streaming": {k: v["path"] for k, v in st.items()}}}
    out = result_path(s.artifacts, s.model, s.compare)
    write_result(out, f"serving_{s.compare}_comparison", asdict(s), {}, summary,
                 {"serve_variant": folder.name, "serve_manifest": str(folder / "manifest.json"),
                  "repositories": {configs[0]: str(repo_on), configs[1]: str(repo_off)},
                  "timings_s": timings})
    log.info("Saving results to %s", out)
    _print(cmp, over, floor)
    return {"path": str(out), **summary}


def _print(cmp: dict, over: dict, floor: dict | None = None) -> None:
    on, off = cmp["configs"]
    print(f"{on} vs {off} (perf_analyzer, lm; streaming, lm_stream); 'on' = {on}, 'off' = {off}")
    print(f"{'conc':>4} {'req/s on':>9} {'off':>7} {'x':>5} {'p95 on':>8} {'off':>7} {'tok/s on':>9} {'off':>7} {'x':>5} "
          f"{'TTFT p50 on':>12} {'off':>7}")
    for r in cmp["rows"]:
        print(f"{r['concurrency']:>4g} {r.get('pa_rps_on', 0):>9.2f} {r.get('pa_rps_off', 0):>7.2f} "
              f"{r.get('pa_throughput_ratio', 0):>5.2f} {r.get('pa_p95_ms_on', 0):>8.1f} {r.get('pa_p95_ms_off', 0):>7.1f} "
              f"{r.get('stream_tok_s_on') or 0:>9.1f} {r.get('stream_tok_s_off') or 0:>7.1f} "
              f"{r.get('stream_throughput_ratio') or 0:>5.2f} {r.get('stream_ttft_p50_ms_on') or 0:>12.1f} "
              f"{r.get('stream_ttft_p50_ms_off') or 0:>7.1f}")
    c = cmp["claim_40pct"]
    if c:
        print(f"dynamic-batching +40% claim: {'confirmed' if c['confirmed'] else 'refuted'} (best: concurrency "
              f"{c['best_concurrency']:g}, {c['throughput_ratio']:.2f}x, p95 {c['p95_ms_on']:.1f} vs "
              f"{c['p95_ms_off']:.1f} ms)")
    for name, o in over.items():
        print(f"overhead [{name}]: TTFT p50 {o['overhead_ms']['ttft_p50']:+.2f} ms, ITL mean "
              f"{o['overhead_ms']['itl_mean']:+.3f} ms")
    if floor:
        print(f"floor [lm_empty, no engine]: TTFT p50 {floor['ttft_ms']['p50']:.2f} ms, ITL mean "
              f"{floor['itl_ms']['mean']:.3f} ms")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    d = ServeBenchSettings()
    cli.add_settings(p, ServeBenchSettings, skip=("concurrency", "request_rate", "prompt_tokens", "max_new_tokens", "measurement_requests",
             "stability_percentage", "requests", "duration_s", "prompt_input"))
    p.add_argument("--concurrency", default=d.concurrency)
    p.add_argument("--request-rate", default=d.request_rate, help="perf_analyzer request-rate levels ('' = none)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--measurement-requests", type=int, default=d.measurement_requests)
    p.add_argument("--stability-percentage", type=float, default=d.stability_percentage)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--prompt-input", default=d.prompt_input,
                   help="text_input (prompt as text) or input_ids (the tools tokenize and send INT64 ids)")
    return p


main = cli.main_for(build_parser, ServeBenchSettings, serve_bench)


if __name__ == "__main__":
    cli.run(main)
