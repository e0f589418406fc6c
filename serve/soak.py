"""Soak test: N concurrent streaming clients (gRPC streams to lm_stream) for a fixed time against a running server,
some of them cancelling their request at a random token; counts failed requests (cancelled ones aside), times to
first token and tokens, samples the server's memory (tritonserver plus its backend stubs) to show it does not grow
without bound, and reads the scheduler's slots in use from the metrics port afterwards (back to 0 = every
cancelled request gave its slot back).

    bash serve/run_triton.sh artifacts/tiny/serve/ort-fp32-cpu/model_repository --background --pid-file /tmp/t.pid
    python serve/soak.py --pid-file /tmp/t.pid --clients 64 --duration 60 --cancel-fraction 0.25
    bash serve/run_triton.sh stop --pid-file /tmp/t.pid

Bounded: every client stops sending at --duration, and a request that gets no response for --timeout seconds
counts as failed. A "server busy: " answer counts as failed too (size --slots/--max-queue of the repository for the
load). Memory: `rss_change_pct` compares the mean of the last third of the samples with the first third, after a
warm-up of the first quarter of the run. Reads: the server, its pid file. Writes: artifacts/<model>/profile/serve-load/
<variant>-c<clients>-<duration>s.json (machine, versions, command, settings, raw samples, summary).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging

log = get_logger("serve-load")

PROMPTS = ["The list", "def f(", "A class attribute", "The import statement", "Exceptions", "for x in",
           "The with statement", "Numbers"]


@dataclass
class LoadSettings:
    clients: int = 64
    duration: float = 30.0           # seconds each client keeps sending
    max_new_tokens: int = 32
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    pid_file: str = ""               # run_triton.sh's pid file: memory of the server's process group is sampled
    timeout: float = 60.0            # no response for this long = failed request
    cancel_fraction: float = 0.0     # share of requests the client cancels at a random token (leaves mid-answer)
    metrics_port: int = 8002         # lm_scheduler_slots_in_use is read from this metrics port after the run
    seed: int = 0                    # which requests are cancelled, and at which token
    model: str = "tiny"
    artifacts: str = "artifacts"
    variant: str = ""                # serve variant the server runs (names the result file; default newest)
    out: str = ""


def _rss_mb(pgid: int) -> float | None:
    import psutil

    total = 0
    for p in psutil.process_iter(["pid"]):
        try:
            import os

            if os.getpgid(p.pid) == pgid:
                total += p.memory_info().rss
        except (psutil.Error, ProcessLookupError, OSError):
            continue
    return total / 2**20 if total else None


def _client(s: LoadSettings, idx: int, deadline: float, records: list, lock: threading.Lock):
    import numpy as np

    from lmopt.triton_client import GenRequest, GrpcStream

    rng = np.random.default_rng([s.seed, idx])

    n = 0
    with GrpcStream(f"{s.host}:{s.grpc_port}", timeout=s.timeout) as st:
        while time.time() < deadline:
            req = GenRequest(prompt=PROMPTS[(idx + n) % len(PROMPTS)], max_tokens=s.max_new_tokens)
            # a client leaves mid-answer, never once it holds every token: cancelling while the final response is on
            # its way races the completion, which crashes Triton 2.51's gRPC frontend (docs/ENVIRONMENT.md)
            cancel_at = (int(rng.integers(1, s.max_new_tokens)) if s.max_new_tokens > 1 and rng.random() < s.cancel_fraction
                         else None)
            rec = {"client": idx, "start": time.time(), "ttft_s": None, "total_s": None, "tokens": 0, "error": None,
                   "cancelled": False}
            t0 = time.perf_counter()
            try:
                for piece in st.generate(req, request_id=f"c{idx}-{n}"):
                    if piece.token_ids:
                        rec["tokens"] += len(piece.token_ids)   # several when they came faster than one send
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = time.perf_counter() - t0
                    if cancel_at is not None and cancel_at <= rec["tokens"] < s.max_new_tokens and not piece.final:
                        st.cancel()  # the client leaves mid-answer
                        rec["cancelled"] = True
                        break
            except RuntimeError as e:
                rec["error"] = str(e).splitlines()[0]
            except TimeoutError as e:
                rec["error"] = str(e)
            rec["total_s"] = time.perf_counter() - t0
            with lock:
                records.append(rec)
            n += 1
            if rec["error"] and "no response" in rec["error"]:
                break  # the stream is in an unknown state


def _slots_in_use(s: LoadSettings, settle_s: float = 10.0) -> float | None:
    """lm_scheduler_slots_in_use of lm_stream on the metrics port, waiting up to settle_s for it to reach 0 (None:
    the server exports no scheduler metrics)."""
    import re
    import urllib.request

    deadline = time.time() + settle_s
    while True:
        try:
            text = urllib.request.urlopen(f"http://{s.host}:{s.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        m = re.search(r'^lm_scheduler_slots_in_use\{model="lm_stream"\} (\S+)', text, re.M)
        value = float(m.group(1)) if m else None
        if value in (None, 0.0) or time.time() > deadline:
            return value
        time.sleep(0.25)


def run_load(*, settings: LoadSettings) -> dict:
    import numpy as np

    from lmopt import results as R
    from lmopt.manifest import list_variants
    from lmopt.paths import stage_dir

    s = settings
    if s.clients < 1 or s.duration <= 0:
        raise UserError("--clients must be >= 1 and --duration > 0")
    if not 0.0 <= s.cancel_fraction <= 1.0 or s.max_new_tokens < 1:
        raise UserError("--cancel-fraction must be in [0, 1] and --max-new-tokens >= 1")
    if not s.pid_file or not Path(s.pid_file).is_file():
        raise UserError(f"no server pid file '{s.pid_file}' — start the server with: bash serve/run_triton.sh REPO "
                        "--background --pid-file FILE, and pass --pid-file FILE")
    pgid = int(Path(s.pid_file).read_text())
    variants = list_variants(s.artifacts, s.model, "serve")
    variant = s.variant or (max(variants, key=lambda k: variants[k].get("created", "")) if variants else "unknown")
    import urllib.request

    try:
        urllib.request.urlopen(f"http://{s.host}:{s.http_port}/v2/health/ready", timeout=5)
    except OSError as e:
        raise UserError(f"no ready Triton server at {s.host}:{s.http_port} ({e}) — start it first") from None

    def stats():
        out = {}
        for m in ("lm_stream",):
            st = json.load(urllib.request.urlopen(f"http://{s.host}:{s.http_port}/v2/models/{m}/stats"))
            st = st["model_stats"][0]
            out[m] = {"inference_count": st["inference_count"], "execution_count": st["execution_count"]}
        return out

    records: list = []
    lock = threading.Lock()
    rss: list = []
    stats0 = stats()
    t_start = time.time()
    deadline = t_start + s.duration
    threads = [threading.Thread(target=_client, args=(s, i, deadline, records, lock), daemon=True)
               for i in range(s.clients)]
    log.info("%d streaming clients for %.0f s against %s:%d", s.clients, s.duration, s.host, s.grpc_port)
    rss.append({"t": 0.0, "rss_mb": _rss_mb(pgid)})
    for t in threads:
        t.start()
    from tqdm import tqdm

    with tqdm(total=int(s.duration), unit="s", disable=None) as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            rss.append({"t": round(time.time() - t_start, 2), "rss_mb": _rss_mb(pgid)})
            bar.n = min(int(time.time() - t_start), int(s.duration))
            bar.set_postfix(requests=len(records))
            bar.refresh()
            if time.time() > deadline + s.timeout + 30:
                break  # bounded even if a client hangs
    wall = time.time() - t_start
    stats1 = stats()
    slots_after = _slots_in_use(s)
    ok = [r for r in records if r["error"] is None and not r["cancelled"]]
    cancelled = [r for r in records if r["cancelled"] and r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tot = [r["total_s"] for r in ok]
    mem = [x["rss_mb"] for x in rss if x["rss_mb"]]
    half = len(mem) // 2
    steady = [x["rss_mb"] for x in rss if x["rss_mb"] and x["t"] >= s.duration / 4]  # after warm-up
    third = len(steady) // 3
    rss_change = round(100 * (float(np.mean(steady[-third:])) / float(np.mean(steady[:third])) - 1), 2) if third \
        else None
    summary = {
        "requests": len(records), "failed": len(failed), "completed": len(ok), "cancelled": len(cancelled),
        "busy": sum(1 for r in failed if "server busy: " in r["error"]),
        "failed_examples": sorted({r["error"] for r in failed})[:5],
        "slots_in_use_after": slots_after, "rss_change_pct": rss_change,
        "tokens": int(sum(r["tokens"] for r in ok)), "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_ms": R.stats(ttft, scale=1e3), "request_ms": R.stats(tot, scale=1e3),
        "server_rss_mb": {"start": mem[0] if mem else None, "end": mem[-1] if mem else None,
                          "max": max(mem) if mem else None,
                          "mean_first_half": round(float(np.mean(mem[:half])), 1) if half else None,
                          "mean_second_half": round(float(np.mean(mem[half:])), 1) if half else None},
        "server_stats_delta": {m: {k: stats1[m][k] - stats0[m][k] for k in stats0[m]} for m in stats0},
    }
    result = R.envelope("serve-load", settings=asdict(s),
                        versions=R.versions("nvidia-pytriton", "tritonclient", "onnxruntime"),
                        model=s.model, variant=variant, summary=summary, samples={"requests": records, "rss": rss})
    out = Path(s.out) if s.out else (stage_dir(s.artifacts, s.model, "profile", "serve-load")
                                     / f"{variant}-c{s.clients}-{int(s.duration)}s.json")
    R.write_json(out, result)
    log.info("%d requests (%d failed, %d cancelled by the client), %.1f tokens/s, TTFT p50 %.1f ms p95 %.1f ms, "
             "server RSS %s -> %s MB (max %s; steady-state change %s%%), slots in use afterwards %s",
             summary["requests"], summary["failed"], summary["cancelled"], summary["tokens_per_s"],
             summary["ttft_ms"]["p50"] or -1, summary["ttft_ms"]["p95"] or -1,
             _r(summary["server_rss_mb"]["start"]), _r(summary["server_rss_mb"]["end"]),
             _r(summary["server_rss_mb"]["max"]), rss_change, slots_after)
    log.info("Saving results to %s", out)
    return result


def _r(x):
    return None if x is None else round(x, 1)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, LoadSettings)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    res = run_load(settings=cli.settings_from(LoadSettings, args))
    return 1 if res["summary"]["failed"] else 0


if __name__ == "__main__":
    cli.run(main)
