"""A third-party LLM benchmark (NVIDIA's aiperf, through the OpenAI endpoint) and our load generator (Triton's gRPC
stream) on the same server in the same run, level by level: TTFT, ITL, output tokens/s, and whether they agree.

    make aiperf-venv                         # aiperf in its own venv (.venv-aiperf): it needs a newer transformers
    make serve-openai                        # Triton + the OpenAI endpoint
    python profile/aiperf_compare.py --model tiny --concurrency 1,2,4,8 --requests 32
    python profile/aiperf_compare.py --publish                 # also copy the result under results/<machine>/

Per concurrency level, one after the other on the same server: aiperf `profile` (completions endpoint, streaming,
synthetic prompts of --prompt-tokens tokens, --max-new-tokens output tokens with no spread, temperature 0) against
--openai-url; our load generator (profile/load_generator.py, run as its CLI: same lengths, greedy, held-out prompts)
against --triton-grpc; and lmopt.openai_client against --openai-url (the same path as aiperf with our own timing).
Definitions: TTFT is the same everywhere (send -> first token). aiperf's ITL is per request, (latency - TTFT) /
(tokens - 1), then percentiles over requests; the load generator's own ITL is every gap between token responses.
Both are in the result; the comparison uses the per-request definition for all. Differences to expect: aiperf and
our endpoint client go through the gateway (its overhead: profile/openai_overhead.py), the load generator straight to
gRPC; aiperf runs several processes of its own, which on a small CPU compete with the server.

--workload random: lengths around --prompt-tokens / --max-new-tokens, +- --length-spread, EOS ignored (the serving
benchmark's workload, docs/serving_benchmark.md): ours uniform (lmopt.serving.build_workload), aiperf's synthetic
ones normal with the same mean and standard deviation and `ignore_eos` sent; the same distribution's first two
moments, not the same requests. The bar (--tolerance): ITL p50 and output tokens/s; TTFT is reported beside them.

Reads:  aiperf's profile_export_aiperf.json and the load generator's serving-stream-aiperf-c<N>.json per level
Writes: artifacts/<model>/profile/aiperf/c<N>/ (aiperf's own artifacts), artifacts/<model>/profile/aiperf-compare.json;
        with --publish also results/<machine-tag>/<model>/aiperf-compare.json
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("aiperf-compare")


@dataclass
class CompareSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    openai_url: str = "http://127.0.0.1:8080"   # the OpenAI endpoint's base URL (without /v1)
    triton_grpc: str = "127.0.0.1:8001"         # the same server's Triton gRPC address
    concurrency: str = "1,2,4,8"
    prompt_tokens: int = 32                     # prompt length in tokens
    max_new_tokens: int = 16
    requests: int = 32                          # measured requests per level and tool (at least 4 per client)
    aiperf: str = ".venv-aiperf/bin/aiperf"     # the aiperf executable (make aiperf-venv)
    tolerance: float = 0.10                     # agreement bar on ITL medians and tokens/s (0.10 = 10 percent)
    workload: str = "fixed"                     # fixed: exact lengths; random: +- length_spread, EOS ignored
    length_spread: float = 0.25                 # random: our lengths uniform in mean*(1 +- spread); aiperf's
                                                # normal with the same mean and standard deviation
    publish: bool = False                       # also copy the result to results/<machine-tag>/<model>/


def _aiperf_level(s: CompareSettings, served: str, tokenizer_dir: str, c: int, out: Path) -> dict:
    n = max(s.requests, 4 * c)
    cmd = [s.aiperf, "profile", "--model", served, "--tokenizer", tokenizer_dir, "--url", s.openai_url,
           "--endpoint-type", "completions", "--streaming",
           "--synthetic-input-tokens-mean", str(s.prompt_tokens), "--synthetic-input-tokens-stddev",
           str(_stddev(s, s.prompt_tokens)), "--output-tokens-mean", str(s.max_new_tokens), "--output-tokens-stddev",
           str(_stddev(s, s.max_new_tokens)), "--extra-inputs", "temperature:0",
           *(["--extra-inputs", "ignore_eos:true"] if s.workload == "random" else []),
           "--concurrency", str(c), "--request-count", str(n),
           "--warmup-request-count", str(c), "--artifact-dir", str(out), "--random-seed", "0"]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not (out / "profile_export_aiperf.json").is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise UserError(f"aiperf failed at concurrency {c} (exit {proc.returncode}): {' | '.join(tail)}")
    d = json.loads((out / "profile_export_aiperf.json").read_text())
    pick = lambda k: {q: d[k].get(q) for q in ("avg", "p50", "p90", "p99")} if k in d else None  # noqa: E731
    return {"command": cmd, "wall_s": round(time.time() - t0, 2), "requests": int(d["request_count"]["avg"]),
            "errors": d.get("error_summary") or [], "ttft_ms": pick("time_to_first_token"),
            "itl_ms": pick("inter_token_latency"), "request_latency_ms": pick("request_latency"),
            "output_sequence_length": pick("output_sequence_length"),
            "output_tok_per_s": d["output_token_throughput"]["avg"],
            "requests_per_s": d["request_throughput"]["avg"]}


def _stddev(s: CompareSettings, mean: int) -> int:
    """The standard deviation of lmopt.serving.build_workload's uniform lengths (0 for fixed ones)."""
    return 0 if s.workload != "random" else round(s.length_spread * mean / 3 ** 0.5)


