"""Streaming load generator for the served LLM: TTFT, inter-token latency, end-to-end latency, tokens/s, requests/s,
goodput; closed-loop concurrency levels and open-loop Poisson request rates, on a stated workload.

    python profile/load_generator.py --model tiny --url 127.0.0.1:8001 --concurrency 1,2,4,8
    python profile/load_generator.py --workload random --prompt-tokens 256 --max-new-tokens 128 --ignore-eos \
        --concurrency 1,4,16,64 --request-rate 10,40,inf --ceiling --in-process-levels 64   # the serving benchmark
    python profile/load_generator.py --concurrency 1 --requests 20 --in-process   # + serving overhead vs in-process

Needs a running server (bash serve/run_triton.sh, or `make serve-bench`, which starts and stops it), except with
--backend inprocess. docs/serving_benchmark.md describes the workloads, the objective and every figure.

Reads:  data/eval.txt, data/calib.txt (prompts, lmopt.serving.build_workload); with --in-process, --ceiling or
        --in-process-levels the same engine the server runs (lmopt.engines.create_engine over the artifacts)
Writes: artifacts/<model>/profile/serving-stream-<label>.json  (settings, every request's timestamps, summary)

Why our own client: perf_analyzer times only the first response of a decoupled model (Triton server #4530,
perf_analyzer #298); aiperf times the OpenAI endpoint only (profile/aiperf_compare.py runs it beside this one).
This is asyncio over Triton's gRPC stream (lmopt.triton_client.stream_pb: one stream per request, as LLM benchmark
clients do), the OpenAI endpoint (lmopt.openai_client, --backend openai) or lmopt.scheduler in this process
(--backend inprocess); the same request stream (lmopt.serving.build_workload, request i is workload item i) for each.
Closed loop (--concurrency): that many clients, each sending its next request when the last one ends; a level stops
after --requests measured requests or --duration-s seconds, whichever comes first; each level starts with
--warmup-requests per client, excluded. Open loop (--request-rate): requests sent at seeded Poisson arrival times
whether or not earlier ones finished (`inf`: all at once), --rate-requests of them.
Per request: TTFT = first token - send; ITL = gaps between tokens (a response carrying several tokens gives each the
response's arrival time: gaps of 0, so the ITL mean stays (last - first) / (tokens - 1)); end-to-end = final response
- send. Per level: output tokens/s and requests/s over the measured window; mean/p50/p90/p95/p99 of each; failed
requests; mean occupancy (requests between first token and end, time-averaged: the decode batch the engine saw);
goodput = requests/s of those with TTFT <= --objective-ttft-ms and their own ITL p99 <= --objective-itl-ms, and
whether the level as a whole met the objective (TTFT p99 and ITL p99 within it, nothing failed).

--ceiling: the engine's ceiling for this workload at each closed-loop level, in this process with no server: one
decode step timed at the level's measured mean occupancy (mean context of the workload) plus the measured prefill of
the same prompts; tokens/s = mean output / (prefill per request + (mean output - 1) x step / occupancy).
--in-process-levels: the same request stream at those levels through lmopt.scheduler over the same engine in this
process (what the server runs, minus Triton). --endpoint-levels: at those levels, the OpenAI endpoint (--openai-url)
and the gRPC stream alternate (gRPC, endpoint, gRPC, endpoint) on the same server.
--in-process measures, in the same run and interleaved in blocks at concurrency 1, the same prompts through
lmopt.generate on the same engine in this process: the difference is what serving costs.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import asyncio
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.serving import LoadSettings

log = get_logger("load_generator")
BACKENDS = ("triton", "openai", "inprocess")


@dataclass
class RequestRecord:
    prompt_index: int
    send_s: float                  # perf_counter seconds, relative to the level's start
    token_times_s: list            # arrival time of each token (or each streamed event), relative to send
    tokens: list                   # token ids received, in order (the OpenAI endpoint streams text: empty there)
    token_responses: int           # responses that carried tokens
    end_s: float | None = None     # final response, relative to send
    error: str | None = None
    warmup: bool = False
    input_tokens: int = 0
    output_tokens: int | None = None   # tokens the server counted (OpenAI usage); None = len(tokens)


def _n_out(r: RequestRecord) -> int:
    return r.output_tokens if r.output_tokens is not None else len(r.tokens)


class TritonBackend:
    """Triton's gRPC stream (lmopt.triton_client: the request protobuf built directly, token ids read from the raw
    response bytes), one grpc.aio channel per level, one stream per request."""

    def __init__(self, s: LoadSettings):
        from lmopt.triton_client import has_batch_dim

        self.s = s
        self.batch_dim = has_batch_dim(s.url, s.triton_model)   # asked once, before any request is timed

    async def open(self):
        from lmopt.triton_client import aio_channel

        self.channel, self.stub = aio_channel(self.s.url)

    async def close(self):
        await self.channel.close()

    async def send(self, item, index: int, t_origin: float) -> RequestRecord:
        import contextlib

        from lmopt.triton_client import GenRequest, infer_request_pb, stream_pb

        s = self.s
        names = {"max_tokens": s.max_tokens_input}
        eos = True if s.ignore_eos else None
        if s.prompt_input == "input_ids":
            req = GenRequest(input_ids=item.prompt_ids, max_tokens=item.max_tokens, ignore_eos=eos, names=names)
        else:
            req = GenRequest(prompt=item.prompt, max_tokens=item.max_tokens, ignore_eos=eos,
                             names={**names, "text_input": s.prompt_input})
        t_send = time.perf_counter()
        rec = RequestRecord(index, t_send - t_origin, [], [], 0, input_tokens=len(item.prompt_ids))
        pb = infer_request_pb(req, str(index), s.triton_model, self.batch_dim)
        try:
            async with contextlib.aclosing(stream_pb(self.stub, pb, s.request_timeout_s)) as pieces:
                async for piece in pieces:
                    now = time.perf_counter() - t_send
                    if piece.token_ids:  # a response may carry several tokens (sent together): one time each
                        rec.tokens.extend(piece.token_ids)
                        rec.token_times_s.extend([now] * len(piece.token_ids))
                        rec.token_responses += 1
                    if piece.final:
                        rec.end_s = now
            if rec.end_s is None:
                rec.error = "stream ended without a final response"
        except Exception as e:  # a server error or the call's own (deadline, unavailable) ends this request only
            rec.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return rec


class OpenAIBackend:
    """The OpenAI endpoint (completions, streamed), prompts sent as token ids: lmopt.openai_client over aiohttp."""

    def __init__(self, s: LoadSettings):
        if not s.openai_url:
            raise UserError("--backend openai (or --endpoint-levels) needs --openai-url http://HOST:PORT")
        self.s = s

    async def open(self):
        import aiohttp

        conn = aiohttp.TCPConnector(limit=0)   # one connection per stream in flight, as many as the level has
        self.session = aiohttp.ClientSession(connector=conn,
                                             timeout=aiohttp.ClientTimeout(total=self.s.request_timeout_s))
        deadline = time.monotonic() + self.s.ready_timeout_s   # the gateway may still be starting
        while True:
            try:
                async with self.session.get(f"{self.s.openai_url}/v1/models") as r:
                    if r.status == 200:
                        self.served = (await r.json())["data"][0]["id"]
                        return
                    last = f"HTTP {r.status}"
            except aiohttp.ClientError as e:
                last = str(e)[:120]
            if time.monotonic() > deadline:
                await self.session.close()
                raise UserError(f"no OpenAI endpoint at {self.s.openai_url} ({last}) — start it: make serve-openai")
            await asyncio.sleep(0.5)

    async def close(self):
        await self.session.close()

    async def send(self, item, index: int, t_origin: float) -> RequestRecord:
        from lmopt.openai_client import stream_completion

        body = {"model": self.served, "prompt": list(item.prompt_ids), "max_tokens": item.max_tokens,
                "temperature": 0, "stream_options": {"include_usage": True}}
        if self.s.ignore_eos:
            body["ignore_eos"] = True
        t_send = time.perf_counter()
        try:
            t = await stream_completion(self.session, self.s.openai_url, body)
        except Exception as e:  # noqa: BLE001
            return RequestRecord(index, t_send - t_origin, [], [], 0, error=f"{type(e).__name__}: {e}"[:200],
                                 input_tokens=len(item.prompt_ids))
        return RequestRecord(index, t_send - t_origin, list(t.event_times_s), [], len(t.event_times_s), t.end_s,
                             t.error, input_tokens=len(item.prompt_ids),
                             output_tokens=t.usage.get("completion_tokens", len(t.event_times_s)))


class InProcessBackend:
    """lmopt.scheduler over the same engine in this process (no Triton): what the server runs, as the server runs
    it. Token times are taken on the scheduler's thread as each token is handed out; the asyncio loop is woken once
    per request (when it ends), so the client costs the scheduler as little as it can."""

    def __init__(self, s: LoadSettings, engine, slot_engine):
        from lmopt.scheduler import Scheduler

        self.s = s
        self.sched = Scheduler(slot_engine, max_queue=s.max_queue, name="in-process-scheduler")

    async def open(self):
        pass

    async def close(self):
        pass

    def shutdown(self):
        self.sched.close()

    async def send(self, item, index: int, t_origin: float) -> RequestRecord:
        from lmopt.generate import SamplingParams

        loop = asyncio.get_running_loop()
        done = loop.create_future()
        t_send = time.perf_counter()
        rec = RequestRecord(index, t_send - t_origin, [], [], 0, input_tokens=len(item.prompt_ids))

        def on_event(ev):   # the scheduler's thread
            now = time.perf_counter() - t_send
            if ev.token is not None:
                rec.tokens.append(ev.token)
                rec.token_times_s.append(now)
                rec.token_responses += 1
            if ev.finished:
                rec.end_s = now
                if ev.finish_reason == "error":
                    rec.error = ev.error or "generation failed"
                loop.call_soon_threadsafe(done.set_result, None)

        eos = self.s.ignore_eos or _eos(self.s.model) is None
        params = SamplingParams(max_new_tokens=item.max_tokens, stop_token_ids=() if eos else (_eos(self.s.model),))
        try:
            self.sched.submit(item.prompt_ids, params, on_event=on_event, text=False)
        except UserError as e:   # ServerBusy included: the queue is full
            rec.error = str(e)[:200]
            return rec
        await done
        return rec


_TOKENIZERS: dict = {}
_LOOP: list = []


def _run(coro):
    """Run on this process's one event loop: grpc.aio binds its poller to the first loop it runs on, so a second
    asyncio.run() would leave it posting to a closed loop."""
    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
    return _LOOP[0].run_until_complete(coro)




def _tokenizer(model: str):
    if model not in _TOKENIZERS:
        from lmopt.models import load_tokenizer

        _TOKENIZERS[model] = load_tokenizer(model)
    return _TOKENIZERS[model]


def _eos(model: str):
    return _tokenizer(model).eos_token_id


def request_metrics(r: RequestRecord) -> dict:
    t = r.token_times_s
    return {"ttft_ms": t[0] * 1e3 if t else None,
            "itl_ms": [(b - a) * 1e3 for a, b in zip(t, t[1:])],
            "e2e_ms": r.end_s * 1e3 if r.end_s is not None else None,
            "output_tokens": _n_out(r)}


def _good(m: dict, s: LoadSettings) -> bool:
    from lmopt.results import percentile

    return (m["ttft_ms"] is not None and m["ttft_ms"] <= s.objective_ttft_ms
            and (percentile(m["itl_ms"], 99) or 0.0) <= s.objective_itl_ms)


def occupancy(records: list[RequestRecord], wall_s: float) -> dict:
    """Time-averaged requests in flight (send to end) and decoding (first token to end) over the window."""
    ok = [r for r in records if r.end_s is not None]
    if wall_s <= 0 or not ok:
        return {"in_flight": None, "decoding": None}
    return {"in_flight": sum(r.end_s for r in ok) / wall_s,
            "decoding": sum(r.end_s - r.token_times_s[0] for r in ok if r.token_times_s) / wall_s}


def summarize_level(records: list[RequestRecord], level, wall_s: float, s: LoadSettings | None = None,
                    mode: str = "concurrency") -> dict:
    from lmopt.results import stats as summarize

    s = s or LoadSettings()
    ok = [r for r in records if r.error is None]
    m = [request_metrics(r) for r in ok]
    tokens = sum(x["output_tokens"] for x in m)
    good = sum(_good(x, s) for x in m)
    row = {
        "mode": mode, "level": level, "concurrency": level if mode == "concurrency" else None,
        "requests": len(records), "completed": len(ok),
        "failed": len(records) - len(ok), "wall_s": wall_s, "output_tokens": tokens,
        "token_responses": sum(r.token_responses for r in ok),
        "output_tok_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": summarize([x["ttft_ms"] for x in m if x["ttft_ms"] is not None]),
        "itl_ms": summarize([v for x in m for v in x["itl_ms"]]),
        "e2e_ms": summarize([x["e2e_ms"] for x in m]),
        "tokens_per_request": summarize([x["output_tokens"] for x in m]),
        "input_tokens": summarize([r.input_tokens for r in ok]),
        "occupancy": occupancy(ok, wall_s),
        "goodput_rps": good / wall_s if wall_s > 0 else None, "good_requests": good,
    }
    t99, i99 = row["ttft_ms"]["p99"], row["itl_ms"]["p99"]
    row["meets_objective"] = bool(ok) and not row["failed"] and t99 is not None and t99 <= s.objective_ttft_ms \
        and (i99 or 0.0) <= s.objective_itl_ms
    return row


async def closed_level(backend, items: list, concurrency: int, s: LoadSettings) -> tuple[dict, list]:
    """`concurrency` clients, each sending its next request when its last one ended; warm-up first."""
    await backend.open()
    try:
        t_origin = time.perf_counter()
        # warm-up: every client's first requests, excluded from the figures
        warm = await asyncio.gather(*(backend.send(items[i % len(items)], i, t_origin)
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
                records.append(await backend.send(items[i % len(items)], i, t0))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await backend.close()
    row = summarize_level(records, concurrency, wall, s)
    row["window_perf_s"] = [t0, t0 + wall]   # perf_counter (CLOCK_MONOTONIC: the same clock in every process here)
    return row, warm + records


async def open_level(backend, items: list, rate: float, s: LoadSettings, seed: int) -> tuple[dict, list]:
    """Requests sent at Poisson arrival times of `rate` per second (inf: all at once), whatever is in flight."""
    n = s.rate_requests or s.requests
    rng = random.Random(seed)
    await backend.open()
    try:
        t0 = time.perf_counter()
        tasks, at = [], 0.0
        for i in range(n):
            if math.isfinite(rate):
                at += rng.expovariate(rate)
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.perf_counter() - t0 > s.duration_s:
                    break
            tasks.append(asyncio.ensure_future(backend.send(items[i % len(items)], i, t0)))
        records = list(await asyncio.gather(*tasks))
        wall = max((r.send_s + (r.end_s or 0.0) for r in records), default=0.0)
    finally:
        await backend.close()
    row = summarize_level(records, rate if math.isfinite(rate) else "inf", wall, s, mode="rate")
    row["offered_rps"] = rate if math.isfinite(rate) else None
    row["window_perf_s"] = [t0, t0 + wall]
    return row, records


OVERHEAD_BLOCK = 8


def _token_times(times: list[float], t0: float, tokens: list[int]) -> dict:
    """One in-process request's timings from its token arrival times (seconds after t0)."""
    return {"ttft_ms": times[0] * 1e3, "itl_ms": [(b - a) * 1e3 for a, b in zip(times, times[1:])],
            "e2e_ms": (time.perf_counter() - t0) * 1e3, "tokens": tokens}


