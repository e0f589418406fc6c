"""Streaming load generator for the served LLM: TTFT, inter-token latency, end-to-end latency, tokens/s, requests/s.

    python profile/load_generator.py --model tiny --url 127.0.0.1:8001 --concurrency 1,2,4,8
    python profile/load_generator.py --concurrency 1 --requests 20 --in-process   # + serving overhead vs in-process

Needs a running server (bash serve/run_triton.sh, or `make serve-bench`, which starts and stops it).

Reads:  data/eval.txt (held-out prompts of --prompt-tokens tokens); with --in-process the same engine the server runs
        (lmopt.engines.create_engine over the artifacts' manifests)
Writes: artifacts/<model>/profile/serving-stream-<label>.json  (settings, every request's timestamps, summary)

Why our own client: perf_analyzer times only the first response of a decoupled model (Triton server #4530,
perf_analyzer #298). This is asyncio + tritonclient's gRPC bidirectional stream, one stream per request (as LLM
benchmark clients do), `--concurrency` requests in flight. Bounded: each level stops after --requests measured
requests or --duration-s seconds, whichever comes first. One pre-flight request checks the model answers before
anything is timed; each level starts with --warmup-requests per client, excluded from the figures.
Per request: TTFT = first token response - send; ITL = gaps between tokens (a response carrying several tokens, as
the server sends when tokens come faster than one send, gives each the response's arrival time: gaps of 0, so the
ITL mean stays (last - first) / (tokens - 1)); end-to-end = final response - send. Per level: output tokens/s and
requests/s over the measured window; mean/p50/p90/p95/p99 of each; token responses beside tokens. Every request must
get at least one token response (a model that only answers at the end is not streaming) or the run fails.

--in-process measures, in the same run and interleaved request by request at concurrency 1, the same prompts
through lmopt.generate on the same engine in this process: the difference is what serving costs.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.serving import LoadSettings

log = get_logger("load_generator")


@dataclass
class RequestRecord:
    prompt_index: int
    send_s: float                  # perf_counter seconds, relative to the level's start
    token_times_s: list            # arrival time of each token response, relative to send
    tokens: list                   # token ids received, in order
    token_responses: int           # responses that carried tokens
    end_s: float | None = None     # final response, relative to send
    error: str | None = None
    warmup: bool = False


_TOKENIZERS: dict = {}


def _tokenizer(model: str):
    if model not in _TOKENIZERS:
        from lmopt.models import load_tokenizer

        _TOKENIZERS[model] = load_tokenizer(model)
    return _TOKENIZERS[model]


def _request(prompt: str, s: LoadSettings):
    """The request for one prompt: text, or token ids when the served model takes input_ids (the client tokenizes)."""
    from lmopt.triton_client import GenRequest

    names = {"max_tokens": s.max_tokens_input}
    if s.prompt_input == "input_ids":
        return GenRequest(input_ids=_tokenizer(s.model)(prompt)["input_ids"], max_tokens=s.max_new_tokens, names=names)
    return GenRequest(prompt=prompt, max_tokens=s.max_new_tokens, names={**names, "text_input": s.prompt_input})


async def stream_one(client, prompt: str, index: int, s: LoadSettings, t_origin: float) -> RequestRecord:
    """One request over its own gRPC stream; timestamps of every response until Triton's final flag."""
    import tritonclient.grpc.aio as aio

    from lmopt.triton_client import has_batch_dim, parse_response, stream_request

    item = stream_request(aio, _request(prompt, s), str(index), s.triton_model, has_batch_dim(s.url, s.triton_model))

    async def requests():
        yield item

    t_send = time.perf_counter()
    rec = RequestRecord(index, t_send - t_origin, [], [], 0)
    it = client.stream_infer(requests(), stream_timeout=s.request_timeout_s)
    try:
        async for result, error in it:
            now = time.perf_counter() - t_send
            if error is not None:
                rec.error = str(error).splitlines()[0][:200]
                break
            piece = parse_response(result, s.tokens_output)
            if piece.token_ids:  # a response may carry several tokens (sent together under load): one time each
                rec.tokens.extend(piece.token_ids)
                rec.token_times_s.extend([now] * len(piece.token_ids))
                rec.token_responses += 1
            if piece.final:
                rec.end_s = now
                break
        else:
            rec.error = rec.error or "stream ended without a final response"
    except Exception as e:  # grpc errors (deadline, unavailable) end this request, not the run
        rec.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if rec.end_s is None:  # left early: cancel. A finished call is not cancelled (a cancellation racing the
            it.cancel()        # completion can crash Triton 2.51's gRPC frontend, docs/ENVIRONMENT.md)
    return rec


