"""In-flight (continuous) batching: one loop thread owns a SlotEngine; requests join and leave the running batch at
every step. The loop only schedules, executes and updates; text (detokenization, stop strings, the finish reason)
is the output side's, on another thread.

    sched = Scheduler(create_slot_engine(engine, num_slots=8), tokenizer=tok, max_queue=32)
    req = sched.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
    for ev in req.events():             # or submit(..., on_event=callback), called from the output thread
        print(ev.token, ev.text)        # the last event has finished=True and a finish_reason
    sched.close()

Each step of the loop (docs/serving.md has the whole picture):
  1. retire cancelled requests (Request.cancel(), or the request's is_cancelled() returns True) and those whose text
     reached a stop string (the output side says so): their slot is free for this very step;
  2. admit waiting requests into free KV-cache slots, first come first served (a request never overtakes an earlier
     one, so none starves);
  3. prefill: at most one step's prefill budget of prompt tokens, oldest request first, so a long prompt is split
     into chunks and the running streams keep decoding between them. The budget is the engine's chunk limit and
     the step's token budget (`max_step_tokens`, decode rows count one token each), and, while requests decode,
     a time bound: a step's prefill may take at most `decode_wait_ratio` times a decode-only step (measured; the
     chunk adapts), so a long prompt arriving raises the running streams' inter-token latency by at most that
     factor. Whole prompts admitted together go in one batched call where the engine declares
     `capabilities.batched_prefill`;
  4. one batched `decode_slots` over every request that has a token to feed;
  5. hand each new token to its request (greedy: `StepLogits.argmax()` for every row at once; sampling:
     lmopt.generate.sample_next on the row with the request's own seeded generator, so a seeded request gives the
     tokens lmopt.generate gives it) and retire the finished ones (stop token, max tokens) at once. The token goes
     to the output side as an id; nothing else happens to it on the loop.

Pipelining: with an engine that can feed a slot the greedy token of its previous decode step on the device
(`capabilities.device_feed`, the compiled engine), and while every decoding request is greedy, step 5 of a decode
step runs after step 4 of the next one is queued: the device computes step k+1 while the host reads and hands out
the tokens of step k, so the host's per-step work hides behind the device's instead of adding to it (the scheme of
vLLM's asynchronous scheduling). The price: a request that ends on a stop token or stop string, or is cancelled, has
one more step computed for it whose token is dropped; max tokens are known ahead and never overrun. A sampled
request in the batch turns pipelining off until it leaves (its token needs the host).

Structured output (SamplingParams.grammar, lmopt.grammar) and logprobs: a request with a grammar has a matcher; its
first token's mask is computed at submit (on the caller's thread, with the grammar's compile), each later one while
the device runs the step that produces the logits it masks (step 4 is queued, then the masks of its grammar rows are
filled on the host, then step 5 reads the step). The masks go to the device and are applied to those rows' logits
there (StepLogits.apply_mask) before the greedy argmax or the sampled row is read, so greedy and seeded sampling both
honour them; rows without a grammar in the same batch are untouched. When the grammar is complete the request ends
with "stop". Logprobs (SamplingParams.logprobs) are the log-softmax of the logits as the model gave them, before the
mask (vLLM's default, "raw" logprobs: docs/structured_output.md), computed on the device for the rows that ask.
A request with a grammar or logprobs needs its step's logits before the next step is queued: the pipelined
device-fed path (whose step k+1 is queued before step k's token is known, and which overwrites step k's logits)
cannot take it, so such a request turns pipelining off until it leaves, like a sampled one.

Output side: the tokens of each request go through its lmopt.detokenize.TextStream (incremental text, stop strings,
the finish reason: the one output path of the repository) on the output thread (`output_thread=True`, the default:
one event per token to `on_event` or `Request.events()`), or on the caller's own thread: `output_thread=False` and
the caller calls `drain()`, which returns one RequestOutput per request with every token since its last drain (the
Triton model's sender does this: one response per stream per pass, several tokens in it when it fell behind).
A stop string found there tells the loop to retire the request at its next step.

Paged KV (an engine that declares `capabilities.paged_kv`, the compiled engine's kv_layout="paged"; lmopt.kv_blocks):
step 2 admits a request only while the block pool holds its whole prompt (`admit_slot`, which reuses the blocks of
its longest cached prefix: prefill starts after them); before step 4 every decoding row gets a block for its next
position (`reserve_slot`), and when none is free the newest running request is preempted: its blocks are freed and
it goes back to the front of the queue with its prompt and the tokens it generated as the prompt to prefill again
(vLLM's recompute preemption), so its stream continues with the next token. A request whose prompt + max tokens
needs more blocks than the pool has is refused at submit; any other waits until blocks free up. docs/paged_kv.md.

Back-pressure: the scheduler holds at most `num_slots` running plus `max_queue` waiting requests. Beyond that,
`submit` raises ServerBusy, whose message starts with "server busy: ". That prefix is the contract with the serving
layers: they map it to their "try again later" status (HTTP 429 in the OpenAI gateway; UNAVAILABLE in the Triton
models, whose Python backend has no RESOURCE_EXHAUSTED code).

Counters (`stats()`): slots in use, queue length, last decode batch size, steps, generated tokens, requests
finished / cancelled / rejected, the current prefill chunk, and the per-step timeline: seconds in steps, of which in
engine calls (launches and waits for the device; the rest is the loop's own host work); `on_step(stats)` is called
after every step (the Triton model exports them).
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .detokenize import TextStream
from .engines.slots import SlotEngine
from .errors import UserError
from .generate import SamplingParams, sample_next

log = logging.getLogger("lmopt.scheduler")

BUSY_PREFIX = "server busy: "


class ServerBusy(UserError):
    """The waiting queue is full. The message starts with BUSY_PREFIX ("server busy: ")."""


@dataclass
class TokenEvent:
    """One event of a request: a generated token (with its text, "" without a tokenizer or while a character is
    incomplete or may be the start of a stop string), or the final event (finished=True, token None, text = any
    text held back until the end)."""
    token: int | None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None    # length | stop | cancelled | error
    error: str | None = None
    logprob: "TokenLogprob | None" = None   # with SamplingParams.logprobs: this token's


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the k most likely tokens at its step (SamplingParams.logprobs = k),
    most likely first; of the model's distribution before any grammar mask."""
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What drain() hands out for one request: every token since its last output, their text, and whether it ended
    (then finish_reason, error, and `tail`: text held back until the end)."""
    request: "Request"
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)     # each token's text
    logprobs: list = field(default_factory=list)        # each token's TokenLogprob (with SamplingParams.logprobs)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    tail: str = ""

    @property
    def text(self) -> str:
        return "".join(self.pieces) + self.tail


class Request:
    """A submitted request: its tokens and text so far, its finish reason, and timestamps (time.perf_counter())."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, on_event, is_cancelled,
                 text: TextStream, tag=None):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.tag = tag                      # the caller's own state for this request (drain() callers)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None   # given a slot (its prefill starts)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.retired_step: int | None = None    # the loop's step count when it retired the request
        self._on_event = on_event
        self._is_cancelled = is_cancelled
        self._queue: queue.Queue | None = None if on_event is not None else queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._text = text                   # output side only
        self._rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
        self._stops = set(params.stop_token_ids)
        # engine-side state, touched by the loop thread only (and _stop_hit set by the output side)
        self.slot: int | None = None
        self._prefilled = 0
        self._generated = 0                 # tokens handed to the output side
        self._next: int | None = None
        self._stop_hit = False              # the output side found a stop string: retire at the next step
        self._retired = False
        self._engine_reason: str | None = None
        self._next_poll = 0.0
        self._in_flight = 0                 # decode steps queued for this request whose token is not read yet
        # paged KV (Scheduler._admit / _preempt): the tokens prefill works through (the prompt; after a preemption
        # the prompt and every token generated so far), the generated ids, the order of admission
        self._fill: list[int] = prompt_ids
        self._gen_ids: list[int] = []
        self._admit_seq = -1
        self._matcher = None                # structured output: its lmopt.grammar.Matcher (loop thread)
        self._first_mask = None             # the first token's mask, computed at submit
        # its logits are needed on the host side before the next step is queued: no device-fed pipelining
        self._host_fed = params.temperature > 0 or params.grammar is not None or params.logprobs is not None

    @property
    def tokens(self) -> list[int]:
        """Generated token ids handed out so far (none after the token that completed a stop string)."""
        return self._text.tokens

    @property
    def text(self) -> str:
        """Text handed out so far (a stop string and what follows it excluded)."""
        return self._text.text

    # ---- caller side -------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request: its slot is freed at the start of the next step."""
        self._cancel.set()
        self._wake()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> "Request":
        """Wait until finished; raise TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Events as they come (only for requests submitted without on_event); ends after the final one."""
        if self._queue is None:
            raise RuntimeError("this request delivers its events to its on_event callback")
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    # ---- loop side ---------------------------------------------------------------------------------------------
    _wake: Callable[[], None] = staticmethod(lambda: None)

    def _cancelled(self, poll_s: float = 0.0) -> bool:
        if self._cancel.is_set():
            return True
        if self._is_cancelled is not None:
            if poll_s > 0:  # the transport's check may cost a round trip: at most every poll_s
                now = time.monotonic()
                if now < self._next_poll:
                    return False
                self._next_poll = now + poll_s
            try:
                return bool(self._is_cancelled())
            except Exception:  # the transport is gone: nobody is listening any more
                return True
        return False

    # ---- output side -------------------------------------------------------------------------------------------
    def _emit(self, ev: TokenEvent) -> bool:
        """Deliver an event; False when the receiver is gone (the request is then cancelled)."""
        if self._queue is not None:
            self._queue.put(ev)
            return True
        try:
            self._on_event(ev)
            return True
        except Exception as e:  # noqa: BLE001  (a closed stream, a dead client: cancel, keep serving the rest)
            log.info("request %s: delivering an event failed (%s): cancelled", self.id, e)
            return False