def in_process_engines(s: LoadSettings):
    """The engine the server runs, built as serve/templates/model.py builds it (slots, max length, prefill chunk,
    captured decode buckets), and its slot interface: for the overhead run, the in-process scheduler and the
    ceiling."""
    from lmopt.engines import create_engine
    from lmopt.engines.slots import SlotEngine
    from lmopt.engines.slotted import create_slot_engine

    kwargs = {}
    if s.engine == "compiled":
        kwargs = {"num_slots": s.slots or None, "max_len": s.max_len or None, "max_prefill_chunk": s.prefill_chunk}
        if s.kv_layout == "paged":   # the server's paged KV cache (serve/templates/model.py passes the same)
            kwargs.update(kv_layout="paged", block_size=s.kv_block_size, num_blocks=s.kv_num_blocks or None,
                          kv_memory_fraction=s.kv_memory_fraction or None, prefix_cache=s.prefix_cache,
                          paged_attention=s.paged_attention)
    t0 = time.perf_counter()
    engine = create_engine(s.engine, s.model, s.precision, device=s.device, artifacts=s.artifacts,
                           threads=s.threads or None, **kwargs)
    native = isinstance(engine, SlotEngine)
    if s.capture_kv and native and engine.capabilities.capture:   # as the server does at load
        engine.capture(list(engine.capabilities.batch_buckets), s.capture_kv)
        # and one row at the smallest KV bucket: the 1-stream comparison's short prompts start there
        engine.capture([1], min(getattr(engine, "kv_buckets", [s.capture_kv])))
    slots = create_slot_engine(engine, num_slots=None if native else (s.slots or 8),
                               max_prefill_chunk=s.prefill_chunk)
    log.info("in-process engine %s %s on %s ready in %.1f s", s.engine, s.precision, s.device,
             time.perf_counter() - t0)
    return engine, slots


