"""A third-party LLM benchmark (NVIDIA's aiperf, through the OpenAI endpoint) and our load generator (Triton's gRPC
stream) on the same server in the same run, level by level: TTFT, ITL, output tokens/s, and whether they agree.

    make aiperf-venv                         # aiperf in its own venv (.venv-aiperf): it needs a newer transformers
    make serve-openai                        # Triton + the OpenAI endpoint
    python profile/aiperf_compare.py --model tiny --concurrency 1,2,4,8 --requests 32
    python profile/aiperf_compare.py --publish                 # also copy the result under results/<machine>/

Per concurrency level: aiperf `profile` (completions endpoint, streaming, synthetic prompts of --prompt-tokens
tokens, --max-tokens output tokens with no spread, temperature 0) against --openai-url, then our load generator
(profile/load_generator.py: same prompt and output lengths, greedy, held-out prompts) against --triton-grpc.
Definitions: TTFT is the same in both (send -> first token). aiperf's ITL is per request, (latency - TTFT) /
(tokens - 1), then its percentiles over requests; the load generator's own ITL is every gap between token responses.
Both are in the result; the comparison uses the per-request definition for both. Differences to expect: aiperf goes
through the gateway (its overhead: profile/openai_overhead.py) and HTTP, ours straight to gRPC.

Reads:  aiperf's profile_export_aiperf.json per level; data/eval.txt
Writes: artifacts/<model>/profile/aiperf/c<N>/ (aiperf's own artifacts), artifacts/<model>/profile/aiperf-compare.json;
        with --publish also results/<machine-tag>/<model>/aiperf-compare.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from load_generator import run_level

from lmopt.errors import UserError, cli_main
from lmopt.log import add_verbosity_args, get_logger, setup_logging
from lmopt.serving import LoadSettings, held_out_prompts

log = get_logger("aiperf-compare")


@dataclass
class CompareSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    openai_url: str = "http://127.0.0.1:8080"
    triton_grpc: str = "127.0.0.1:8001"
    concurrency: str = "1,2,4,8"
    prompt_tokens: int = 32
    max_tokens: int = 16
    requests: int = 32                  # measured requests per level and tool (at least 4 per client)
    aiperf: str = ".venv-aiperf/bin/aiperf"
    tolerance: float = 0.10             # agreement bar on TTFT and ITL medians
    publish: bool = False


def _aiperf_level(s: CompareSettings, served: str, tokenizer_dir: str, c: int, out: Path) -> dict:
    n = max(s.requests, 4 * c)
    cmd = [s.aiperf, "profile", "--model", served, "--tokenizer", tokenizer_dir, "--url", s.openai_url,
           "--endpoint-type", "completions", "--streaming",
           "--synthetic-input-tokens-mean", str(s.prompt_tokens), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(s.max_tokens), "--output-tokens-stddev", "0",
           "--extra-inputs", "temperature:0", "--concurrency", str(c), "--request-count", str(n),
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


def _ours_level(s: CompareSettings, prompts: list[str], c: int) -> tuple[dict, list]:
    from lmopt.results import stats

    ls = LoadSettings(model=s.model, artifacts=s.artifacts, url=s.triton_grpc, max_tokens=s.max_tokens,
                      prompt_tokens=s.prompt_tokens, requests=max(s.requests, 4 * c), duration_s=600,
                      prompt_input="input_ids", label="aiperf-compare")
    row, recs = asyncio.run(run_level(s.triton_grpc, prompts, c, ls))
    per_req = [(r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1) * 1e3
               for r in recs if not r.warmup and r.error is None and len(r.token_times_s) > 1]
    row["itl_per_request_ms"] = stats(per_req)
    return row, recs


def _pct(a, b):
    return None if a is None or b in (None, 0) else round((a - b) / b, 4)


def run_compare(*, settings: CompareSettings) -> dict:
    from lmopt import results
    from lmopt.models import resolve
    from lmopt.paths import REPO_ROOT, model_slug
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
    prompts = held_out_prompts(s.model, 16, s.prompt_tokens)
    out_dir = result_path(s.artifacts, s.model, "x").parent / "aiperf"
    rows, samples = [], {}
    for c in levels:
        log.info("concurrency %d: aiperf through %s", c, s.openai_url)
        a = _aiperf_level(s, served, tokenizer_dir, c, out_dir / f"c{c}")
        log.info("concurrency %d: load generator through %s", c, s.triton_grpc)
        o, recs = _ours_level(s, prompts, c)
        samples[str(c)] = [asdict(r) for r in recs]
        agree = {"ttft_p50": _pct(a["ttft_ms"]["p50"], o["ttft_ms"]["p50"]),
                 "itl_p50": _pct(a["itl_ms"]["p50"], o["itl_per_request_ms"]["p50"]),
                 "output_tok_per_s": _pct(a["output_tok_per_s"], o["output_tok_per_s"])}
        within = all(v is not None and abs(v) <= s.tolerance for k, v in agree.items() if k != "output_tok_per_s")
        rows.append({"concurrency": c, "aiperf": a, "load_generator": o, "relative_difference": agree,
                     "within_tolerance": within})
        log.info("concurrency %d: TTFT p50 aiperf %.1f vs ours %.1f ms; ITL p50 %.2f vs %.2f ms; %.0f vs %.0f tok/s",
                 c, a["ttft_ms"]["p50"], o["ttft_ms"]["p50"], a["itl_ms"]["p50"], o["itl_per_request_ms"]["p50"],
                 a["output_tok_per_s"], o["output_tok_per_s"])
    doc = results.envelope("aiperf-compare", settings=asdict(s), summary=rows, samples=samples,
                           versions={**results.versions("tritonclient", "nvidia-pytriton", "starlette", "uvicorn"),
                                     "aiperf": _aiperf_version(s.aiperf)},
                           served_model=served, loadavg=[round(x, 2) for x in os.getloadavg()])
    path = result_path(s.artifacts, s.model, "x").with_name("aiperf-compare.json")
    results.write_json(path, doc)
    log.info("Saving %s", path)
    if s.publish:
        dest = REPO_ROOT / "results" / results.machine_tag(doc) / model_slug(s.model) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        log.info("Saving %s", dest)
    print(f"{'conc':>4} | {'TTFT p50 aiperf':>15} {'ours':>7} {'diff':>6} | {'ITL p50 aiperf':>14} {'ours':>6} "
          f"{'diff':>6} | {'tok/s aiperf':>12} {'ours':>6}")
    for r in rows:
        a, o, d = r["aiperf"], r["load_generator"], r["relative_difference"]
        print(f"{r['concurrency']:>4} | {a['ttft_ms']['p50']:>13.1f}ms {o['ttft_ms']['p50']:>5.1f}ms "
              f"{d['ttft_p50']:>+6.0%} | {a['itl_ms']['p50']:>12.2f}ms {o['itl_per_request_ms']['p50']:>4.2f}ms "
              f"{d['itl_p50']:>+6.0%} | {a['output_tok_per_s']:>12.0f} {o['output_tok_per_s']:>6.0f}")
    return doc


def _aiperf_version(exe: str) -> str | None:
    try:
        py = Path(exe).parent / "python"
        return subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                              capture_output=True, text=True, timeout=60).stdout.strip() or None
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CompareSettings()
    p.add_argument("--model", default=d.model)
    p.add_argument("--artifacts", default=d.artifacts)
    p.add_argument("--openai-url", default=d.openai_url, help="the OpenAI endpoint's base URL (without /v1)")
    p.add_argument("--triton-grpc", default=d.triton_grpc, help="the same server's Triton gRPC address")
    p.add_argument("--concurrency", default=d.concurrency, help="comma list of levels")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--requests", type=int, default=d.requests, help="measured requests per level and tool")
    p.add_argument("--aiperf", default=d.aiperf, help="the aiperf executable (make aiperf-venv)")
    p.add_argument("--tolerance", type=float, default=d.tolerance)
    p.add_argument("--publish", action="store_true", help="copy the result to results/<machine-tag>/<model>/")
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    run_compare(settings=CompareSettings(**{f.name: getattr(args, f.name) for f in fields(CompareSettings)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