def request_metrics(r: RequestRecord) -> dict:
    t = r.token_times_s
    return {"ttft_ms": t[0] * 1e3 if t else None,
            "itl_ms": [(b - a) * 1e3 for a, b in zip(t, t[1:])],
            "e2e_ms": r.end_s * 1e3 if r.end_s is not None else None,
            "output_tokens": len(r.tokens)}


def summarize_level(records: list[RequestRecord], concurrency: int, wall_s: float) -> dict:
    from lmopt.results import stats as summarize

    ok = [r for r in records if r.error is None]
    m = [request_metrics(r) for r in ok]
    tokens = sum(x["output_tokens"] for x in m)
    return {
        "concurrency": concurrency, "requests": len(records), "completed": len(ok),
        "failed": len(records) - len(ok), "wall_s": wall_s, "output_tokens": tokens,
        "token_responses": sum(r.token_responses for r in ok),
        "output_tok_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": summarize([x["ttft_ms"] for x in m if x["ttft_ms"] is not None]),
        "itl_ms": summarize([v for x in m for v in x["itl_ms"]]),
        "e2e_ms": summarize([x["e2e_ms"] for x in m]),
        "tokens_per_request": summarize([x["output_tokens"] for x in m]),
    }


async def run_level(url: str, prompts: list[str], concurrency: int, s: LoadSettings) -> tuple[dict, list]:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    try:
        t_origin = time.perf_counter()
        # warm-up: every client's first requests, excluded from the figures
        warm = await asyncio.gather(*(stream_one(client, prompts[i % len(prompts)], i, s, t_origin)
                                      for i in range(concurrency * s.warmup_requests)))
        for r in warm:
            r.warmup = True
        issued = 0
        records: list[RequestRecord] = []
        t0 = time.perf_counter()
        deadline = t0 + s.duration_s

        async def client_loop():
            nonlocal issued
            while issued < s.requests and time.perf_counter() < deadline:
                i = issued
                issued += 1
                records.append(await stream_one(client, prompts[i % len(prompts)], i, s, t0))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return summarize_level(records, concurrency, wall), warm + records


async def _preflight(url: str, prompt: str, s: LoadSettings) -> RequestRecord:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    try:
        return await stream_one(client, prompt, -1, s, time.perf_counter())
    finally:
        await client.close()


OVERHEAD_BLOCK = 8


def _token_times(times: list[float], t0: float, tokens: list[int]) -> dict:
    """One in-process request's timings from its token arrival times (seconds after t0)."""
    return {"ttft_ms": times[0] * 1e3, "itl_ms": [(b - a) * 1e3 for a, b in zip(times, times[1:])],
            "e2e_ms": (time.perf_counter() - t0) * 1e3, "tokens": tokens}