class Scheduler:
    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, tokenizer=None,
                 on_step: Callable[[dict], None] | None = None, name: str = "scheduler",
                 cancel_poll_s: float = 0.0, pipeline: bool | None = None, first_token_pause_s: float = 0.0,
                 pause_max_decoding: int = 4, max_step_tokens: int | None = None, decode_wait_ratio: float = 1.0,
                 min_prefill_chunk: int = 16, output_thread: bool = True):
        """cancel_poll_s: call a request's is_cancelled() at most this often (0 = every step); Request.cancel() is
        always seen at the next step. pipeline: queue the next decode step before reading this one's tokens
        (default: when the engine can, `capabilities.device_feed`). first_token_pause_s: after a step that handed
        out a request's first token, sleep this long (releasing the interpreter lock) so the consumer thread that
        sends it runs at once instead of waiting for this loop's next blocking call; only while at most
        `pause_max_decoding` requests decode (under load throughput comes first). max_step_tokens: tokens per step,
        decode rows and prefill chunks together (default: the engine's prefill chunk + its slots).
        decode_wait_ratio: while requests decode, a step's prefill takes at most this many times a decode-only step
        (0 = no time bound); min_prefill_chunk: prompt tokens a step prefills at least (prefill always advances).
        output_thread: False = the caller calls drain() (see the module docstring)."""
        caps = engine.capabilities
        if max_queue < 0:
            raise UserError(f"max_queue must be >= 0 (got {max_queue})")
        if pipeline and not caps.device_feed:
            raise UserError(f"{type(engine).__name__} cannot feed a decode step from the device: pipeline=False")
        if decode_wait_ratio < 0:
            raise UserError(f"decode_wait_ratio must be >= 0 (got {decode_wait_ratio})")
        if min_prefill_chunk < 1:
            raise UserError(f"min_prefill_chunk must be >= 1 (got {min_prefill_chunk})")
        self.engine, self.caps = engine, caps
        self.paged = caps.paged_kv              # admission by free KV blocks, preemption by recompute
        self._admit_seqs = itertools.count()
        self.max_queue = max_queue
        self.tokenizer = tokenizer
        self.on_step = on_step
        self.cancel_poll_s = cancel_poll_s
        self.first_token_pause_s, self.pause_max_decoding = first_token_pause_s, pause_max_decoding
        self.max_step_tokens = max_step_tokens or caps.max_prefill_chunk + engine.num_slots
        if self.max_step_tokens < 1:
            raise UserError(f"max_step_tokens must be >= 1 (got {self.max_step_tokens})")
        self.decode_wait_ratio, self.min_prefill_chunk = decode_wait_ratio, min_prefill_chunk
        self._chunk: int | None = None          # the time-bounded prefill chunk while requests decode (adapts)
        self._t_decode: float | None = None     # a decode-only step's wall time (moving average)
        self._t_token: float | None = None      # a prompt token's prefill time, from steps that only prefilled
        self._firsts = 0                        # first tokens handed out in the current step
        self.pipeline = caps.device_feed if pipeline is None else pipeline
        self._pending = None                    # (StepLogits, rows) of the queued decode step not read yet
        self._grammars = None                   # lmopt.grammar.Grammars, made at the first request with a grammar
        self._bitmask = None                    # the decode step's grammar masks, int32 [num_slots, words]
        self._cond = threading.Condition()
        self._waiting: list[Request] = []       # submitted, no slot yet
        self._prefilling: list[Request] = []    # in a slot, prompt not fully in the cache
        self._decoding: list[Request] = []      # in a slot, generating
        self._ids = itertools.count()
        self._running = True
        self._counters = dict(steps=0, tokens=0, last_decode_batch=0, finished=0, cancelled=0, rejected=0, errors=0,
                              prefill_chunk=caps.max_prefill_chunk, step_seconds=0.0, engine_seconds=0.0,
                              preemptions=0)
        # per-step timeline of the last steps: (start, wall s, engine s, decode rows, prompt tokens prefilled)
        self.timeline: collections.deque = collections.deque(maxlen=4096)
        self._engine_s = 0.0
        self._out: queue.SimpleQueue = queue.SimpleQueue()   # (request, token id | None for its end); None: closed
        self.output_closed = False
        self._output: threading.Thread | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        if output_thread:
            self._output = threading.Thread(target=self._output_loop, name=f"{name}-output", daemon=True)
            self._output.start()

    # ---- public ----------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *,
               on_event: Callable[[TokenEvent], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None, request_id: str | None = None,
               text: bool = True, tag=None) -> Request:
        """Queue a request. Raises UserError for a bad request and ServerBusy when the queue is full.
        `text=False`: token ids only (no detokenization unless stop strings need it). `tag`: the caller's state
        for this request, handed back on its RequestOutputs."""
        params.check()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("empty prompt: give at least one token")
        ctx = self.engine.info.max_positions
        if len(ids) + params.max_new_tokens > ctx:
            raise UserError(f"prompt of {len(ids)} tokens + max_tokens {params.max_new_tokens} exceeds the context "
                            f"length {ctx} — shorten the prompt or lower max_tokens")
        if self.paged and self.engine.blocks_for(len(ids) + params.max_new_tokens) > self.caps.kv_num_blocks:
            raise UserError(f"prompt of {len(ids)} tokens + max_tokens {params.max_new_tokens} needs more than the "
                            f"{self.caps.kv_num_blocks} blocks of {self.caps.kv_block_size} positions the KV pool "
                            "holds — shorten the prompt, lower max_tokens or give the engine more KV blocks")
        if any(params.stop_strings) and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer — create the Scheduler with tokenizer=...")
        use_text = self.tokenizer is not None and (text or any(params.stop_strings))
        stream = TextStream(self.tokenizer if use_text else None, ids, params.stop_strings)
        rid = request_id if request_id is not None else f"r{next(self._ids)}"
        req = Request(rid, ids, params, on_event, is_cancelled, stream, tag)
        if params.grammar is not None:
            self._start_grammar(req)
        req._wake = self._wake
        with self._cond:
            if not self._running:
                raise UserError("the scheduler is closed")
            in_flight = len(self._prefilling) + len(self._decoding)
            cap = self.engine.num_slots + self.max_queue
            if in_flight + len(self._waiting) >= cap:
                self._counters["rejected"] += 1
                raise ServerBusy(f"{BUSY_PREFIX}{in_flight} requests running and {len(self._waiting)} waiting "
                                 f"(slots {self.engine.num_slots}, queue {self.max_queue}) — retry later")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def prepare_grammars(self) -> None:
        """Build the grammar engine's view of the vocabulary now (~1 s at a 128k vocabulary) instead of at the first
        request with a grammar; a server calls it from a thread of its own at start. Without llguidance: nothing."""
        import importlib.util

        from .grammar import Grammars

        if self.tokenizer is not None and importlib.util.find_spec("llguidance") is not None:
            self._grammars = Grammars.for_tokenizer(self.tokenizer, self.engine.info.vocab_size)

    def _start_grammar(self, r: Request) -> None:
        """The request's matcher and its first token's mask, on the submitting thread (the compile is cached by spec
        text; a bad spec raises UserError here, before the request is queued)."""
        from .grammar import Grammars

        if self.tokenizer is None:
            raise UserError("structured output needs a tokenizer — create the Scheduler with tokenizer=...")
        if self._grammars is None:
            self._grammars = Grammars.for_tokenizer(self.tokenizer, self.engine.info.vocab_size)
        g = self._grammars
        r._matcher = g.matcher(r.params.grammar)
        r._first_mask = g.new_bitmask(1)
        g.fill(r._first_mask, [(r._matcher, 0)])

    def stats(self) -> dict:
        with self._cond:
            return dict(self._counters, slots_in_use=len(self._prefilling) + len(self._decoding),
                        num_slots=self.engine.num_slots, queue_length=len(self._waiting),
                        **(self.engine.kv_stats() if self.paged else {}))

    def drain(self, timeout: float | None = None) -> list[RequestOutput]:
        """The output side, on the caller's thread: everything the loop produced since the last call (waiting up to
        `timeout` s for something, None = until there is), one RequestOutput per request, through each request's
        TextStream. A request's final output comes once; after close() and the last output, `output_closed`."""
        items = []
        try:
            items.append(self._out.get(timeout=timeout) if timeout is None or timeout > 0 else
                         self._out.get_nowait())
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._out.get_nowait())
            except queue.Empty:
                break
        merged: dict[int, RequestOutput] = {}
        for item in items:
            if item is None:
                self.output_closed = True
                continue
            r, tok, lp = item
            o = merged.get(id(r))
            if o is None:
                o = merged[id(r)] = RequestOutput(r)
            ts = r._text
            if tok is not None:
                if ts.stopped:          # computed before the loop saw the stop string: dropped
                    continue
                o.pieces.append(ts.add(tok))
                o.token_ids.append(tok)
                if lp is not None:
                    o.logprobs.append(lp)
                if ts.stopped:
                    r._stop_hit = True
                    r._wake()
                continue
            reason = ts.finish_reason(r._engine_reason)
            # text held back (a possible stop-string start, an incomplete character) is real text unless a stop
            # string ended the request
            o.tail = ts.finish() if reason in ("length", "stop") else ""
            o.finished, o.finish_reason, o.error = True, reason, r.error
            r.finish_reason = reason
            if self._output is None:   # else the output thread sets it once the final event is out
                r._done.set()
        return list(merged.values())

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running finish with an error."""
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout)
        if self._output is not None:
            self._output.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- output thread ---------------------------------------------------------------------------------------------
    def _output_loop(self) -> None:
        """drain() on its own thread: one TokenEvent per token, then the final one, to each request's receiver."""
        while not self.output_closed:
            for o in self.drain():
                r = o.request
                ok = True
                lps = o.logprobs or [None] * len(o.token_ids)
                for tok, piece, lp in zip(o.token_ids, o.pieces, lps):
                    if ok and not r._emit(TokenEvent(tok, piece, logprob=lp)):
                        ok = False
                        r.cancel()
                if o.finished:
                    r._emit(TokenEvent(None, o.tail, True, o.finish_reason, o.error))
                    r._done.set()

    # ---- loop ------------------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not (self._waiting or self._prefilling or self._decoding):
                    self._cond.wait()
                if not self._running:
                    break
            try:
                self._step()
            except Exception:  # a bug in the loop itself: fail what is running, keep the server alive
                log.exception("scheduler step failed")
                self._pending = None
                for r in self._prefilling + self._decoding:
                    self._finish(r, "error", "internal error in the scheduler loop")
            if self.on_step is not None:
                try:
                    self.on_step(self.stats())
                except Exception:  # noqa: BLE001  (metrics must never stop generation)
                    log.exception("on_step callback failed")
        with self._cond:
            left = self._waiting + self._prefilling + self._decoding
        for r in left:
            self._finish(r, "error", "the server is shutting down")
        self._out.put(None)

    def _engine(self, fn, *args):
        """An engine call, its time counted as the engine's share of the step."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._engine_s += time.perf_counter() - t0

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may prefill (see the module docstring, step 3)."""
        n_dec = len(self._decoding)
        budget = min(self.caps.max_prefill_chunk, self.max_step_tokens - n_dec)
        if n_dec and self.decode_wait_ratio > 0:
            if self._chunk is None:  # first prefill beside decoding requests: from the measured costs, if known
                known = self._t_decode is not None and self._t_token is not None
                self._chunk = self._clamp(self.decode_wait_ratio * self._t_decode / self._t_token) if known \
                    else self.min_prefill_chunk
            budget = min(budget, self._chunk)
        return max(budget, self.min_prefill_chunk)

    def _clamp(self, chunk: float) -> int:
        return int(min(self.caps.max_prefill_chunk, max(self.min_prefill_chunk, chunk)))

    def _step(self) -> None:
        eng = self.engine
        t_step = time.perf_counter()
        self._engine_s = 0.0
        # 1. cancellations and stop strings, wherever the request is
        with self._cond:
            # (a preempted request waits again: its text may have reached a stop string meanwhile)
            for r in [r for r in self._waiting if r._stop_hit or r._cancelled(self.cancel_poll_s)]:
                self._waiting.remove(r)
                self._finish(r, "stop" if r._stop_hit else "cancelled")
        for r in [r for r in self._prefilling + self._decoding if r._stop_hit or r._cancelled(self.cancel_poll_s)]:
            self._finish(r, "stop" if r._stop_hit else "cancelled")
        # 2. admission by free KV-cache slots (and blocks), first come first served
        self._admit()
        # 3. prefill, oldest first, within the step's budget
        budget = self._prefill_budget()
        work = []
        for r in self._prefilling:
            if budget <= 0:
                break
            n = min(budget, len(r._fill) - r._prefilled)
            work.append((r, r._fill[r._prefilled:r._prefilled + n]))
            budget -= n
        prefilled = sum(len(c) for _, c in work)
        decoding_before = len(self._decoding)
        # whole prompts of requests admitted together: one batched prefill where the engine offers it (paged: the
        # rest of each prompt after its cached prefix counts as whole; the engine takes rows at different starts)
        whole = [(r, c) for r, c in work if (r._prefilled == 0 or self.paged) and r._prefilled + len(c) == len(r._fill)]
        if len(whole) > 1 and self.caps.batched_prefill:
            work = [w for w in work if w not in whole]
            try:
                out = self._engine(eng.prefill_slots, [r.slot for r, _ in whole], [c for _, c in whole])
                self._first_masks(out, [(i, r) for i, (r, _) in enumerate(whole)])
                # one download for all
                greedy = self._engine(out.argmax) if any(r._rng is None for r, _ in whole) else None
            except Exception as e:  # noqa: BLE001
                log.exception("batched prefill failed")
                for r, _ in whole:
                    self._finish(r, "error", f"generation failed: {e}")
            else:
                for i, (r, c) in enumerate(whole):
                    self._prefilled_chunk(r, len(c), out, i, greedy)
        for r, chunk in work:
            try:
                out = self._engine(eng.prefill_slot, r.slot, chunk)
            except Exception as e:  # noqa: BLE001  (one bad request must not take the others down)
                log.exception("prefill of request %s failed", r.id)
                self._finish(r, "error", f"generation failed: {e}")
                continue
            self._prefilled_chunk(r, len(chunk), out, 0)
        if self._firsts and self.first_token_pause_s > 0 and len(self._decoding) <= self.pause_max_decoding:
            time.sleep(self.first_token_pause_s)   # the consumer sends the first tokens now, not after step 4
        self._firsts = 0
        # 4. one batched decode over every request with a token to feed: its token on the host (from a prefill, a
        # sampled or a read step), or, pipelined, the greedy token of its queued step still on the device
        pipelined = self.pipeline and not any(r._host_fed for r in self._decoding)
        if self._pending is not None and (not pipelined or (self.paged and self._blocks_short())):
            self._collect(*self._pending)   # (paged: a preemption ahead needs every token of its victim read)
            self._pending = None
        rows, feed = [], []
        for r in self._decoding:
            if r._next is not None:
                rows.append(r)
                feed.append(r._next)
            elif pipelined and r._in_flight == 1 and r._generated + 2 <= r.params.max_new_tokens:
                rows.append(r)
                feed.append(None)
        if self.paged and rows:
            rows, feed = self._reserve_decode_blocks(rows, feed)
        out = None
        if rows:
            try:
                out = self._engine(eng.decode_slots, [r.slot for r in rows], feed)
            except Exception as e:  # noqa: BLE001
                log.exception("decode step failed")
                for r in rows:
                    self._finish(r, "error", f"generation failed: {e}")
                rows = []
            for r in rows:
                r._next = None
                r._in_flight += 1
        # the grammar rows' masks for this step's logits, filled while the device computes it
        masks = self._grammar_masks(rows) if rows and not pipelined else None
        # 5. the tokens of the step queued before this one (pipelined), or of this one
        if self._pending is not None:
            self._collect(*self._pending)
            self._pending = None
        if rows:
            if pipelined:
                self._pending = (out, rows)
            else:
                self._collect(out, rows, masks)
        wall = time.perf_counter() - t_step
        self._adapt_chunk(wall, prefilled, decoding_before and rows)
        with self._cond:
            c = self._counters
            c["steps"] += 1
            c["last_decode_batch"] = len(rows)
            c["prefill_chunk"] = self._chunk or self.caps.max_prefill_chunk
            c["step_seconds"] += wall
            c["engine_seconds"] += self._engine_s
        self.timeline.append((t_step, wall, self._engine_s, len(rows), prefilled))

    # ---- admission and preemption ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Step 2: waiting requests, oldest first, into free slots; with a paged engine only while the pool has
        blocks for the whole prompt (its cached prefix reused: prefill starts after it). A request that does not
        fit waits, and so does every one behind it (first come first served)."""
        eng = self.engine
        with self._cond:
            while self._waiting and eng.num_free_slots() > 0:
                r = self._waiting[0]
                slot = eng.alloc_slot()
                if self.paged:
                    cached = eng.admit_slot(slot, r._fill)
                    if cached is None:
                        eng.free_slot(slot)
                        break
                    r._prefilled = cached
                self._waiting.pop(0)
                r.slot, r._admit_seq = slot, next(self._admit_seqs)
                if r.admitted_at is None:
                    r.admitted_at = time.perf_counter()
                self._prefilling.append(r)

    def _blocks_short(self) -> bool:
        """Paged: the decoding requests whose next position starts a new block outnumber the free blocks."""
        bs = self.caps.kv_block_size
        need = sum(1 for r in self._decoding if r.slot is not None and self.engine.slot_length(r.slot) % bs == 0)
        return need > self.engine.num_free_blocks()

    def _reserve_decode_blocks(self, rows: list[Request], feed: list) -> tuple[list[Request], list]:
        """Paged, step 4: a block for every row's next position, oldest request first; when none is free, the
        newest running request is preempted (vLLM's recompute preemption) until one is, or the row itself was
        the newest."""
        eng = self.engine
        pairs = sorted(zip(rows, feed), key=lambda rf: rf[0]._admit_seq)
        for r, _ in pairs:
            while r.slot is not None and not eng.reserve_slot(r.slot, 1):
                self._preempt(max(self._prefilling + self._decoding, key=lambda q: q._admit_seq))
        kept = [(r, f) for r, f in pairs if r.slot is not None]
        return [r for r, _ in kept], [f for _, f in kept]

    def _preempt(self, r: Request) -> None:
        """Free r's slot and blocks and queue it first: at re-admission its prompt and the tokens it generated are
        prefilled again (their cached blocks reused), so its stream goes on with the next token, none repeated or
        lost."""
        if r._in_flight:
            raise RuntimeError(f"request {r.id} preempted with a decode step in flight")
        with self._cond:
            for lst in (self._prefilling, self._decoding):
                if r in lst:
                    lst.remove(r)
            self._waiting.insert(0, r)
            self._counters["preemptions"] += 1
        self.engine.free_slot(r.slot)
        r.slot, r._next, r._prefilled = None, None, 0
        r._fill = r.prompt_ids + r._gen_ids
        if r._matcher is not None:   # the token after the recompute is masked by the grammar's state now
            r._first_mask = self._grammars.new_bitmask(1)
            self._grammars.fill(r._first_mask, [(r._matcher, 0)])
        log.debug("request %s preempted after %d tokens", r.id, r._generated)

    def _adapt_chunk(self, wall: float, prefilled: int, decoded: bool) -> None:
        """The time bound of step 3. Tracked: a decode-only step's time, and a prompt token's prefill time (steps
        that only prefilled). After a step that prefilled while requests decoded, the chunk is scaled (at most 4x
        either way per step) so that its prefill's share of the step comes to decode_wait_ratio times a
        decode-only step: chunk x target / measured converges where the prefill's cost meets the target, fixed
        per-call costs included."""
        if prefilled and not decoded:
            t = wall / prefilled
            self._t_token = t if self._t_token is None else 0.5 * self._t_token + 0.5 * t
            return
        if not decoded:
            return
        if not prefilled:
            self._t_decode = wall if self._t_decode is None else 0.8 * self._t_decode + 0.2 * wall
            return
        if self._t_decode is None or self.decode_wait_ratio <= 0 or self._chunk is None:
            return
        extra = max(wall - self._t_decode, 1e-6)
        scale = min(4.0, max(0.25, self.decode_wait_ratio * self._t_decode / extra))
        if scale >= 1.0 and prefilled < self._chunk:
            return  # a short last piece of a prompt says nothing about a larger chunk
        self._chunk = self._clamp(prefilled * scale)

    def _collect(self, out, rows: list[Request], masks=None) -> None:
        """Read a decode step's tokens and hand them to its requests (those still running). `masks`: the grammar
        rows' masks for this step (_grammar_masks), applied on the device before any token is read."""
        for r in rows:
            r._in_flight -= 1
        live = [(i, r) for i, r in enumerate(rows) if not r._retired]
        if not live:
            return
        try:
            if masks is not None:
                self._engine(out.apply_mask, *masks)
            greedy = self._engine(out.argmax) if any(r._rng is None for _, r in live) else None
            toks = [int(greedy[i]) if r._rng is None else sample_next(self._engine(out.row, i), r.params, r._rng)
                    for i, r in live]
            lps = self._logprobs(out, live, toks)
        except Exception as e:  # noqa: BLE001
            log.exception("reading a decode step failed")
            for _, r in live:
                self._finish(r, "error", f"generation failed: {e}")
            return
        for (_, r), tok, lp in zip(live, toks, lps):
            self._deliver(r, tok, lp)

    # ---- structured output and logprobs (the sampling side of step 5) ----------------------------------------------
    def _grammar_masks(self, rows: list[Request]):
        """(row indices, bitmask) of the grammar rows among a decode step's `rows`: each one's mask for the token this
        step produces (its matcher has taken every token fed so far); None when no row has a grammar."""
        items = [(i, r) for i, r in enumerate(rows) if r._matcher is not None and not r._retired]
        if not items:
            return None
        g = self._grammars
        if self._bitmask is None or self._bitmask.shape[0] < len(items):
            self._bitmask = g.new_bitmask(max(self.engine.num_slots, len(items)))
        bitmask = self._bitmask[:len(items)]
        try:
            g.fill(bitmask, [(r._matcher, j) for j, (_, r) in enumerate(items)])
        except Exception as e:  # noqa: BLE001  (the grammar rows fail; the others' step goes on)
            log.exception("filling the grammar masks failed")
            for _, r in items:
                self._finish(r, "error", f"structured output failed: {e}")
            return None
        return [i for i, _ in items], bitmask

    def _first_masks(self, out, items) -> None:
        """Prefill's last chunk: the grammar rows among `items` ((logits row, request)) masked with the masks their
        submit computed."""
        g = [(i, r) for i, r in items if r._first_mask is not None]
        if g:
            self._engine(out.apply_mask, [i for i, _ in g], np.concatenate([r._first_mask for _, r in g]))
            for _, r in g:
                r._first_mask = None

    def _logprobs(self, out, live, toks) -> list:
        """TokenLogprob of each (row, request) in `live` that asks for logprobs (None for the others), from one
        computation on the device."""
        ask = [(j, i, r) for j, (i, r) in enumerate(live) if r.params.logprobs is not None]
        res: list = [None] * len(live)
        if not ask:
            return res
        k = max(r.params.logprobs for _, _, r in ask)
        chosen, top_ids, top_lp = self._engine(out.logprobs, [i for _, i, _ in ask], [toks[j] for j, _, _ in ask], k)
        for n, (j, _, r) in enumerate(ask):
            kk = r.params.logprobs
            res[j] = TokenLogprob(float(chosen[n]), [(int(t), float(v)) for t, v in zip(top_ids[n][:kk],
                                                                                      top_lp[n][:kk])])
        return res

    def _prefilled_chunk(self, r: Request, n: int, out, row: int, greedy=None) -> None:
        """n more prompt tokens of r are in its slot; after the last chunk, its first token (logits row `row`)."""
        r._prefilled += n
        if r._prefilled < len(r._fill):
            return
        with self._cond:
            self._prefilling.remove(r)
            self._decoding.append(r)
        self._first_masks(out, [(row, r)])    # (a batched prefill masked its rows before its one argmax)
        if r._rng is None:
            tok = int((greedy if greedy is not None else self._engine(out.argmax))[row])
        else:
            tok = sample_next(self._engine(out.row, row), r.params, r._rng)
        self._deliver(r, tok, self._logprobs(out, [(row, r)], [tok])[0])

    def _deliver(self, r: Request, tok: int, lp: TokenLogprob | None = None) -> None:
        """5. a new token for r: stop token, grammar, max tokens; the token goes to the output side; retire r when
        done."""
        r._next = None
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            self._firsts += 1
        if tok in r._stops:
            self._finish(r, "stop")
            return
        r._generated += 1
        if self.paged:
            r._gen_ids.append(tok)
        self._out.put((r, tok, lp))
        with self._cond:
            self._counters["tokens"] += 1
        if r._matcher is not None:
            if not r._matcher.accept(tok):   # the mask allowed it: a bug, not the client's
                self._finish(r, "error", f"the grammar refused token {tok}: {r._matcher.error}")
                return
            if r._matcher.done:              # complete: only the end of the sequence could follow
                self._finish(r, "stop")
                return
        if r._generated >= r.params.max_new_tokens:
            self._finish(r, "length")
        elif r._in_flight == 0:     # else a queued step already feeds this token from the device
            r._next = tok

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Retire r: free its slot now and tell the output side (which sends the final event)."""
        if r._retired:
            return
        r._retired = True
        with self._cond:
            for lst in (self._waiting, self._prefilling, self._decoding):
                if r in lst:
                    lst.remove(r)
            key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
            self._counters[key] += 1
            r.retired_step = self._counters["steps"]
        if r.slot is not None:
            try:
                if self.paged and reason != "error":
                    # the blocks its generated tokens filled become findable too (a chat's next turn repeats them)
                    self.engine.cache_tokens(r.slot, r.prompt_ids + r._gen_ids)
                self.engine.free_slot(r.slot)
            finally:
                r.slot = None
        r._next = None
        r._engine_reason, r.error = reason, error
        r.finished_at = time.perf_counter()
        self._out.put((r, None, None))
