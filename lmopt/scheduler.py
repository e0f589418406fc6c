"""In-flight (continuous) batching: one loop thread owns a SlotEngine; requests join and leave the running batch at
every decode step.

    sched = Scheduler(create_slot_engine(engine, num_slots=8), tokenizer=tok, max_queue=32)
    req = sched.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
    for ev in req.events():             # or submit(..., on_event=callback), called from the loop thread
        print(ev.token, ev.text)        # the last event has finished=True and a finish_reason
    sched.close()

Each step of the loop:
  1. retire cancelled requests (Request.cancel(), or the request's is_cancelled() returns True): their slot is free
     for this very step;
  2. admit waiting requests into free slots and prefill them, at most `engine.max_prefill_chunk` prompt tokens per
     step in total, so a long prompt is split into chunks and the running streams are not stalled by it (whole
     prompts admitted together go in one batched call when the engine has `prefill_slots`);
  3. one batched `decode_slots` over every request that has a token to feed;
  4. hand each new token to its request (greedy: `StepLogits.argmax()` for every row at once; sampling:
     lmopt.generate.sample_next on the row with the request's own seeded generator, so a seeded request gives the
     tokens lmopt.generate gives it) and retire the finished ones (stop token, stop string, max tokens) at once.

Pipelining: with an engine that can feed a slot the greedy token of its previous decode step on the device
(`engine.feeds_from_device`, the compiled engine), and while every decoding request is greedy, step 4 of a decode
step runs after step 3 of the next one is queued: the device computes step k+1 while the host reads, detokenizes and
hands out the tokens of step k, so the host's per-step work hides behind the device's instead of adding to it (the
scheme of vLLM's asynchronous scheduling). The price: a request that ends on a stop token or stop string, or is
cancelled, has one more step computed for it whose token is dropped; max tokens are known ahead and never overrun.
A sampled request in the batch turns pipelining off until it leaves (its token needs the host).

Text: with a tokenizer, each token's text comes from lmopt.detokenize (incremental, no re-decoding of the output);
text that could be the start of a stop string is held back until it is known not to be one, and the text stops
before the stop string, as lmopt.generate.generate_text cuts it.

Back-pressure: the scheduler holds at most `num_slots` running plus `max_queue` waiting requests. Beyond that,
`submit` raises ServerBusy, whose message starts with "server busy: ". That prefix is the contract with the serving
layers: they map it to their "try again later" status (HTTP 429 in the OpenAI gateway; UNAVAILABLE in the Triton
models, whose Python backend has no RESOURCE_EXHAUSTED code).

Counters (`stats()`): slots in use, queue length, last decode batch size, steps, generated tokens, requests
finished / cancelled / rejected; `on_step(stats)` is called after every step (the Triton model exports them).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

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
    incomplete), or the final event (finished=True, token None, text = any text held back until the end)."""
    token: int | None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None    # length | stop | cancelled | error
    error: str | None = None


