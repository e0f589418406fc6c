"""The OpenAI endpoint's own overhead at one stream: the same server, the same prompts, interleaved request by request,
through the gateway (serve/openai_server.py, HTTP + server-sent events) and through Triton's gRPC stream directly.

    make serve-openai                                    # Triton + gateway (or start them yourself)
    python profile/openai_overhead.py --model tiny --openai-url http://127.0.0.1:8080 --triton-grpc 127.0.0.1:8001
    python profile/openai_overhead.py --requests 40 --publish     # also copy the result under results/<machine>/
    python profile/openai_overhead.py --compare-url "before=http://127.0.0.1:8081"  # another gateway, same loop

Both paths send the same token ids (the gateway tokenizes the prompt as the direct client does) to the same decoupled
model `lm_stream`, greedy, `--max-new-tokens` each, one request at a time, rotating which path goes first. Per request:
TTFT = first token (gRPC response / SSE event with text) - send, where send is the moment the client has the prompt's
text and starts building its request: the direct client's tokenizing (lmopt.models.encode, as the gateway) and request
tensors are inside its TTFT (setup_ms), as the endpoint's JSON body, tokenization and gRPC request are inside the
endpoint's (results without setup_ms started the direct clock after the tensors, and older ones after tokenizing);
ITL = gaps between them. The direct path uses lmopt.triton_client's request and response helpers over tritonclient's
asyncio gRPC stream, as the load generator does; the endpoint path lmopt.openai_client (raw SSE through aiohttp:
the `openai` SDK's per-chunk parsing would be measured as the endpoint's time otherwise; it keeps its connection alive
between requests, as the gRPC channel does). Path `openai-raw` (on unless --no-raw-client) is the same endpoint
through lmopt.openai_client.RawConnection, HTTP/1.1 on bare asyncio streams: the endpoint's time with as little
client as Python allows; its paired difference to `openai` is what aiohttp itself costs per request. Its counterpart
`direct-lean` (on with it; --no-lean-clients leaves both out) is Triton's stream through the gRPC stub with the request protobuf built and the responses
read by hand (as the gateway does), without tritonclient's InferInput/InferResult and numpy: `minimal_clients` in
the summary is the endpoint's overhead with the minimal client on both sides. `direct` (tritonclient) and `openai`
(aiohttp) stay the headline pair: the clients a user of each protocol would reach for.
`--compare-url LABEL=URL` adds more endpoints in front of the same Triton server (e.g. the gateway before a change, on
another port) to the same interleaved loop, each summarized like the endpoint. Each gateway answer is checked against
the direct one (same text); a mismatch fails the run.

Reads:  data/eval.txt (held-out prompts of --prompt-tokens tokens); both servers
Writes: artifacts/<model>/profile/openai-overhead.json (settings, every request's timings, medians and deltas);
        with --publish also results/<machine-tag>/<model>/openai-overhead.json
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import asyncio
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.openai_client import RawConnection, StreamTiming, stream_completion

log = get_logger("openai-overhead")
RAW = "openai-raw"      # the endpoint again, through lmopt.openai_client.RawConnection instead of aiohttp
LEAN = "direct-lean"    # Triton's stream again, through its gRPC stub with protobufs built and read by hand


@dataclass
class OverheadSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    openai_url: str = "http://127.0.0.1:8080"   # the endpoint's base URL (without /v1)
    triton_grpc: str = "127.0.0.1:8001"         # the same server's Triton gRPC address
    triton_model: str = "lm_stream"             # the decoupled model both paths use
    requests: int = 40                          # measured requests per path
    warmup: int = 3                             # requests per path before measuring, excluded
    prompt_tokens: int = 32                     # prompt length in tokens (held-out text)
    max_new_tokens: int = 32
    request_timeout_s: float = 60.0             # seconds per request
    publish: bool = False              # also copy the result to results/<machine-tag>/<model>/
    compare_url: list = field(default_factory=list)  # LABEL=URL: one more endpoint on the same server; repeatable
    no_lean_clients: bool = False  # leave out paths openai-raw and direct-lean (the minimal clients, see above)


async def _timed_pieces(pieces, t_send: float, setup_s: float) -> StreamTiming:
    """The arrival (seconds after t_send) of every token-bearing Piece of one stream, up to the final one; a
    failure is recorded in the timing, not raised. Left early, the stream is closed (which cancels the call)."""
    import contextlib

    rec, tokens = StreamTiming(), []
    rec.setup_s = setup_s
    try:
        async with contextlib.aclosing(pieces) as it:
            async for piece in it:
                now = time.perf_counter() - t_send
                if piece.token_ids:
                    tokens.extend(piece.token_ids)
                    rec.event_times_s.append(now)
                if piece.final:
                    rec.end_s = now
    except Exception as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]
    rec.usage = {"completion_tokens": len(tokens), "token_ids": tokens}
    return rec


async def direct_one(client, tok, prompt: str, s: OverheadSettings, batch_dim: bool) -> StreamTiming:
    """One greedy request straight to Triton's gRPC stream; the arrival of every token response. The clock starts
    when the client has the prompt's text, as the endpoint's does: the direct client tokenizes it (the same Rust
    call the gateway makes) and builds its request tensors inside its TTFT, as the endpoint's JSON body, tokenizing
    and gRPC request are inside the endpoint's (that setup is recorded as setup_ms)."""
    import tritonclient.grpc.aio as aio

    from lmopt.models import encode
    from lmopt.triton_client import GenRequest, stream_aio, stream_request

    t_send = time.perf_counter()
    ids = encode(tok, prompt)
    item = stream_request(aio, GenRequest(input_ids=ids, max_tokens=s.max_new_tokens, temperature=0.0, top_p=1.0),
                          uuid.uuid4().hex[:16], s.triton_model, batch_dim)
    setup_s = time.perf_counter() - t_send
    # the one loop over tritonclient's stream (lmopt.triton_client)
    return await _timed_pieces(stream_aio(client, item, s.request_timeout_s), t_send, setup_s)