def in_process_overhead(prompts: list[str], s: LoadSettings, n: int) -> dict:
    """Concurrency 1, interleaved in blocks: Triton stream vs lmopt.generate (and lmopt.scheduler) on the same
    engine here."""
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate
    from lmopt.models import load_tokenizer
    from lmopt.results import stats as summarize

    tok = load_tokenizer(s.model)
    engine = create_engine(s.engine, s.model, s.precision, device=s.device, artifacts=s.artifacts,
                           threads=s.threads or None)
    eos = tok.eos_token_id
    # same stopping rule as a served request: EOS ends it, otherwise max_tokens
    params = SamplingParams(max_new_tokens=s.max_new_tokens, stop_token_ids=(eos,) if eos is not None else ())

    from lmopt.engines.slotted import create_slot_engine
    from lmopt.scheduler import Scheduler

    # the same engine behind the scheduler the server runs (its loop thread, pipelined decode where the engine can),
    # consumed from this thread as a client would: what serving adds on top of that is Triton and its IPC
    sched = Scheduler(create_slot_engine(engine, num_slots=1), max_queue=1, name="in-process-scheduler")

    def scheduled(prompt: str) -> dict:
        times: list[float] = []
        t0 = time.perf_counter()
        ids = tok(prompt)["input_ids"]
        req = sched.submit(ids, params, text=False)
        for ev in req.events(timeout=120):
            if ev.token is not None:
                times.append(time.perf_counter() - t0)
        return _token_times(times, t0, req.tokens)

    def local(prompt: str) -> dict:
        times: list[float] = []
        t0 = time.perf_counter()
        ids = tok(prompt)["input_ids"]  # tokenizing is part of what the server does per request
        out = generate(engine, [ids], params, on_token=lambda r, t: times.append(time.perf_counter() - t0))
        return _token_times(times, t0, out.tokens[0])

    async def served_one(client, p: str, i: int) -> dict:
        rec = await stream_one(client, p, i, s, time.perf_counter())
        if rec.error:
            raise UserError(f"request to {s.triton_model} failed during the overhead run: {rec.error}")
        return {**request_metrics(rec), "tokens": rec.tokens}

    async def interleaved():
        import tritonclient.grpc.aio as aio

        # one channel for the whole run, as a real client keeps: connection setup is not per-request overhead
        client = aio.InferenceServerClient(s.url)
        served, inproc, insched, first = [], [], [], {"served": [], "in_process": [], "in_process_scheduler": []}
        try:
            await stream_one(client, prompts[0], -1, s, time.perf_counter())  # warm the channel
            local(prompts[0])  # and the in-process engine
            scheduled(prompts[0])
            # blocks of OVERHEAD_BLOCK requests alternate between the three; each block starts with one request that
            # is not counted (its TTFT is kept apart): when the server and this process share a GPU, the first
            # request after the other process used it pays for the switch between their GPU contexts, which a
            # server that has its GPU to itself never does. Blocks, not single requests, keep drift out all the same.
            for b in range(0, n, OVERHEAD_BLOCK):
                idx = list(range(b, min(n, b + OVERHEAD_BLOCK)))
                warm = prompts[(b + len(prompts) // 2) % len(prompts)]
                first["served"].append((await served_one(client, warm, -1))["ttft_ms"])
                for i in idx:
                    served.append(await served_one(client, prompts[i % len(prompts)], i))
                first["in_process"].append(local(warm)["ttft_ms"])  # blocks the loop on purpose: nothing else runs
                for i in idx:
                    inproc.append(local(prompts[i % len(prompts)]))
                first["in_process_scheduler"].append(scheduled(warm)["ttft_ms"])
                for i in idx:
                    insched.append(scheduled(prompts[i % len(prompts)]))
        finally:
            await client.close()
        return served, inproc, insched, first

    try:
        served, inproc, insched, first = asyncio.run(interleaved())
    finally:
        sched.close()
        engine.close()

    def latency(recs: list[dict]) -> dict:
        return {"ttft_ms": summarize([x["ttft_ms"] for x in recs]),
                "itl_ms": summarize([v for x in recs for v in x["itl_ms"]])}

    def same(recs: list[dict]) -> str:
        return f"{sum(a['tokens'] == b['tokens'] for a, b in zip(recs, inproc))}/{n}"

    sv, ip, sq = latency(served), latency(inproc), latency(insched)
    ttft_s, ttft_l, itl_s, itl_l = sv["ttft_ms"], ip["ttft_ms"], sv["itl_ms"], ip["itl_ms"]
    ttft_q, itl_q = sq["ttft_ms"], sq["itl_ms"]
    return {
        "requests": n, "engine": s.engine, "precision": s.precision, "same_tokens": same(served),
        "served": sv, "in_process": ip,
        # a second baseline: the same engine behind lmopt.scheduler in this process (what Triton adds on top of it)
        "in_process_scheduler": {**sq, "same_tokens": same(insched),
                                 "overhead_ms": {"ttft_p50": ttft_s["p50"] - ttft_q["p50"],
                                                 "itl_mean": itl_s["mean"] - itl_q["mean"]},
                                 "overhead_pct": {"itl_mean": (itl_s["mean"] / itl_q["mean"] - 1) * 100
                                                  if itl_q["mean"] else None}},
        # TTFT: medians, robust to the scheduler hiccups a shared machine adds to either side. ITL: means, because
        # served tokens can arrive in bursts (gaps of 0.1 ms, then one long gap) whose median says nothing about
        # decode speed; the mean is (last - first token) / (tokens - 1) either way.
        "overhead_ms": {"ttft_p50": ttft_s["p50"] - ttft_l["p50"], "itl_p50": itl_s["p50"] - itl_l["p50"],
                        "ttft_mean": ttft_s["mean"] - ttft_l["mean"], "itl_mean": itl_s["mean"] - itl_l["mean"]},
        "overhead_pct": {"itl_mean": (itl_s["mean"] / itl_l["mean"] - 1) * 100 if itl_l["mean"] else None},
        "targets": {"ttft_ms": 2.0, "itl_pct": 10.0},
        "method": f"blocks of {OVERHEAD_BLOCK} requests alternate served / in-process / in-process scheduler; the "
                  "first request of each block is not counted (block_first_ttft_ms)",
        "block_first_ttft_ms": {k: summarize(v) for k, v in first.items()},
        "samples": {"served": served, "in_process": inproc, "in_process_scheduler": insched},
    }


def run_load(*, settings: LoadSettings) -> dict:
    from lmopt.serving import held_out_prompts, result_path, wait_ready, write_result

    s = settings
    try:
        levels = [int(c) for c in s.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency must be a comma list of integers (got '{s.concurrency}')") from None
    if not levels or any(c <= 0 for c in levels):
        raise UserError(f"--concurrency needs levels > 0 (got '{s.concurrency}')")
    for name in ("max_new_tokens", "requests", "num_prompts", "prompt_tokens"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(s, name)})")
    if s.duration_s <= 0:
        raise UserError(f"--duration-s must be > 0 (got {s.duration_s})")
    prompts = held_out_prompts(s.model, s.num_prompts, s.prompt_tokens)
    wait_ready(s.url, s.triton_model, 10.0)
    from lmopt.triton_client import has_batch_dim

    has_batch_dim(s.url, s.triton_model)  # asked once, before any request is timed

    pre = asyncio.run(_preflight(s.url, prompts[0], s))
    if pre.error or not pre.tokens:
        raise UserError(f"pre-flight request to {s.triton_model} at {s.url} failed: "
                        f"{pre.error or 'no tokens streamed'} — check the server log")
    log.info("pre-flight: %d tokens in %.1f ms", len(pre.tokens), (pre.end_s or 0) * 1e3)

    summary, samples = [], {}
    for c in levels:
        row, recs = asyncio.run(run_level(s.url, prompts, c, s))
        if row["failed"]:
            first = next(r.error for r in recs if r.error)
            log.warning("concurrency %d: %d of %d requests failed (first: %s)", c, row["failed"], row["requests"], first)
        if row["token_responses"] < row["requests"] - row["failed"]:
            raise UserError(f"the stream carried {row['output_tokens']} tokens in {row['token_responses']} responses "
                            f"for {row['requests']} requests — {s.triton_model} is not streaming")
        summary.append(row)
        samples[str(c)] = [asdict(r) for r in recs]
        log.info("concurrency %d: %d requests in %.1f s, TTFT p50 %.1f ms, ITL p50 %.2f ms, %.1f tok/s, %.2f req/s",
                 c, row["completed"], row["wall_s"], row["ttft_ms"]["p50"] or 0, row["itl_ms"]["p50"] or 0,
                 row["output_tok_per_s"] or 0, row["requests_per_s"] or 0)

    extra = {"preflight": asdict(pre)}
    if s.in_process:
        log.info("serving overhead: %d requests, Triton vs in-process %s %s, interleaved", s.requests, s.engine,
                 s.precision)
        extra["overhead"] = in_process_overhead(prompts, s, s.requests)
        o = extra["overhead"]["overhead_ms"]
        log.info("serving overhead: TTFT p50 %+.2f ms, ITL mean %+.3f ms (targets +2 ms / +10%%)", o["ttft_p50"],
                 o["itl_mean"])
        q = extra["overhead"]["in_process_scheduler"]["overhead_ms"]
        log.info("over the scheduler in-process: TTFT p50 %+.2f ms, ITL mean %+.3f ms", q["ttft_p50"], q["itl_mean"])
    out = result_path(s.artifacts, s.model, f"stream-{s.label}")
    write_result(out, "streaming_load", asdict(s), samples, summary, extra)
    log.info("Saving results to %s", out)
    _print_table(summary, s, extra.get("overhead"))
    return {"path": str(out), "summary": summary, **extra}


def _print_table(summary: list[dict], s: LoadSettings, overhead: dict | None) -> None:
    print(f"streaming {s.triton_model} [{s.label}] prompt {s.prompt_tokens} tok, max_tokens {s.max_new_tokens}")
    print(f"{'conc':>4} {'req':>4} {'fail':>4} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'e2e p50':>8} "
          f"{'p99':>7} {'tok/s':>7} {'req/s':>6}")
    for r in summary:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
        print(f"{r['concurrency']:>4} {r['completed']:>4} {r['failed']:>4} {t['p50'] or 0:>9.1f} {t['p99'] or 0:>7.1f} "
              f"{i['p50'] or 0:>8.2f} {i['p99'] or 0:>7.2f} {e['p50'] or 0:>8.1f} {e['p99'] or 0:>7.1f} "
              f"{r['output_tok_per_s'] or 0:>7.1f} {r['requests_per_s'] or 0:>6.2f}")
    if overhead:
        sv, ip, o = overhead["served"], overhead["in_process"], overhead["overhead_ms"]
        print(f"overhead at concurrency 1 (ms): TTFT p50 served {sv['ttft_ms']['p50']:.2f} vs in-process "
              f"{ip['ttft_ms']['p50']:.2f} ({o['ttft_p50']:+.2f}); ITL mean served {sv['itl_ms']['mean']:.3f} vs "
              f"in-process {ip['itl_ms']['mean']:.3f} ({o['itl_mean']:+.3f}); same tokens {overhead['same_tokens']}")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, LoadSettings)
    return p


main = cli.main_for(build_parser, LoadSettings, run_load)


if __name__ == "__main__":
    cli.run(main)