class Request:
    """A submitted request: its tokens and text so far, its finish reason, and timestamps (time.perf_counter())."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, on_event, is_cancelled, detok):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokens: list[int] = []
        self.text = ""                      # text delivered so far (stop string excluded)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None   # given a slot (its prefill starts)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._on_event = on_event
        self._is_cancelled = is_cancelled
        self._queue: queue.Queue | None = None if on_event is not None else queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._detok = detok
        self._full_text = ""                # all decoded text, stop string included
        self._rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
        self._stops = set(params.stop_token_ids)
        # engine-side state, touched by the loop thread only
        self.slot: int | None = None
        self._prefilled = 0
        self._next: int | None = None
        self._stop_string_hit = False
        self._next_poll = 0.0
        self._in_flight = 0                 # decode steps queued for this request whose token is not read yet

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

    def _add_token(self, tok: int) -> tuple[str, bool]:
        """Record a generated token; (text to send now, whether a stop string ended the request)."""
        self.tokens.append(tok)
        if self._detok is None:
            return "", False
        self._full_text += self._detok.add(tok)
        stop_strings = [s for s in self.params.stop_strings if s]
        end = len(self._full_text)
        hit = False
        for s in stop_strings:
            # search only where a stop string could newly appear: from len(s)-1 chars before the delivered text
            i = self._full_text.find(s, max(0, len(self.text) - len(s)))
            if i >= 0 and i < end:
                end, hit = i, True
        if hit:
            self._stop_string_hit = True
        else:
            end -= _held_back(self._full_text, stop_strings)
        piece = self._full_text[len(self.text):end] if end > len(self.text) else ""
        self.text += piece
        return piece, hit

    def _tail(self) -> str:
        """Text held back at the end of a request that did not stop on a stop string."""
        if self._detok is not None:
            self._full_text += self._detok.flush()
        piece = self._full_text[len(self.text):]
        self.text += piece
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Scheduler:
    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, tokenizer=None,
                 on_step: Callable[[dict], None] | None = None, name: str = "scheduler",
                 cancel_poll_s: float = 0.0, pipeline: bool | None = None, first_token_pause_s: float = 0.0,
                 pause_max_decoding: int = 4):
        """cancel_poll_s: call a request's is_cancelled() at most this often (0 = every step); Request.cancel() is
        always seen at the next step. pipeline: queue the next decode step before reading this one's tokens
        (default: when the engine can, `engine.feeds_from_device`). first_token_pause_s: after a step that handed
        out a request's first token, sleep this long (releasing the interpreter lock) so the consumer thread that
        sends it runs at once instead of waiting for this loop's next blocking call; only while at most
        `pause_max_decoding` requests decode (under load throughput comes first)."""
        if max_queue < 0:
            raise UserError(f"max_queue must be >= 0 (got {max_queue})")
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = tokenizer
        self.on_step = on_step
        self.cancel_poll_s = cancel_poll_s
        self.first_token_pause_s, self.pause_max_decoding = first_token_pause_s, pause_max_decoding
        self._firsts = 0                        # first tokens handed out in the current step
        can = bool(getattr(engine, "feeds_from_device", False))
        if pipeline and not can:
            raise UserError(f"{type(engine).__name__} cannot feed a decode step from the device: pipeline=False")
        self.pipeline = can if pipeline is None else pipeline
        self._pending = None                    # (StepLogits, rows) of the queued decode step not read yet
        self._cond = threading.Condition()
        self._waiting: list[Request] = []       # submitted, no slot yet
        self._prefilling: list[Request] = []    # in a slot, prompt not fully in the cache
        self._decoding: list[Request] = []      # in a slot, generating
        self._ids = itertools.count()
        self._running = True
        self._counters = dict(steps=0, tokens=0, last_decode_batch=0, finished=0, cancelled=0, rejected=0, errors=0)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- public ----------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *,
               on_event: Callable[[TokenEvent], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None, request_id: str | None = None,
               text: bool = True) -> Request:
        """Queue a request. Raises UserError for a bad request and ServerBusy when the queue is full.
        `text=False`: token ids only (no detokenization unless stop strings need it)."""
        params.check()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("empty prompt: give at least one token")
        ctx = self.engine.info.max_positions
        if len(ids) + params.max_new_tokens > ctx:
            raise UserError(f"prompt of {len(ids)} tokens + max_tokens {params.max_new_tokens} exceeds the context "
                            f"length {ctx} — shorten the prompt or lower max_tokens")
        if any(params.stop_strings) and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer — create the Scheduler with tokenizer=...")
        detok = None
        if self.tokenizer is not None and (text or any(params.stop_strings)):
            from .detokenize import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, ids)
        rid = request_id if request_id is not None else f"r{next(self._ids)}"
        req = Request(rid, ids, params, on_event, is_cancelled, detok)
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

    def stats(self) -> dict:
        with self._cond:
            return dict(self._counters, slots_in_use=len(self._prefilling) + len(self._decoding),
                        num_slots=self.engine.num_slots, queue_length=len(self._waiting))

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still queued or running finish with an error."""
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def _step(self) -> None:
        eng = self.engine
        # 1. cancellations, wherever the request is
        with self._cond:
            for r in [r for r in self._waiting if r._cancelled(self.cancel_poll_s)]:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
        for r in [r for r in self._prefilling + self._decoding if r._cancelled(self.cancel_poll_s)]:
            self._finish(r, "cancelled")
        # 2. admission and chunked prefill
        with self._cond:
            while self._waiting and eng.num_free_slots() > 0:
                r = self._waiting.pop(0)
                r.slot = eng.alloc_slot()
                r.admitted_at = time.perf_counter()
                self._prefilling.append(r)
        budget, work = eng.max_prefill_chunk, []
        for r in self._prefilling:
            if budget <= 0:
                break
            n = min(budget, len(r.prompt_ids) - r._prefilled)
            work.append((r, r.prompt_ids[r._prefilled:r._prefilled + n]))
            budget -= n
        # whole prompts of requests admitted together: one batched prefill where the engine offers it
        whole = [(r, c) for r, c in work if r._prefilled == 0 and len(c) == len(r.prompt_ids)]
        if len(whole) > 1 and hasattr(eng, "prefill_slots"):
            work = [w for w in work if w not in whole]
            try:
                out = eng.prefill_slots([r.slot for r, _ in whole], [c for _, c in whole])
            except Exception as e:  # noqa: BLE001
                log.exception("batched prefill failed")
                for r, _ in whole:
                    self._finish(r, "error", f"generation failed: {e}")
            else:
                greedy = out.argmax() if any(r._rng is None for r, _ in whole) else None   # one download for all
                for i, (r, c) in enumerate(whole):
                    self._prefilled_chunk(r, len(c), out, i, greedy)
        for r, chunk in work:
            try:
                out = eng.prefill_slot(r.slot, chunk)
            except Exception as e:  # noqa: BLE001  (one bad request must not take the others down)
                log.exception("prefill of request %s failed", r.id)
                self._finish(r, "error", f"generation failed: {e}")
                continue
            self._prefilled_chunk(r, len(chunk), out, 0)
        if self._firsts and self.first_token_pause_s > 0 and len(self._decoding) <= self.pause_max_decoding:
            time.sleep(self.first_token_pause_s)   # the consumer sends the first tokens now, not after step 3
        self._firsts = 0
        # 3. one batched decode over every request with a token to feed: its token on the host (from a prefill, a
        # sampled or a read step), or, pipelined, the greedy token of its queued step still on the device
        pipelined = self.pipeline and all(r._rng is None for r in self._decoding)
        if self._pending is not None and not pipelined:
            self._collect(*self._pending)
            self._pending = None
        rows, feed = [], []
        for r in self._decoding:
            if r._next is not None:
                rows.append(r)
                feed.append(r._next)
            elif pipelined and r._in_flight == 1 and len(r.tokens) + 2 <= r.params.max_new_tokens:
                rows.append(r)
                feed.append(None)
        out = None
        if rows:
            try:
                out = eng.decode_slots([r.slot for r in rows], feed)
            except Exception as e:  # noqa: BLE001
                log.exception("decode step failed")
                for r in rows:
                    self._finish(r, "error", f"generation failed: {e}")
                rows = []
            for r in rows:
                r._next = None
                r._in_flight += 1
        # 4. the tokens of the step queued before this one (pipelined), or of this one
        if self._pending is not None:
            self._collect(*self._pending)
            self._pending = None
        if rows:
            if pipelined:
                self._pending = (out, rows)
            else:
                self._collect(out, rows)
        with self._cond:
            self._counters["steps"] += 1
            self._counters["last_decode_batch"] = len(rows)

    def _collect(self, out, rows: list[Request]) -> None:
        """Read a decode step's tokens and hand them to its requests (those still running)."""
        for r in rows:
            r._in_flight -= 1
        live = [(i, r) for i, r in enumerate(rows) if r.finish_reason is None]
        if not live:
            return
        try:
            greedy = out.argmax() if any(r._rng is None for _, r in live) else None
        except Exception as e:  # noqa: BLE001
            log.exception("reading a decode step failed")
            for _, r in live:
                self._finish(r, "error", f"generation failed: {e}")
            return
        for i, r in live:
            tok = int(greedy[i]) if r._rng is None else sample_next(out.row(i), r.params, r._rng)
            self._deliver(r, tok)

    def _prefilled_chunk(self, r: Request, n: int, out, row: int, greedy=None) -> None:
        """n more prompt tokens of r are in its slot; after the last chunk, its first token (logits row `row`)."""
        r._prefilled += n
        if r._prefilled < len(r.prompt_ids):
            return
        with self._cond:
            self._prefilling.remove(r)
            self._decoding.append(r)
        if r._rng is None:
            tok = int((greedy if greedy is not None else out.argmax())[row])
        else:
            tok = sample_next(out.row(row), r.params, r._rng)
        self._deliver(r, tok)

    def _deliver(self, r: Request, tok: int) -> None:
        """4. a new token for r: stop token, text and stop strings, max tokens; retire r when it is done."""
        r._next = None
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            self._firsts += 1
        if tok in r._stops:
            self._finish(r, "stop")
            return
        piece, hit_stop = r._add_token(tok)
        with self._cond:
            self._counters["tokens"] += 1
        if not r._emit(TokenEvent(tok, piece)):
            self._finish(r, "cancelled")
        elif hit_stop:
            self._finish(r, "stop")
        elif len(r.tokens) >= r.params.max_new_tokens:
            self._finish(r, "length")
        elif r._in_flight == 0:     # else a queued step already feeds this token from the device
            r._next = tok

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Retire r: free its slot now and send the final event."""
        with self._cond:
            for lst in (self._waiting, self._prefilling, self._decoding):
                if r in lst:
                    lst.remove(r)
            key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
            self._counters[key] += 1
        if r.slot is not None:
            try:
                self.engine.free_slot(r.slot)
            finally:
                r.slot = None
        r._next = None
        r.finish_reason, r.error = reason, error
        # text held back (a possible stop-string start, an incomplete character) is real text unless a stop string
        # ended the request
        tail = r._tail() if reason in ("length", "stop") and not r._stop_string_hit else ""
        r.finished_at = time.perf_counter()
        r._emit(TokenEvent(None, tail, True, reason, error))
        r._done.set()