async def direct_lean_one(stub, tok, prompt: str, s: OverheadSettings, batch_dim: bool) -> StreamTiming:
    """direct_one through Triton's gRPC stub itself, the request protobuf built and the responses read by hand
    (lmopt.triton_client.infer_request_pb / stream_pb, what the gateway does): the direct path with as little client
    as Python allows, the counterpart of openai-raw."""
    from lmopt.models import encode
    from lmopt.triton_client import GenRequest, infer_request_pb, stream_pb

    t_send = time.perf_counter()
    item = infer_request_pb(GenRequest(input_ids=encode(tok, prompt), max_tokens=s.max_new_tokens, temperature=0.0,
                                       top_p=1.0), os.urandom(8).hex(), s.triton_model, batch_dim)
    setup_s = time.perf_counter() - t_send
    return await _timed_pieces(stream_pb(stub, item, s.request_timeout_s), t_send, setup_s)


async def _measure(s: OverheadSettings) -> dict:
    import aiohttp
    import tritonclient.grpc.aio as aio

    from lmopt.models import load_tokenizer
    from lmopt.serving import held_out_prompts

    tok = load_tokenizer(s.model)
    prompts = held_out_prompts(s.model, max(8, s.requests), s.prompt_tokens)
    grpc = aio.InferenceServerClient(s.triton_grpc)
    raw = None if s.no_lean_clients else RawConnection(s.openai_url)
    lean_channel = None
    if not s.no_lean_clients:
        from lmopt.triton_client import aio_channel

        lean_channel, lean_stub = aio_channel(s.triton_grpc)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.request_timeout_s)) as session:
        try:
            try:
                async with session.get(f"{s.openai_url}/v1/models") as r:
                    if r.status != 200:
                        raise UserError(f"the endpoint at {s.openai_url} answered {r.status} — is Triton up? "
                                        "(make serve-openai)")
                    served = (await r.json())["data"][0]["id"]
            except aiohttp.ClientError as e:
                raise UserError(f"no OpenAI endpoint at {s.openai_url} ({e}) — start it: make serve-openai") from None
            cfg = (await grpc.get_model_config(s.triton_model, as_json=True))["config"]
            batch_dim = int(cfg.get("max_batch_size", 0)) > 0
            urls = {"openai": s.openai_url, **compare_urls(s)}
            clients = {label: (lambda body, u=u: stream_completion(session, u, body)) for label, u in urls.items()}
            if raw is not None:
                urls[RAW] = s.openai_url
                clients[RAW] = raw.stream_completion
            directs = ["direct"] if lean_channel is None else ["direct", LEAN]
            paths = [*directs, *urls]
            rows, mismatches = [], []
            for i in range(s.warmup + s.requests):
                p = prompts[i % len(prompts)]
                order = paths[i % len(paths):] + paths[:i % len(paths)]  # each path first as often
                got = {}
                for path in order:
                    if path in directs:
                        one = direct_one(grpc, tok, p, s, batch_dim) if path == "direct" else \
                            direct_lean_one(lean_stub, tok, p, s, batch_dim)
                        rec = await one
                        rec.text = tok.decode(rec.usage["token_ids"], skip_special_tokens=True)
                    else:
                        rec = await clients[path]({"model": served, "prompt": p, "max_tokens": s.max_new_tokens,
                                                   "temperature": 0})
                    if rec.error:
                        raise UserError(f"{path} request {i} failed: {rec.error}")
                    got[path] = rec
                for path in [*directs[1:], *urls]:
                    if (got["direct"].text, got["direct"].usage["completion_tokens"]) != \
                            (got[path].text, got[path].usage.get("completion_tokens")):
                        mismatches.append({"index": i, "path": path, "direct": got["direct"].text,
                                           path: got[path].text})
                if i >= s.warmup:
                    row = {"index": i, "first": order[0], "direct": got["direct"].metrics(),
                           "openai": got["openai"].metrics()}
                    if len(paths) > 2:
                        row["compare"] = {k: got[k].metrics() for k in [*urls, *directs[1:]] if k != "openai"}
                    rows.append(row)
        finally:
            await grpc.close()
            if raw is not None:
                await raw.close()
            if lean_channel is not None:
                await lean_channel.close()
    return {"served_model": served, "rows": rows, "mismatches": mismatches}