def _per_request_itl(times_s: list[list[float]]) -> dict:
    """aiperf's ITL definition: per request (last - first token) / (tokens - 1), in ms; then statistics."""
    from lmopt.results import stats

    return stats([(t[-1] - t[0]) / (len(t) - 1) * 1e3 for t in times_s if len(t) > 1])


def _load_generator_level(s: CompareSettings, c: int) -> dict:
    from lmopt.paths import REPO_ROOT
    from lmopt.serving import result_path

    label = f"aiperf-c{c}"
    cmd = [sys.executable, str(REPO_ROOT / "profile" / "load_generator.py"), "--model", s.model, "--artifacts",
           s.artifacts, "--url", s.triton_grpc, "--label", label, "--concurrency", str(c), "--prompt-tokens",
           str(s.prompt_tokens), "--max-new-tokens", str(s.max_new_tokens), "--requests", str(max(s.requests, 4 * c)),
           "--duration-s", "600", "--prompt-input", "input_ids", "--workload", s.workload, "--length-spread",
           str(s.length_spread), "--num-prompts", "64", *(["--ignore-eos"] if s.workload == "random" else []), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise UserError(f"the load generator failed at concurrency {c}: {proc.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(result_path(s.artifacts, s.model, f"stream-{label}").read_text())
    row = doc["summary"][0]
    recs = [r for r in doc["samples"][str(c)] if not r.get("warmup") and r.get("error") is None]
    if recs and "token_times_s" in recs[0]:
        row["itl_per_request_ms"] = _per_request_itl([r["token_times_s"] for r in recs])
    else:   # a long level keeps compact samples: each request's (last - first) / (tokens - 1) is in them
        from lmopt.results import stats

        row["itl_per_request_ms"] = stats([r["itl_mean_ms"] for r in recs if r.get("itl_mean_ms") is not None])
    return row


async def _endpoint_level(s: CompareSettings, served: str, items: list, c: int) -> dict:
    """Our endpoint client at concurrency c through the gateway: c loops, each one request at a time."""
    import aiohttp

    from lmopt.openai_client import stream_completion
    from lmopt.results import stats

    n = max(s.requests, 4 * c)
    recs, issued = [], 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        def body(i):
            it = items[i % len(items)]
            b = {"model": served, "prompt": list(it.prompt_ids), "max_tokens": it.max_tokens, "temperature": 0}
            return {**b, "ignore_eos": True} if s.workload == "random" else b
        await asyncio.gather(*(stream_completion(session, s.openai_url, body(i)) for i in range(c)))  # warm-up
        t0 = time.perf_counter()

        async def loop():
            nonlocal issued
            while issued < n:
                i, issued = issued, issued + 1
                recs.append(await stream_completion(session, s.openai_url, body(i)))

        await asyncio.gather(*(loop() for _ in range(c)))
        wall = time.perf_counter() - t0
    ok = [r for r in recs if r.error is None]
    tokens = sum(r.usage.get("completion_tokens", 0) for r in ok)
    return {"requests": len(recs), "failed": len(recs) - len(ok), "wall_s": wall,
            "output_tok_per_s": tokens / wall if wall > 0 else None,
            "ttft_ms": stats([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
            "itl_per_request_ms": _per_request_itl([r.event_times_s for r in ok]),
            "e2e_ms": stats([r.end_s * 1e3 for r in ok])}


def _pct(a, b):
    return None if a is None or b in (None, 0) else round((a - b) / b, 4)


def run_compare(*, settings: CompareSettings) -> dict:
    from lmopt import results
    from lmopt.models import resolve
    from lmopt.paths import REPO_ROOT
    from lmopt.serving import result_path

    s = settings
    try:
        levels = [int(c) for c in s.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency must be a comma list of integers (got '{s.concurrency}')") from None
    if not levels or min(levels) < 1:
        raise UserError(f"--concurrency needs levels >= 1 (got '{s.concurrency}')")
    aiperf = Path(s.aiperf)
    if not aiperf.is_absolute():
        aiperf = REPO_ROOT / aiperf
    if not aiperf.is_file():
        raise UserError(f"no aiperf at {aiperf} — run: make aiperf-venv")
    s.aiperf = str(aiperf)
    import urllib.error
    import urllib.request

    try:
        served = json.load(urllib.request.urlopen(f"{s.openai_url}/v1/models", timeout=10))["data"][0]["id"]
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"no OpenAI endpoint at {s.openai_url} ({e}) — start it: make serve-openai") from None
    m = resolve(s.model)
    tokenizer_dir = str(m.path) if m.path else s.model  # presets use the built-in tokenizer
    if m.kind == "preset":
        from lmopt.models import BUILTIN_DIR

        tokenizer_dir = str(BUILTIN_DIR)
    from lmopt.serving import build_workload

    # the load generator's own workload (the same seed): our two clients send the same requests
    items = build_workload(s.model, s.workload, 64, s.prompt_tokens, s.max_new_tokens, s.length_spread, 0)
    out_dir = result_path(s.artifacts, s.model, "x").parent / "aiperf"
    rows = []
    for c in levels:
        log.info("concurrency %d: aiperf through %s", c, s.openai_url)
        a = _aiperf_level(s, served, tokenizer_dir, c, out_dir / f"c{c}")
        log.info("concurrency %d: load generator through %s", c, s.triton_grpc)
        o = _load_generator_level(s, c)
        log.info("concurrency %d: endpoint client through %s", c, s.openai_url)
        e = asyncio.run(_endpoint_level(s, served, items, c))
        diff = {"ttft_p50": _pct(a["ttft_ms"]["p50"], o["ttft_ms"]["p50"]),
                "itl_p50": _pct(a["itl_ms"]["p50"], o["itl_per_request_ms"]["p50"]),
                "output_tok_per_s": _pct(a["output_tok_per_s"], o["output_tok_per_s"])}
        diff_same_path = {"ttft_p50": _pct(a["ttft_ms"]["p50"], e["ttft_ms"]["p50"]),
                          "itl_p50": _pct(a["itl_ms"]["p50"], e["itl_per_request_ms"]["p50"]),
                          "output_tok_per_s": _pct(a["output_tok_per_s"], e["output_tok_per_s"])}
        within = all(v is not None and abs(v) <= s.tolerance for k, v in diff.items() if k != "ttft_p50")
        rows.append({"concurrency": c, "aiperf": a, "load_generator": o, "endpoint_client": e,
                     "relative_difference": diff, "relative_difference_same_path": diff_same_path,
                     "within_tolerance": within})
        log.info("concurrency %d: TTFT p50 aiperf %.1f, load generator %.1f, endpoint client %.1f ms; ITL p50 %.2f, "
                 "%.2f, %.2f ms", c, a["ttft_ms"]["p50"], o["ttft_ms"]["p50"], e["ttft_ms"]["p50"],
                 a["itl_ms"]["p50"], o["itl_per_request_ms"]["p50"], e["itl_per_request_ms"]["p50"])
    doc = results.envelope("aiperf-compare", settings=asdict(s), summary=rows,
                           versions={**results.versions("tritonclient", "nvidia-pytriton", "starlette", "uvicorn"),
                                     "aiperf": _aiperf_version(s.aiperf)},
                           served_model=served, loadavg=[round(x, 2) for x in os.getloadavg()])
    path = result_path(s.artifacts, s.model, "x").with_name("aiperf-compare.json")
    results.save_result(path, doc, log, publish_model=s.model if s.publish else None)
    print(f"TTFT p50 / ITL p50 (per request) in ms, output tok/s; prompt {s.prompt_tokens}, {s.max_new_tokens} tokens")
    print(f"{'conc':>4} | {'aiperf':>20} | {'load generator':>20} | {'endpoint client':>20} | TTFT diff  ITL diff")
    for r in rows:
        a, o, e, d = r["aiperf"], r["load_generator"], r["endpoint_client"], r["relative_difference"]
        cell = lambda x, itl: f"{x['ttft_ms']['p50']:>6.1f} {x[itl]['p50']:>5.2f} {x['output_tok_per_s']:>6.0f}"  # noqa: E731
        print(f"{r['concurrency']:>4} | {cell(a, 'itl_ms'):>20} | {cell(o, 'itl_per_request_ms'):>20} | "
              f"{cell(e, 'itl_per_request_ms'):>20} | {d['ttft_p50']:>+8.0%} {d['itl_p50']:>+8.0%}")
    return doc


def _aiperf_version(exe: str) -> str | None:
    try:
        py = Path(exe).parent / "python"
        return subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                              capture_output=True, text=True, timeout=60).stdout.strip() or None
    except OSError:
        return None


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, CompareSettings)
    return p


main = cli.main_for(build_parser, CompareSettings, run_compare)

if __name__ == "__main__":
    cli.run(main)
