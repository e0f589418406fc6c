"""The OpenAI endpoint's own overhead at one stream: the same server, the same prompts, interleaved request by request,
through the gateway (serve/openai_server.py, HTTP + server-sent events) and through Triton's gRPC stream directly.

    make serve-openai                                    # Triton + gateway (or start them yourself)
    python profile/openai_overhead.py --model tiny --openai-url http://127.0.0.1:8080 --triton-grpc 127.0.0.1:8001
    python profile/openai_overhead.py --requests 40 --publish     # also copy the result under results/<machine>/

Both paths send the same token ids (the gateway tokenizes the prompt as the direct client does) to the same decoupled
model `lm_stream`, greedy, `--max-tokens` each, one request at a time, alternating which path goes first. Per request:
TTFT = first token (gRPC response / SSE event with text) - send; ITL = gaps between them. The direct client is the
load generator's (profile/load_generator.py); the SSE client reads the raw stream with aiohttp (the `openai` SDK's
per-chunk parsing would be measured as "endpoint" otherwise). Each gateway answer is checked against the direct one
(same text); a mismatch fails the run.

Reads:  data/eval.txt (held-out prompts of --prompt-tokens tokens); both servers
Writes: artifacts/<model>/profile/openai-overhead.json (settings, every request's timings, medians and deltas);
        with --publish also results/<machine-tag>/<model>/openai-overhead.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from load_generator import RequestRecord, request_metrics, stream_one

from lmopt.errors import UserError, cli_main
from lmopt.log import add_verbosity_args, get_logger, setup_logging
from lmopt.serving import LoadSettings, held_out_prompts

log = get_logger("openai-overhead")


@dataclass
class OverheadSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    openai_url: str = "http://127.0.0.1:8080"
    triton_grpc: str = "127.0.0.1:8001"
    triton_model: str = "lm_stream"
    requests: int = 40                 # measured requests per path
    warmup_requests: int = 3           # per path, excluded
    prompt_tokens: int = 32
    max_tokens: int = 32
    request_timeout_s: float = 60.0
    publish: bool = False              # also copy the result to results/<machine-tag>/<model>/


async def sse_one(session, s: OverheadSettings, served: str, prompt: str, index: int) -> tuple[RequestRecord, str, dict]:
    """One streamed completion through the gateway: arrival time of every event with text, the text, the usage."""
    body = {"model": served, "prompt": prompt, "max_tokens": s.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t_send = time.perf_counter()
    rec = RequestRecord(index, 0.0, [], [], 0)
    text, usage = [], {}
    try:
        async with session.post(f"{s.openai_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec, "", usage
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter() - t_send
                data = line[6:].strip()
                if data == b"[DONE]":
                    rec.end_s = now
                    break
                ev = json.loads(data)
                if "error" in ev:
                    rec.error = ev["error"]["message"][:200]
                    break
                if ev.get("usage"):
                    usage = ev["usage"]
                piece = ev["choices"][0]["text"] if ev.get("choices") else ""
                if piece:
                    text.append(piece)
                    rec.token_times_s.append(now)
                    rec.token_responses += 1
    except Exception as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]
    return rec, "".join(text), usage


async def _measure(s: OverheadSettings) -> dict:
    import aiohttp
    import tritonclient.grpc.aio as aio

    from lmopt.models import load_tokenizer

    tok = load_tokenizer(s.model)
    prompts = held_out_prompts(s.model, max(8, s.requests), s.prompt_tokens)
    ls = LoadSettings(model=s.model, artifacts=s.artifacts, url=s.triton_grpc, triton_model=s.triton_model,
                      max_tokens=s.max_tokens, prompt_input="input_ids", request_timeout_s=s.request_timeout_s)
    grpc = aio.InferenceServerClient(s.triton_grpc)
    timeout = aiohttp.ClientTimeout(total=s.request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(f"{s.openai_url}/v1/models") as r:
                if r.status != 200:
                    raise UserError(f"the gateway at {s.openai_url} answered {r.status} — is Triton up? "
                                    "(make serve-openai)")
                served = (await r.json())["data"][0]["id"]
        except aiohttp.ClientError as e:
            raise UserError(f"no OpenAI endpoint at {s.openai_url} ({e}) — start it: make serve-openai") from None
        rows, mismatches = [], []
        try:
            n = s.warmup_requests + s.requests
            for i in range(n):
                p = prompts[i % len(prompts)]
                order = ("direct", "openai") if i % 2 == 0 else ("openai", "direct")
                got = {}
                for path in order:
                    if path == "direct":
                        rec = await stream_one(grpc, p, i, ls, time.perf_counter())
                        got[path] = (rec, tok.decode(rec.tokens, skip_special_tokens=True), len(rec.tokens))
                    else:
                        rec, text, usage = await sse_one(session, s, served, p, i)
                        got[path] = (rec, text, usage.get("completion_tokens"))
                for path, (rec, _, _) in got.items():
                    if rec.error:
                        raise UserError(f"{path} request {i} failed: {rec.error}")
                if got["direct"][1:] != got["openai"][1:]:
                    mismatches.append({"index": i, "direct": got["direct"][1], "openai": got["openai"][1]})
                if i >= s.warmup_requests:
                    rows.append({"index": i, "first": order[0],
                                 **{f"{k}": {**request_metrics(v[0]), "output_tokens": v[2]}
                                    for k, v in got.items()}})
        finally:
            await grpc.close()
    return {"served_model": served, "rows": rows, "mismatches": mismatches}


def summarize(rows: list[dict]) -> dict:
    from lmopt.results import stats

    out = {}
    for path in ("direct", "openai"):
        out[path] = {"ttft_ms": stats([r[path]["ttft_ms"] for r in rows]),
                     "itl_ms": stats([v for r in rows for v in r[path]["itl_ms"]]),
                     "e2e_ms": stats([r[path]["e2e_ms"] for r in rows])}
    out["overhead_ms"] = {m: round(out["openai"][m]["p50"] - out["direct"][m]["p50"], 4)
                          for m in ("ttft_ms", "itl_ms", "e2e_ms")}
    # tokens can arrive in bursts (several responses queued behind one another), which pulls the ITL median towards
    # zero; the mean ITL ((e2e - TTFT) / (tokens - 1) on average) is the per-token cost that does not hide in a burst
    out["overhead_mean_ms"] = {m: round(out["openai"][m]["mean"] - out["direct"][m]["mean"], 4)
                               for m in ("ttft_ms", "itl_ms", "e2e_ms")}
    # paired: per request (both paths ran the same prompt back to back), median of the differences
    from lmopt.results import percentile

    out["paired_ttft_delta_ms_p50"] = round(percentile([r["openai"]["ttft_ms"] - r["direct"]["ttft_ms"]
                                                        for r in rows], 50), 4)
    return out


def run_overhead(*, settings: OverheadSettings) -> dict:
    from lmopt import results
    from lmopt.serving import result_path

    s = settings
    if s.requests < 1 or s.max_tokens < 2:
        raise UserError("--requests must be >= 1 and --max-tokens >= 2 (ITL needs two tokens)")
    t0 = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    m = asyncio.run(_measure(s))
    load_after = [round(x, 2) for x in os.getloadavg()]
    if m["mismatches"]:
        raise UserError(f"{len(m['mismatches'])} gateway answers differ from the direct stream (first: "
                        f"{m['mismatches'][0]}) — the two paths do not run the same request")
    summary = summarize(m["rows"])
    path = result_path(s.artifacts, s.model, "x").with_name("openai-overhead.json")
    doc = results.envelope("openai-overhead", settings=asdict(s), summary=summary, samples=m["rows"],
                           versions=results.versions("tritonclient", "nvidia-pytriton", "starlette", "uvicorn",
                                                     "aiohttp"),
                           served_model=m["served_model"], wall_s=round(time.time() - t0, 2),
                           # other work on a shared machine shows up as scheduling delay on both paths
                           loadavg_before=load_before, loadavg_after=load_after)
    results.write_json(path, doc)
    log.info("Saving %s", path)
    if s.publish:
        from lmopt.paths import REPO_ROOT, model_slug

        dest = REPO_ROOT / "results" / results.machine_tag(doc) / model_slug(s.model) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        log.info("Saving %s", dest)
    d, o = summary["direct"], summary["openai"]
    print(f"{'path':<8} {'TTFT p50':>10} {'ITL p50':>9} {'ITL mean':>9} {'e2e p50':>9}   ({len(m['rows'])} requests "
          f"each, {s.max_tokens} tokens, concurrency 1)")
    for name, x in (("direct", d), ("openai", o)):
        print(f"{name:<8} {x['ttft_ms']['p50']:>8.2f}ms {x['itl_ms']['p50']:>7.3f}ms {x['itl_ms']['mean']:>7.3f}ms "
              f"{x['e2e_ms']['p50']:>7.1f}ms")
    oh, om = summary["overhead_ms"], summary["overhead_mean_ms"]
    print(f"overhead: TTFT p50 {oh['ttft_ms']:+.2f} ms (paired {summary['paired_ttft_delta_ms_p50']:+.2f} ms), "
          f"ITL p50 {oh['itl_ms']:+.3f} ms, ITL mean {om['itl_ms']:+.3f} ms, e2e p50 {oh['e2e_ms']:+.1f} ms")
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = OverheadSettings()
    p.add_argument("--model", default=d.model)
    p.add_argument("--artifacts", default=d.artifacts)
    p.add_argument("--openai-url", default=d.openai_url, help="the gateway's base URL (without /v1)")
    p.add_argument("--triton-grpc", default=d.triton_grpc, help="the same server's Triton gRPC address")
    p.add_argument("--triton-model", default=d.triton_model)
    p.add_argument("--requests", type=int, default=d.requests, help="measured requests per path")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--publish", action="store_true", help="copy the result to results/<machine-tag>/<model>/")
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    run_overhead(settings=OverheadSettings(**{f.name: getattr(args, f.name) for f in fields(OverheadSettings)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