def compare_urls(s: OverheadSettings) -> dict[str, str]:
    """{label: base URL} of --compare-url LABEL=URL (a bare URL is its own label)."""
    out = {}
    for v in s.compare_url:
        label, sep, url = v.partition("=")
        label, url = (label, url) if sep and "://" in url else (v, v)
        if "://" not in url or label in ("direct", "openai", RAW) or label in out:
            raise UserError(f"--compare-url {v!r}: give LABEL=http://HOST:PORT, a new label per endpoint "
                            f"(not 'direct', 'openai' or '{RAW}')")
        out[label] = url.rstrip("/")
    return out


def _stats(rows: list[dict], get) -> dict:
    from lmopt.results import stats

    return {"ttft_ms": stats([get(r)["ttft_ms"] for r in rows]),
            "itl_ms": stats([v for r in rows for v in get(r)["itl_ms"]]),
            "e2e_ms": stats([get(r)["e2e_ms"] for r in rows])}


def _path_summary(rows: list[dict], get, base=lambda r: r["direct"]) -> dict:
    """Stats of one path, its overhead over `base` (the direct path; medians, means) and the paired TTFT
    difference."""
    from lmopt.results import percentile

    x, d = _stats(rows, get), _stats(rows, base)
    return {**x, "overhead_ms": {m: round(x[m]["p50"] - d[m]["p50"], 4) for m in d},
            # tokens can arrive in bursts (several responses queued behind one another), which pulls the ITL median
            # towards zero; the mean ITL ((e2e - TTFT) / (tokens - 1) on average) does not hide in a burst
            "overhead_mean_ms": {m: round(x[m]["mean"] - d[m]["mean"], 4) for m in d},
            # paired: both paths ran the same prompt back to back; the median of the per-request differences
            "paired_ttft_delta_ms_p50": round(percentile([get(r)["ttft_ms"] - base(r)["ttft_ms"]
                                                          for r in rows], 50), 4)}


