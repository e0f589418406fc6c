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

--compare load is the serving benchmark instead (docs/serving_benchmark.md): one in-flight server (and the OpenAI
gateway in front of it); the workload (--workload random: --prompt-tokens / --max-new-tokens +- --length-spread,
fixed output lengths) through load_generator.py at the --concurrency levels and --open-loop-rates, with the engine's
ceiling, the in-process scheduler (--in-process-levels) and the endpoint vs gRPC (--endpoint-levels) in the same
run, the 1-stream overhead (--overhead-requests), lm_empty at --floor-levels, and a per-step timeline of the served
engine at --timeline-level (the server runs with LMOPT_STEP_TRACE set: lmopt.profiling.step_trace). Writes
serving-stream-load{,-floor,-timeline}.json, serving-timeline.json and serving-load.json (all of it, with each target
of LOAD_TARGETS and whether it was met).
    python profile/serve_bench.py --model tiny --compare load --concurrency 1,4 --open-loop-rates 20,inf \
        --prompt-tokens 64 --max-new-tokens 16 --requests 24 --duration-s 5 --floor-levels 4 --timeline-level 4
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import re
import shutil
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, timed
from lmopt.serving import LoadSettings, PerfAnalyzerSettings, free_ports

log = get_logger("serve_bench")
RUN_TRITON = Path(__file__).resolve().parent.parent / "serve" / "run_triton.sh"
PAIRS = {"batching": ("batching-on", "batching-off"), "scheduler": ("inflight", "static")}
# what the serving benchmark is measured against (the Llama-1B shape, FP16, compiled engine, on an H200); kept in the
# result with each figure and whether it was met, so a reader needs no other file
LOAD_TARGETS = {"tok_s_64": 18000.0, "ceiling_ratio_64": 0.75, "in_process_ratio_64": 0.8, "ttft_p50_ms_64": 30.0,
                "endpoint_ratio_64": 0.9, "overhead_ttft_ms": 2.0, "overhead_itl_pct": 10.0}
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
    # --compare load: the serving benchmark (docs/serving_benchmark.md); --concurrency is its closed-loop sweep
    workload: str = "random"          # random | corpus | fixed (lmopt.serving.build_workload)
    length_spread: float = LoadSettings.length_spread
    seed: int = LoadSettings.seed
    num_prompts: int = 256            # distinct requests of the workload (request i is item i mod this)
    open_loop_rates: str = ""         # Poisson request rates (req/s, inf = all at once) after the sweep
    rate_requests: int = 0            # requests per open-loop rate (0 = --requests)
    objective_ttft_ms: float = LoadSettings.objective_ttft_ms
    objective_itl_ms: float = LoadSettings.objective_itl_ms
    in_process_levels: str = "64"     # the same request stream through lmopt.scheduler in-process at these levels
    endpoint_levels: str = "64"       # OpenAI endpoint vs gRPC at these levels ('' = no gateway)
    floor_levels: str = "64,256"      # lm_empty (no engine) at these levels: Triton's own ceiling
    timeline_level: int = 64          # per-step timeline of the served engine at this level (0 = none)


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


@contextmanager
def triton_server(repo: Path, host: str, pid_file: Path, timeout_s: float, ports: list[int] | None = None):
    """serve/run_triton.sh in the background on free ports (or these: http, grpc, metrics); always stopped (with its
    backend stubs) on exit."""
    http, grpc, metrics = ports or free_ports(3, host)
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


def _tool_cmd(script: str, settings) -> list[str]:
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
    return [sys.executable, str(Path(__file__).resolve().parent / script), *argv]


def _start_tool(script: str, settings):
    """_run_tool's command started in the background (stderr to a temporary file); _finish_tool waits for it."""
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")
    return subprocess.Popen(_tool_cmd(script, settings), start_new_session=True, stderr=err, text=True), err


def _finish_tool(started, script: str, settings, result_name: str) -> dict:
    from lmopt.serving import result_path

    proc, err = started
    rc = proc.wait()
    err.seek(0)
    text = err.read()
    sys.stderr.write(text)
    if rc != 0:
        lines = [l for l in text.splitlines() if l.startswith("error:")]
        raise UserError(f"{script} failed: {lines[-1][7:] if lines else 'exit ' + str(rc)}")
    path = result_path(settings.artifacts, settings.model, result_name)
    return {**json.loads(path.read_text()), "path": str(path)}