def in_process_overhead(items: list, s: LoadSettings, n: int, engine, slot_engine) -> dict:
    """Concurrency 1, interleaved in blocks: Triton stream vs lmopt.generate (and lmopt.scheduler) on the same
    engine here."""
    from lmopt.generate import SamplingParams, generate
    from lmopt.results import stats as summarize
    from lmopt.scheduler import Scheduler

    eos = _eos(s.model)
    # same stopping rule as a served request: EOS ends it (unless --ignore-eos), otherwise max_tokens

    def params(item) -> SamplingParams:
        return SamplingParams(max_new_tokens=item.max_tokens,
                              stop_token_ids=(eos,) if eos is not None and not s.ignore_eos else ())

    # the same engine behind the scheduler the server runs (its loop thread, pipelined decode where the engine can),
    # consumed from this thread as a client would: what serving adds on top of that is Triton and its IPC
    sched = Scheduler(slot_engine, max_queue=1, name="in-process-scheduler")

    def scheduled(item) -> dict:
        times: list[float] = []
        t0 = time.perf_counter()
        req = sched.submit(item.prompt_ids, params(item), text=False)
        for ev in req.events(timeout=120):
            if ev.token is not None:
                times.append(time.perf_counter() - t0)
        return _token_times(times, t0, req.tokens)

    def local(item) -> dict:
        times: list[float] = []
        t0 = time.perf_counter()
        out = generate(engine, [item.prompt_ids], params(item),
                       on_token=lambda r, t: times.append(time.perf_counter() - t0))
        return _token_times(times, t0, out.tokens[0])

    backend = TritonBackend(s)

    async def served_one(item, i: int) -> dict:
        rec = await backend.send(item, i, time.perf_counter())
        if rec.error:
            raise UserError(f"request to {s.triton_model} failed during the overhead run: {rec.error}")
        return {**request_metrics(rec), "tokens": rec.tokens}

    async def interleaved():
        # one channel for the whole run, as a real client keeps: connection setup is not per-request overhead
        await backend.open()
        served, inproc, insched, first = [], [], [], {"served": [], "in_process": [], "in_process_scheduler": []}
        try:
            await served_one(items[0], -1)  # warm the channel
            local(items[0])  # and the in-process engine
            scheduled(items[0])
            # blocks of OVERHEAD_BLOCK requests alternate between the three; each block starts with one request that
            # is not counted (its TTFT is kept apart): when the server and this process share a GPU, the first
            # request after the other process used it pays for the switch between their GPU contexts, which a
            # server that has its GPU to itself never does. Blocks, not single requests, keep drift out all the same.
            for b in range(0, n, OVERHEAD_BLOCK):
                idx = list(range(b, min(n, b + OVERHEAD_BLOCK)))
                warm = items[(b + len(items) // 2) % len(items)]
                first["served"].append((await served_one(warm, -1))["ttft_ms"])
                for i in idx:
                    served.append(await served_one(items[i % len(items)], i))
                first["in_process"].append(local(warm)["ttft_ms"])  # blocks the loop on purpose: nothing else runs
                for i in idx:
                    inproc.append(local(items[i % len(items)]))
                first["in_process_scheduler"].append(scheduled(warm)["ttft_ms"])
                for i in idx:
                    insched.append(scheduled(items[i % len(items)]))
        finally:
            await backend.close()
        return served, inproc, insched, first

    try:
        served, inproc, insched, first = _run(interleaved())
    finally:
        sched.close()

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


def engine_ceiling(slot_engine, items: list, occupancies: dict, mean_output: float, repeats: int = 32) -> dict:
    """The engine's ceiling for this workload, in-process: the prefill of the same prompts (each alone, and in
    batches where the engine prefills several at once: the cheaper per prompt counts) and one decode step at each
    level's measured decode occupancy, at the workload's mean context; tokens/s per level =
    mean output / (prefill per request + (mean output - 1) x step / occupancy)."""
    import statistics

    eng = slot_engine
    sync = getattr(eng, "synchronize", None) or (lambda: None)
    caps = eng.capabilities
    greedy_on_device = caps.device_feed

    def prefill(group) -> tuple[float, list, list]:
        slots = [eng.alloc_slot() for _ in group]
        if any(x is None for x in slots):
            raise UserError(f"the engine has fewer than {len(group)} free slots for the ceiling run")
        sync()
        t = time.perf_counter()
        # as the scheduler feeds it: chunks of at most the engine's max_prefill_chunk; a group's first chunks in one
        # batched call, the rest of each prompt slot by slot
        k = caps.max_prefill_chunk
        if len(group) > 1:
            out = eng.prefill_slots(slots, [it.prompt_ids[:k] for it in group])
        else:
            out = eng.prefill_slot(slots[0], group[0].prompt_ids[:k])
        first = [int(x) for x in out.argmax()]
        for i, (slot, it) in enumerate(zip(slots, group)):
            for a in range(k, len(it.prompt_ids), k):
                o = eng.prefill_slot(slot, it.prompt_ids[a:a + k])
                if a + k >= len(it.prompt_ids):
                    first[i] = int(o.argmax()[0])
        sync()
        return time.perf_counter() - t, slots, first

    def free(slots):
        for x in slots:
            eng.free_slot(x)

    k = min(len(items), repeats)
    for it in items[:k]:   # warm-up: every prompt's shape once (an engine may compile or capture a shape on first use)
        free(prefill([it])[1])
    single = []
    for it in items[:k]:
        dt, slots, _ = prefill([it])
        free(slots)
        single.append(dt)
    per_prompt = {"single": statistics.median(single)}
    if caps.batched_prefill and eng.num_free_slots() >= 4:
        g = min(8, eng.num_free_slots())
        batched = []
        for b in [0] + list(range(0, max(k, 2 * g), g)):   # the first group twice: a warm-up
            group = [items[(b + j) % len(items)] for j in range(g)]
            dt, slots, _ = prefill(group)
            free(slots)
            batched.append(dt / g)
        per_prompt[f"batched_{g}"] = statistics.median(batched[1:] or batched)
    prefill_s = min(per_prompt.values())
    mean_in = statistics.mean(len(it.prompt_ids) for it in items)

    def decode_step_s(rows: int) -> float:
        slots, feed = [], []
        for b in range(0, rows, 8):   # prefill the rows in groups, as admissions would
            group = [items[(b + j) % len(items)] for j in range(min(8, rows - b))]
            if len(group) > 1 and caps.batched_prefill:
                _, sl, first = prefill(group)
            else:
                sl, first = [], []
                for it in group:
                    _, x, f = prefill([it])
                    sl += x
                    first += f
            slots += sl
            feed += first
        try:
            # from the prompt to the workload's mean context (prompt + half the output), untimed
            for _ in range(max(16, int(mean_output // 2))):
                feed = [int(x) for x in eng.decode_slots(slots, feed).argmax()]
            # blocks of 8 steps, the median block: each step fed on the device where the engine can (no host round
            # trip: its best), else from the argmax on the host
            blocks = []
            for _ in range(max(1, repeats // 8)):
                sync()
                t = time.perf_counter()
                for i in range(8):
                    out = eng.decode_slots(slots, [None] * rows if greedy_on_device and i else feed)
                    if not greedy_on_device or i == 7:
                        feed = [int(x) for x in out.argmax()]
                sync()
                blocks.append((time.perf_counter() - t) / 8)
            return statistics.median(blocks)
        finally:
            free(slots)

    levels, steps = {}, {}
    max_rows = eng.num_free_slots()
    for level, occ in occupancies.items():
        rows = max(1, min(max_rows, round(occ or 1)))
        if rows not in steps:
            steps[rows] = decode_step_s(rows)
        t_d = steps[rows]
        occ = min(float(occ or 1), float(max_rows))
        tok_s = mean_output / (prefill_s + (mean_output - 1) * t_d / occ)
        levels[str(level)] = {"occupancy": occ, "decode_rows": rows, "decode_step_ms": t_d * 1e3,
                              "decode_tok_per_s": rows / t_d, "prefill_ms_per_request": prefill_s * 1e3,
                              "output_tok_per_s": tok_s}
        log.info("ceiling at level %s: occupancy %.1f, step %.3f ms, prefill %.2f ms/request -> %.0f tok/s", level,
                 occ, t_d * 1e3, prefill_s * 1e3, tok_s)
    return {"prefill_ms_per_prompt": {k: v * 1e3 for k, v in per_prompt.items()}, "mean_input_tokens": mean_in,
            "mean_output_tokens": mean_output, "prefill_requests": k, "decode_steps_timed": repeats,
            "fed_on_device": greedy_on_device, "levels": levels,
            "method": "prefill: median over the workload's first prompts, alone and in batches (the cheaper per "
                      "prompt); decode: one step at round(occupancy) rows at the workload's mean context; tokens/s "
                      "= mean output / (prefill + (mean output - 1) x step / occupancy)"}


def _levels(text: str, what: str, allow_inf: bool = False) -> list:
    out = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            v = float(x) if allow_inf else int(x)
        except ValueError:
            raise UserError(f"--{what} must be a comma list of {'numbers (or inf)' if allow_inf else 'integers'} "
                            f"(got '{text}')") from None
        if not v > 0:
            raise UserError(f"--{what} needs levels > 0 (got '{text}')")
        out.append(v)
    return out


def _compact(r: RequestRecord) -> dict:
    """A request in a few numbers (the samples of a long run; the full token times stay out)."""
    m = request_metrics(r)
    from lmopt.results import percentile

    return {"i": r.prompt_index, "send_s": round(r.send_s, 5), "in": r.input_tokens, "out": m["output_tokens"],
            "ttft_ms": None if m["ttft_ms"] is None else round(m["ttft_ms"], 3),
            "e2e_ms": None if m["e2e_ms"] is None else round(m["e2e_ms"], 3),
            "itl_p99_ms": None if not m["itl_ms"] else round(percentile(m["itl_ms"], 99), 3),
            "itl_mean_ms": None if not m["itl_ms"] else round(sum(m["itl_ms"]) / len(m["itl_ms"]), 4),
            "responses": r.token_responses, "error": r.error, "warmup": r.warmup}


def run_load(*, settings: LoadSettings) -> dict:
    from lmopt.serving import build_workload, result_path, wait_ready, write_result

    s = settings
    levels = _levels(s.concurrency, "concurrency")
    rates = _levels(s.request_rate, "request-rate", allow_inf=True)
    endpoint_levels = _levels(s.endpoint_levels, "endpoint-levels")
    inproc_levels = _levels(s.in_process_levels, "in-process-levels")
    if not levels and not rates:
        raise UserError(f"--concurrency needs levels > 0 (got '{s.concurrency}'), or give --request-rate")
    for name in ("max_new_tokens", "requests", "num_prompts", "prompt_tokens"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(s, name)})")
    if s.duration_s <= 0:
        raise UserError(f"--duration-s must be > 0 (got {s.duration_s})")
    if s.backend not in BACKENDS:
        raise UserError(f"unknown --backend '{s.backend}' — use one of {', '.join(BACKENDS)}")
    items = build_workload(s.model, s.workload, s.num_prompts, s.prompt_tokens, s.max_new_tokens,
                           s.length_spread if s.workload != "fixed" else 0.0, s.seed)
    engine = slot_engine = None
    if s.backend == "inprocess" or s.in_process or s.ceiling or inproc_levels:
        engine, slot_engine = in_process_engines(s)
    extra: dict = {"workload": {"kind": s.workload, "requests": len(items),
                                "input_tokens": _stats([len(i.prompt_ids) for i in items]),
                                "output_tokens": _stats([i.max_tokens for i in items]),
                                "ignore_eos": s.ignore_eos},
                   "objective": {"ttft_p99_ms": s.objective_ttft_ms, "itl_p99_ms": s.objective_itl_ms}}
    try:
        if s.backend == "inprocess":
            backend = InProcessBackend(s, engine, slot_engine)
        else:
            if s.backend == "triton":
                wait_ready(s.url, s.triton_model, s.ready_timeout_s)
            backend = TritonBackend(s) if s.backend == "triton" else OpenAIBackend(s)

            async def preflight():
                await backend.open()
                try:
                    return await backend.send(items[0], -1, time.perf_counter())
                finally:
                    await backend.close()

            pre = _run(preflight())
            if pre.error or not _n_out(pre):
                where = s.url if s.backend == "triton" else s.openai_url
                raise UserError(f"pre-flight request to {s.triton_model} at {where} failed: "
                                f"{pre.error or 'no tokens streamed'} — check the server log")
            log.info("pre-flight: %d tokens in %.1f ms", _n_out(pre), (pre.end_s or 0) * 1e3)
            extra["preflight"] = asdict(pre)
        if s.warm_short and not isinstance(backend, InProcessBackend):
            # the workload's shortest prompts at 1, 2 and 4 streams, untimed: an engine that compiles a shape on
            # first use (the compiled engine's decode graphs at a smaller KV bucket) does it now, not in a level
            short = sorted(items, key=lambda it: len(it.prompt_ids))[:8]
            t = time.perf_counter()
            for c in (1, 2, 4):
                _run(closed_level(backend, short, c, replace(s, requests=2 * c, warmup_requests=0)))
            log.info("warm-up on the %d shortest prompts at 1, 2, 4 streams: %.1f s", len(short),
                     time.perf_counter() - t)
        summary, samples = _sweep(backend, items, levels, rates, s)
        if isinstance(backend, InProcessBackend):
            backend.shutdown()
        if endpoint_levels:
            extra["endpoint"] = _endpoint_vs_grpc(items, endpoint_levels, s)
        if inproc_levels:
            ib = InProcessBackend(s, engine, slot_engine)
            try:
                rows, _ = _sweep(ib, items, inproc_levels, [], s)
            finally:
                ib.shutdown()
            extra["in_process_scheduler"] = rows
            served = {r["level"]: r for r in summary if r["mode"] == "concurrency"}
            for r in rows:
                sv = served.get(r["level"])
                if sv and r["output_tok_per_s"]:
                    r["served_over_in_process"] = sv["output_tok_per_s"] / r["output_tok_per_s"]
                log.info("in-process scheduler at %s: %.0f tok/s (served/in-process %.2f)", r["level"],
                         r["output_tok_per_s"] or 0, r.get("served_over_in_process") or 0)
        if s.ceiling:
            closed = [r for r in summary if r["mode"] == "concurrency" and r["completed"]]
            mean_out = sum(r["output_tokens"] for r in closed) / max(1, sum(r["completed"] for r in closed))
            extra["ceiling"] = engine_ceiling(slot_engine, items, {r["level"]: r["occupancy"]["decoding"]
                                                                   for r in closed}, mean_out)
            for r in closed:
                c = extra["ceiling"]["levels"][str(r["level"])]
                r["ceiling_tok_per_s"] = c["output_tok_per_s"]
                r["served_over_ceiling"] = (r["output_tok_per_s"] or 0) / c["output_tok_per_s"]
        if s.in_process:
            n = s.overhead_requests or s.requests
            log.info("serving overhead: %d requests, Triton vs in-process %s %s, interleaved", n, s.engine,
                     s.precision)
            extra["overhead"] = in_process_overhead(items, s, n, engine, slot_engine)
            o = extra["overhead"]["overhead_ms"]
            log.info("serving overhead: TTFT p50 %+.2f ms, ITL mean %+.3f ms (targets +2 ms / +10%%)", o["ttft_p50"],
                     o["itl_mean"])
            q = extra["overhead"]["in_process_scheduler"]["overhead_ms"]
            log.info("over the scheduler in-process: TTFT p50 %+.2f ms, ITL mean %+.3f ms", q["ttft_p50"],
                     q["itl_mean"])
    finally:
        if engine is not None:
            engine.close()
    rate_rows = [r for r in summary if r["mode"] == "rate"]
    met = [r for r in rate_rows if r["meets_objective"]]
    best = max(met, key=lambda r: r["requests_per_s"] or 0, default=None)
    extra["goodput"] = {"objective": extra["objective"],
                        "highest_rate_meeting_objective": best["level"] if best else None,
                        "requests_per_s": best["requests_per_s"] if best else None,
                        "output_tok_per_s": best["output_tok_per_s"] if best else None,
                        "highest_concurrency_meeting_objective": max(
                            (r["level"] for r in summary if r["mode"] == "concurrency" and r["meets_objective"]),
                            default=None)}
    out = result_path(s.artifacts, s.model, f"stream-{s.label}")
    write_result(out, "streaming_load", asdict(s), samples, summary, extra)
    log.info("Saving results to %s", out)
    _print_table(summary, s, extra.get("overhead"))
    return {"path": str(out), "summary": summary, **extra}


def _stats(xs):
    from lmopt.results import stats

    return stats(xs)


def _sweep(backend, items: list, levels: list, rates: list, s: LoadSettings) -> tuple[list, dict]:
    """Closed-loop levels, then open-loop rates, one asyncio run each; rows and samples (compact past 64 requests
    per level: a long run's every token time would make the file hundreds of MB)."""
    summary, samples = [], {}
    runs = [("concurrency", c) for c in levels] + [("rate", r) for r in rates]
    for k, (mode, level) in enumerate(runs):
        if mode == "concurrency":
            row, recs = _run(closed_level(backend, items, level, s))
        else:
            row, recs = _run(open_level(backend, items, level, s, s.seed + 1000 + k))
        if row["failed"]:
            first = next(r.error for r in recs if r.error and not r.warmup)
            log.warning("%s %s: %d of %d requests failed (first: %s)", mode, row["level"], row["failed"],
                        row["requests"], first)
        if s.backend == "triton" and row["token_responses"] < row["requests"] - row["failed"] \
                and isinstance(backend, TritonBackend):
            raise UserError(f"the stream carried {row['output_tokens']} tokens in {row['token_responses']} responses "
                            f"for {row['requests']} requests — {s.triton_model} is not streaming")
        summary.append(row)
        key = str(row["level"]) if mode == "concurrency" else f"rate-{row['level']}"
        samples[key] = [asdict(r) for r in recs] if len(recs) <= 64 else [_compact(r) for r in recs]
        log.info("%s %s: %d requests in %.1f s, TTFT p50 %.1f ms p99 %.1f, ITL p50 %.2f ms p99 %.2f, %.1f tok/s, "
                 "%.2f req/s, occupancy %.1f%s", mode, row["level"], row["completed"], row["wall_s"],
                 row["ttft_ms"]["p50"] or 0, row["ttft_ms"]["p99"] or 0, row["itl_ms"]["p50"] or 0,
                 row["itl_ms"]["p99"] or 0, row["output_tok_per_s"] or 0, row["requests_per_s"] or 0,
                 row["occupancy"]["decoding"] or 0, "" if row["meets_objective"] else " (objective missed)")
    return summary, samples


def _endpoint_vs_grpc(items: list, levels: list, s: LoadSettings) -> dict:
    """At each level: gRPC stream, OpenAI endpoint, gRPC, endpoint (half the duration each), same server."""
    half = replace(s, duration_s=s.duration_s / 2, requests=max(1, s.requests // 2))
    grpc, http = TritonBackend(s), OpenAIBackend(s)
    out = {}
    for c in levels:
        rows = {"grpc": [], "openai": []}
        for name, b in (("grpc", grpc), ("openai", http), ("grpc", grpc), ("openai", http)):
            row, _ = _run(closed_level(b, items, c, half))
            rows[name].append(row)

        def mean(name, key):
            xs = [r[key] for r in rows[name] if r[key] is not None]
            return sum(xs) / len(xs) if xs else None

        def p50(name, key):
            xs = [r[key]["p50"] for r in rows[name] if r[key]["p50"] is not None]
            return sum(xs) / len(xs) if xs else None

        g, o = mean("grpc", "output_tok_per_s"), mean("openai", "output_tok_per_s")
        out[str(c)] = {"grpc_tok_per_s": g, "openai_tok_per_s": o, "ratio": o / g if g and o else None,
                       "grpc_ttft_p50_ms": p50("grpc", "ttft_ms"), "openai_ttft_p50_ms": p50("openai", "ttft_ms"),
                       "grpc_itl_mean_ms": sum(r["itl_ms"]["mean"] or 0 for r in rows["grpc"]) / 2,
                       "openai_event_gap_mean_ms": sum(r["itl_ms"]["mean"] or 0 for r in rows["openai"]) / 2,
                       "failed": {k: sum(r["failed"] for r in v) for k, v in rows.items()},
                       "rounds": {k: [{x: r[x] for x in ("output_tok_per_s", "requests_per_s", "completed", "failed",
                                                        "wall_s")} for r in v] for k, v in rows.items()}}
        log.info("endpoint vs gRPC at %d streams: %.0f vs %.0f tok/s (%.2fx)", c, o or 0, g or 0,
                 out[str(c)]["ratio"] or 0)
    return out


def _print_table(summary: list[dict], s: LoadSettings, overhead: dict | None) -> None:
    print(f"streaming {s.triton_model} [{s.label}] prompt {s.prompt_tokens} tok, max_tokens {s.max_new_tokens}")
    print(f"{'conc':>4} {'req':>4} {'fail':>4} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'e2e p50':>8} "
          f"{'p99':>7} {'tok/s':>7} {'req/s':>6}")
    for r in summary:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
        lv = r["level"] if r["mode"] == "concurrency" else f"r{r['level']}"
        print(f"{lv:>4} {r['completed']:>4} {r['failed']:>4} {t['p50'] or 0:>9.1f} {t['p99'] or 0:>7.1f} "
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