def summarize(rows: list[dict], compare: dict[str, str] | None = None) -> dict:
    from lmopt.results import percentile, stats

    out = {path: _stats(rows, lambda r, p=path: r[p]) for path in ("direct", "openai")}
    if all("setup_ms" in r["direct"] for r in rows):
        # the direct client's building of its request tensors, inside its TTFT (as the endpoint's tokenizing and
        # request building are inside the endpoint's)
        out["direct"]["setup_ms"] = stats([r["direct"]["setup_ms"] for r in rows])
    o = _path_summary(rows, lambda r: r["openai"])
    out.update({k: o[k] for k in ("overhead_ms", "overhead_mean_ms", "paired_ttft_delta_ms_p50")})
    if compare:
        out["compare"] = {}
        for label, url in compare.items():
            c = _path_summary(rows, lambda r: r["compare"][label])
            # the endpoint against this one, request by request (negative: the endpoint is faster)
            c["paired_ttft_endpoint_minus_this_ms_p50"] = round(percentile(
                [r["openai"]["ttft_ms"] - r["compare"][label]["ttft_ms"] for r in rows], 50), 4)
            out["compare"][label] = {"url": url, **c}
        if RAW in compare and LEAN in compare:
            # the endpoint's overhead with the minimal client on both sides: openai-raw against direct-lean
            m = _path_summary(rows, lambda r: r["compare"][RAW], base=lambda r: r["compare"][LEAN])
            out["minimal_clients"] = {"paths": [RAW, LEAN], **{k: m[k] for k in (
                "overhead_ms", "overhead_mean_ms", "paired_ttft_delta_ms_p50")}}
    return out


def run_overhead(*, settings: OverheadSettings) -> dict:
    from lmopt import results
    from lmopt.serving import result_path

    s = settings
    if s.requests < 1 or s.max_new_tokens < 2 or s.warmup < 0:
        raise UserError("--requests must be >= 1, --max-new-tokens >= 2 (ITL needs two tokens), --warmup >= 0")
    compare_urls(s)  # a malformed --compare-url fails before anything runs
    t0 = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    m = asyncio.run(_measure(s))
    load_after = [round(x, 2) for x in os.getloadavg()]
    if m["mismatches"]:
        raise UserError(f"{len(m['mismatches'])} endpoint answers differ from the direct stream (first: "
                        f"{m['mismatches'][0]}) — the two paths do not run the same request")
    summary = summarize(m["rows"], {**compare_urls(s), **({} if s.no_lean_clients else
                                                         {RAW: s.openai_url, LEAN: s.triton_grpc})})
    path = result_path(s.artifacts, s.model, "x").with_name("openai-overhead.json")
    doc = results.envelope("openai-overhead", settings=asdict(s), summary=summary, samples=m["rows"],
                           versions=results.versions("tritonclient", "nvidia-pytriton", "starlette", "uvicorn",
                                                     "uvloop", "httptools", "aiohttp"),
                           served_model=m["served_model"], wall_s=round(time.time() - t0, 2),
                           # other work on a shared machine shows up as scheduling delay on both paths
                           loadavg_before=load_before, loadavg_after=load_after)
    results.save_result(path, doc, log, publish_model=s.model if s.publish else None)
    d, o = summary["direct"], summary["openai"]
    cmp = summary.get("compare", {})
    w = max([8, *map(len, cmp)])
    print(f"{'path':<{w}} {'TTFT p50':>10} {'ITL p50':>9} {'ITL mean':>9} {'e2e p50':>9}   ({len(m['rows'])} requests "
          f"each, {s.max_new_tokens} tokens, concurrency 1)")
    for name, x in (("direct", d), ("openai", o), *cmp.items()):
        print(f"{name:<{w}} {x['ttft_ms']['p50']:>8.2f}ms {x['itl_ms']['p50']:>7.3f}ms {x['itl_ms']['mean']:>7.3f}ms "
              f"{x['e2e_ms']['p50']:>7.1f}ms")
    for name, x in (("overhead", summary), *((f"{k} overhead", v) for k, v in cmp.items())):
        oh, om = x["overhead_ms"], x["overhead_mean_ms"]
        print(f"{name}: TTFT p50 {oh['ttft_ms']:+.2f} ms (paired {x['paired_ttft_delta_ms_p50']:+.2f} ms), "
              f"ITL p50 {oh['itl_ms']:+.3f} ms, ITL mean {om['itl_ms']:+.3f} ms, e2e p50 {oh['e2e_ms']:+.1f} ms")
    if "minimal_clients" in summary:
        x = summary["minimal_clients"]
        print(f"overhead, minimal clients ({RAW} - {LEAN}): TTFT p50 {x['overhead_ms']['ttft_ms']:+.2f} ms (paired "
              f"{x['paired_ttft_delta_ms_p50']:+.2f} ms), ITL p50 {x['overhead_ms']['itl_ms']:+.3f} ms, ITL mean "
              f"{x['overhead_mean_ms']['itl_ms']:+.3f} ms")
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, OverheadSettings)
    return p


main = cli.main_for(build_parser, OverheadSettings, run_overhead)

if __name__ == "__main__":
    cli.run(main)