def _run_tool(script: str, settings, result_name: str) -> dict:
    """Run a benchmark CLI with these settings in its own session; return its result file (+ "path").

    Own session because Linux groups CPU time per session (autogroup): tritonserver runs under setsid
    (serve/run_triton.sh), and a client left in a crowded session of a shared machine gets a smaller share than the
    server, which biases latencies and the in-process baseline. On a dedicated machine this changes nothing.
    """
    return _finish_tool(_start_tool(script, settings), script, settings, result_name)


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
    if s.compare == "load":
        if man.get("batching", "static") != "inflight":
            raise UserError(f"{folder} serves static batching — the load benchmark measures in-flight batching: "
                            "make serve-repo")
        return load_bench(s, folder, man, repo_on)
    if s.compare not in PAIRS:
        raise UserError(f"unknown --compare '{s.compare}' — use one of {', '.join(PAIRS)}, or load")
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


@contextmanager
def openai_gateway(grpc_url: str, host: str, timeout_s: float, port: int | None = None):
    """serve/openai_server.py in front of that Triton, on a free port (or this one), in its own session; stopped on
    exit."""
    import os
    import signal
    import time
    import urllib.request

    port = port or free_ports(1, host)[0]
    script = Path(__file__).resolve().parent.parent / "serve" / "openai_server.py"
    proc = subprocess.Popen([sys.executable, str(script), "--host", host, "--port", str(port), "--triton-grpc",
                             grpc_url, "-q"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if proc.poll() else []
                raise UserError(f"the OpenAI gateway did not come up at {url}: {' '.join(err) or 'timeout'}")
            time.sleep(0.3)
        log.info("openai gateway up: %s -> %s", url, grpc_url)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _row(rows: list, mode: str, level) -> dict | None:
    return next((r for r in rows if r["mode"] == mode and r["level"] == level), None)


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "window_perf_s"}


def load_targets(summary: dict) -> list[dict]:
    """Each target of LOAD_TARGETS with the measured figure and whether it was met (None: not measured)."""
    t, out = LOAD_TARGETS, []
    sweep = summary["sweep"]
    r64, r256 = _row(sweep, "concurrency", 64), _row(sweep, "concurrency", 256)

    def add(name, value, target, ok):
        out.append({"target": name, "value": value, "bar": target, "met": None if value is None else bool(ok)})

    v = r64["output_tok_per_s"] if r64 else None
    add("64 streams: output tokens/s >= bar", v, t["tok_s_64"], v is not None and v >= t["tok_s_64"])
    v = r64.get("served_over_ceiling") if r64 else None
    add("64 streams: served / engine ceiling >= bar", v, t["ceiling_ratio_64"], v is not None and v >= t["ceiling_ratio_64"])
    q = next((r for r in summary.get("in_process_scheduler") or [] if r["level"] == 64), None)
    v = q.get("served_over_in_process") if q else None
    add("64 streams: served / in-process scheduler >= bar", v, t["in_process_ratio_64"],
        v is not None and v >= t["in_process_ratio_64"])
    v = r64["ttft_ms"]["p50"] if r64 else None
    add("64 streams: TTFT p50 ms <= bar", v, t["ttft_p50_ms_64"], v is not None and v <= t["ttft_p50_ms_64"])
    if r256:
        add("256 streams: failed requests == bar", r256["failed"], 0, r256["failed"] == 0)
        add("256 streams: output tokens/s >= the 64-stream figure", r256["output_tok_per_s"],
            r64["output_tok_per_s"] if r64 else None, r64 is not None and r256["output_tok_per_s"] >= r64["output_tok_per_s"])
        add("256 streams: TTFT p99 ms (stated)", r256["ttft_ms"]["p99"], None, True)
    g = summary.get("goodput") or {}
    add("open loop: highest rate meeting the objective (req/s, stated)", g.get("highest_rate_meeting_objective"), None,
        True)
    e = (summary.get("endpoint") or {}).get("64")
    v = e["ratio"] if e else None
    add("64 streams: OpenAI endpoint / gRPC tokens/s >= bar", v, t["endpoint_ratio_64"], v is not None and v >= t["endpoint_ratio_64"])
    o = summary.get("overhead_c1")
    if o:
        add("1 stream: TTFT overhead ms <= bar", o["overhead_ms"]["ttft_p50"], t["overhead_ttft_ms"],
            o["overhead_ms"]["ttft_p50"] <= t["overhead_ttft_ms"])
        add("1 stream: ITL overhead % <= bar", o["overhead_pct"]["itl_mean"], t["overhead_itl_pct"],
            o["overhead_pct"]["itl_mean"] is not None and o["overhead_pct"]["itl_mean"] <= t["overhead_itl_pct"])
    return out


def _wait_for_trace(path: Path, until_perf_s: float, timeout_s: float) -> bool:
    """Wait until the server's step trace holds calls up to `until_perf_s` (perf_counter, the server's clock too)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            calls = json.loads(path.read_text())["calls"]
            if calls and max(c["t_out"] for c in calls) >= until_perf_s - 0.05:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return False


def load_bench(s: ServeBenchSettings, folder: Path, man: dict, repo: Path) -> dict:
    """The serving benchmark: one in-flight server; the workload's closed-loop sweep and open-loop rates, the engine's
    ceiling and the in-process scheduler on the same request stream, the OpenAI endpoint vs gRPC, lm_empty at load,
    the 1-stream overhead, and the per-step timeline of the served engine (docs/serving_benchmark.md)."""
    import os

    from lmopt.profiling import step_trace
    from lmopt.serving import result_path, write_result

    prof = result_path(s.artifacts, s.model, "x").parent
    srv = man.get("settings", {})
    from lmopt.paths import staging_dir

    # the repository without `lm` (the unary model is not measured here: its engine would only lengthen the start)
    dst = prof / "serving-repos" / f"{folder.name}-load"
    with staging_dir(dst) as tmp:
        shutil.copytree(repo, tmp / "model_repository", ignore=lambda d, names: [
            n for n in names if n == "__pycache__" or (Path(d) == repo and n == "lm")])
    repo = dst / "model_repository"
    trace_dir = prof / "step-trace"
    shutil.rmtree(trace_dir, ignore_errors=True)
    ld = LoadSettings(model=s.model, artifacts=s.artifacts, prompt_tokens=s.prompt_tokens,
                      max_new_tokens=s.max_new_tokens, requests=s.requests, duration_s=s.duration_s,
                      prompt_input=s.prompt_input, num_prompts=s.num_prompts, workload=s.workload,
                      length_spread=s.length_spread, seed=s.seed, ignore_eos=s.workload != "fixed",
                      objective_ttft_ms=s.objective_ttft_ms, objective_itl_ms=s.objective_itl_ms,
                      rate_requests=s.rate_requests, engine=man.get("engine", "ort"),
                      precision=man.get("precision", "fp32"), device=man.get("device", "cpu"),
                      threads=int(srv.get("threads", 0) or 0), slots=int(srv.get("slots", 0) or 0),
                      max_len=int(srv.get("max_len", 0) or 0), capture_kv=int(srv.get("capture_kv", 0) or 0),
                      prefill_chunk=int(srv.get("prefill_chunk", 256) or 256),
                      kv_layout=srv.get("kv_layout", "contiguous"), kv_block_size=int(srv.get("kv_block_size", 16)),
                      kv_num_blocks=int(srv.get("kv_num_blocks", 0) or 0),
                      kv_memory_fraction=float(srv.get("kv_memory_fraction", 0) or 0),
                      prefix_cache=bool(srv.get("prefix_cache", True)),
                      paged_attention=srv.get("paged_attention", "gather"),
                      max_queue=max(int(srv.get("max_queue", 64) or 64), 256))
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    os.environ[step_trace.ENV] = str(trace_dir)   # the server (started below) inherits it: its timeline

    def publish(complete: bool) -> dict:
        """Write serving-load.json with what is measured so far (after each step: a run cut short keeps it)."""
        summary = _load_summary(s, results, trace_dir, folder)
        out = result_path(s.artifacts, s.model, "load")
        write_result(out, "serving_load_benchmark", asdict(s), {}, summary,
                     {"serve_variant": folder.name, "serve_manifest": str(folder / "manifest.json"),
                      "timings_s": timings, "complete": complete})
        log.info("Saving results to %s%s", out, "" if complete else " (so far)")
        return summary

    ports = free_ports(4, s.host)   # http, grpc, metrics, gateway: known before anything starts
    url, gw = f"{s.host}:{ports[1]}", f"http://{s.host}:{ports[3]}" if s.endpoint_levels else ""
    main = replace(ld, url=url, label="load", concurrency=s.concurrency, request_rate=s.open_loop_rates,
                   endpoint_levels=s.endpoint_levels, openai_url=gw, in_process_levels=s.in_process_levels,
                   ceiling=True, in_process=s.overhead_requests > 0, overhead_requests=s.overhead_requests,
                   warm_short=True, ready_timeout_s=s.startup_timeout_s + 120)
    started = None
    try:
        with ExitStack() as stack:
            with timed(log, "start the server (and the load generator's in-process engine beside it)", timings,
                       "startup_s"):
                # the load generator builds its in-process engine (minutes of compiling on a GPU) while the server
                # builds its own, then waits for the server before it sends anything
                started = _start_tool("load_generator.py", main)
                stack.enter_context(triton_server(repo, s.host, prof / ".triton-load.pid", s.startup_timeout_s,
                                                  ports[:3]))
                if gw:
                    stack.enter_context(openai_gateway(url, s.host, 120.0, ports[3]))
            with timed(log, "sweep, rates, endpoint, in-process, ceiling, overhead", timings, "load_s"):
                results["load"] = _finish_tool(started, "load_generator.py", main, "stream-load")
                started = None
                publish(complete=False)
            if s.floor_levels:
                with timed(log, "lm_empty at load", timings, "floor_s"):
                    results["floor"] = _run_tool("load_generator.py", replace(
                        ld, url=url, label="load-floor", triton_model="lm_empty", concurrency=s.floor_levels,
                        prompt_input="input_ids" if s.prompt_input == "input_ids" else ld.prompt_input),
                        "stream-load-floor")
                publish(complete=False)
            if s.timeline_level:
                with timed(log, "timeline", timings, "timeline_s"):
                    results["timeline"] = _run_tool("load_generator.py", replace(
                        ld, url=url, label="load-timeline", concurrency=str(s.timeline_level),
                        duration_s=min(s.duration_s, 6.0)), "stream-load-timeline")
                    # the server writes its trace once idle for a second: wait for a copy that covers the level
                    _wait_for_trace(trace_dir / "step-trace-lm_stream.json",
                                    results["timeline"]["summary"][0]["window_perf_s"][1], 20.0)
                summary = publish(complete=True)   # before the server stops (a minute of unloading on a GPU)
    finally:
        os.environ.pop(step_trace.ENV, None)
        if started is not None and started[0].poll() is None:   # the server did not come up: stop the client too
            os.killpg(started[0].pid, 15)
            started[0].wait()
    if not s.timeline_level:
        summary = publish(complete=True)
    _print_load(summary)
    return {"path": str(result_path(s.artifacts, s.model, "load")), **summary}


def _load_summary(s: ServeBenchSettings, results: dict, trace_dir: Path, folder: Path) -> dict:
    """serving-load.json's summary from the tool results there are so far (and serving-timeline.json)."""
    from lmopt.profiling import step_trace
    from lmopt.serving import result_path, write_result

    load = results["load"]
    sweep = [_strip(r) for r in load["summary"]]
    summary = {"workload": load["workload"], "objective": load["objective"], "goodput": load["goodput"],
               "sweep": sweep, "ceiling": load.get("ceiling"),
               "in_process_scheduler": [_strip(r) for r in load.get("in_process_scheduler") or []],
               "endpoint": load.get("endpoint"),
               "floor": [_strip(r) for r in results["floor"]["summary"]] if "floor" in results else [],
               "overhead_c1": {k: v for k, v in load["overhead"].items() if k != "samples"} if "overhead" in load
               else None,
               "results": {k: v["path"] for k, v in results.items()}}
    if "timeline" in results:
        trace = trace_dir / "step-trace-lm_stream.json"
        if trace.is_file():
            doc = json.loads(trace.read_text())
            t0, t1 = results["timeline"]["summary"][0]["window_perf_s"]
            tl = step_trace.summarize(doc, t0, t1)
            row = _strip(results["timeline"]["summary"][0])
            tl_out = result_path(s.artifacts, s.model, "timeline")
            write_result(tl_out, "serving_timeline", asdict(s), step_trace.samples(doc, t0, t1),
                         {"level": s.timeline_level, "load": row, "steps": tl},
                         {"serve_variant": folder.name})
            summary["timeline"] = {"level": s.timeline_level, "output_tok_per_s": row["output_tok_per_s"], **tl,
                                   "result": str(tl_out)}
            log.info("Saving results to %s", tl_out)
        else:
            log.warning("no step trace at %s (the server wrote none): no timeline", trace)
    summary["targets"] = load_targets(summary)
    return summary


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _print_load(sm: dict) -> None:
    w = sm["workload"]
    print(f"serving benchmark: workload {w['kind']} (input mean {w['input_tokens']['mean']:.0f}, output mean "
          f"{w['output_tokens']['mean']:.0f} tokens); objective TTFT p99 <= {sm['objective']['ttft_p99_ms']:g} ms, "
          f"ITL p99 <= {sm['objective']['itl_p99_ms']:g} ms")
    print(f"{'level':>9} {'done':>5} {'fail':>4} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>8} {'p99':>7} {'ITL p50':>7} "
          f"{'p99':>6} {'goodput':>7} {'ceiling':>8} {'x':>5}")
    for r in sm["sweep"]:
        lv = f"c{r['level']}" if r["mode"] == "concurrency" else f"{r['level']}/s"
        print(f"{lv:>9} {r['completed']:>5} {r['failed']:>4} {r['output_tok_per_s'] or 0:>8.0f} "
              f"{r['requests_per_s'] or 0:>7.1f} {r['ttft_ms']['p50'] or 0:>8.1f} {r['ttft_ms']['p99'] or 0:>7.1f} "
              f"{r['itl_ms']['p50'] or 0:>7.2f} {r['itl_ms']['p99'] or 0:>6.2f} {r['goodput_rps'] or 0:>7.1f} "
              f"{r.get('ceiling_tok_per_s') or 0:>8.0f} {r.get('served_over_ceiling') or 0:>5.2f}")
    for r in sm["in_process_scheduler"]:
        print(f"in-process scheduler c{r['level']}: {r['output_tok_per_s'] or 0:.0f} tok/s, TTFT p50 "
              f"{r['ttft_ms']['p50'] or 0:.1f} ms (served / in-process {r.get('served_over_in_process') or 0:.2f})")
    for r in sm["floor"]:
        rps = r["token_responses"] / r["wall_s"] if r["wall_s"] else 0
        print(f"lm_empty (no engine) c{r['level']}: {r['output_tok_per_s'] or 0:.0f} tok/s, {rps:.0f} responses/s, "
              f"{r['requests_per_s'] or 0:.1f} req/s, failed {r['failed']}")
    for c, e in (sm.get("endpoint") or {}).items():
        print(f"endpoint vs gRPC c{c}: {e['openai_tok_per_s'] or 0:.0f} vs {e['grpc_tok_per_s'] or 0:.0f} tok/s "
              f"({e['ratio'] or 0:.2f}x)")
    tl = sm.get("timeline")
    if tl:
        print(f"timeline c{tl['level']}: {tl['decode_steps']} decode steps, period p50 "
              f"{tl['decode_step_period_ms']['p50'] or 0:.3f} ms, GPU busy {_pct(tl.get('gpu_busy_share'))}, "
              f"send share {tl['send_share'] or 0:.0%}")
    for t in sm["targets"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        val = "–" if t["value"] is None else f"{t['value']:.3g}" if isinstance(t["value"], float) else t["value"]
        print(f"  {t['target']}: {val} (bar {t['bar']}) {met if t['bar'] is not None else ''}")


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
    cli.add_settings(p, ServeBenchSettings, choices={"compare": (*PAIRS, "load")}, skip=("concurrency", "request_rate", "prompt_tokens", "max_new_tokens", "measurement_requests",
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
