"""One generation loop for every engine: greedy and sampling (temperature, top-k, top-p, seeded), stop tokens and
strings, max new tokens, a batch of prompts of different lengths (left padding + attention mask + position ids),
and a per-token callback for streaming.

    out = generate(engine, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=16))
    texts = generate_text(engine, tokenizer, ["def f(", "The"], SamplingParams(temperature=0.8, seed=1))
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import UserError
from .nvtx_ranges import nvtx_range


MAX_TOP_LOGPROBS = 20              # OpenAI's limit on top_logprobs


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1 = off
    seed: int | None = None         # same seed, same engine -> same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    grammar: str | None = None      # structured output: a lmopt.grammar spec (JSON text); the scheduler honours it
    logprobs: int | None = None     # None = off; k >= 0: the chosen token's log-probability and the top k (<= 20)

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max new tokens must be > 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS} (got {self.logprobs})")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]                      # generated ids per prompt (stop token excluded)
    finish_reasons: list[str]                    # "length" | "stop" | "cancelled"
    prompt_lengths: list[int]
    ttft_s: float                                # prefill + first sample
    step_s: list[float] = field(default_factory=list)   # each decode step (forward + sample)
    total_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def sample_next(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator | None) -> int:
    """Next token from one row of logits [V]."""
    if p.temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    if 0 < p.top_k < x.shape[0]:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    x -= x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts; position ids count real tokens only, so a padded row matches the unpadded one."""
    b, L = len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, L), pad_id, dtype=np.int64)
    mask = np.zeros((b, L), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


def generate(engine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             on_token: Callable[[int, int], bool | None] | None = None, pad_id: int = 0,
             stop_check: Callable[[int, list[int]], bool] | None = None) -> GenerationOutput:
    """Generate for a batch. `on_token(row, token)` is called for each new token; returning True cancels that row.
    `stop_check(row, tokens)` returning True ends a row (used for stop strings)."""
    b = len(prompts)
    if b == 0:
        raise UserError("no prompts given")
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * b
    if len(plist) != b:
        raise ValueError("one SamplingParams per prompt")
    for i, (pr, p) in enumerate(zip(prompts, plist)):
        p.check()
        if p.grammar is not None or p.logprobs is not None:
            raise UserError("structured output and logprobs are the scheduler's (lmopt.scheduler.Scheduler), not "
                            "generate()'s — submit the request to a Scheduler")
        if len(pr) == 0:
            raise UserError(f"prompt {i} is empty — give at least one token")
        ctx = engine.info.max_positions
        if len(pr) + p.max_new_tokens > ctx:
            raise UserError(f"prompt {i} has {len(pr)} tokens + max_new_tokens {p.max_new_tokens} exceeds the model's "
                            f"context of {ctx} — shorten the prompt or lower max_new_tokens")
    from .engines.slots import SlotEngine

    if isinstance(engine, SlotEngine):
        return _generate_slots(engine, prompts, plist, on_token, stop_check)
    rows = _Rows(plist, on_token, stop_check)
    max_new = max(p.max_new_tokens for p in plist)

    t0 = time.perf_counter()
    ids, mask, pos = pad_batch(prompts, pad_id)
    with nvtx_range("prefill"):
        logits, state = engine.prefill(ids, mask, pos)
    next_ids = np.full(b, pad_id, dtype=np.int64)

    def take(step_logits):
        with nvtx_range("sample"):
            live = [r for r in range(b) if not rows.done[r]]
            next_ids[:] = pad_id
            for r, tok in zip(live, rows.pick(step_logits, live, live)):
                next_ids[r] = tok
                rows.accept(r, tok)

    take(logits)
    ttft = time.perf_counter() - t0
    steps: list[float] = []
    last_pos = pos[:, -1].copy()
    try:
        for _ in range(max_new - 1):
            if all(rows.done):
                break
            ts = time.perf_counter()
            with nvtx_range("decode_step"):
                mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
                last_pos += 1
                logits, state = engine.decode(state, next_ids[:, None].copy(), mask, last_pos[:, None].copy())
                take(logits)
            steps.append(time.perf_counter() - ts)
    finally:
        engine.release(state)
    return GenerationOutput(rows.out_tokens, rows.reasons, [len(p) for p in prompts], ttft, steps,
                            time.perf_counter() - t0)


class _Rows:
    """Per-row state of one generation, shared by both loops: sampling generators, stop rules, outputs."""

    def __init__(self, plist: Sequence[SamplingParams], on_token, stop_check):
        b = len(plist)
        self.plist, self.on_token, self.stop_check = plist, on_token, stop_check
        self.rngs = [np.random.default_rng(p.seed) if p.temperature > 0 else None for p in plist]
        self.stops = [set(p.stop_token_ids) for p in plist]
        self.out_tokens: list[list[int]] = [[] for _ in range(b)]
        self.reasons = ["length"] * b
        self.done = [False] * b

    def pick(self, logits, rows: Sequence[int], index: Sequence[int]) -> list[int]:
        """Next token of each row in `rows`, whose logits are `logits[index[i]]`. Greedy rows take the argmax; logits
        left on the device (a StepLogits) compute it there, so one id per row crosses to the host, not a row of
        [vocab] floats; sampled rows bring their own row and share `sample_next`."""
        greedy = None
        if any(self.rngs[r] is None for r in rows):
            greedy = np.argmax(logits, axis=-1) if isinstance(logits, np.ndarray) else logits.argmax()
        return [int(greedy[i]) if self.rngs[r] is None else
                sample_next(np.asarray(logits[i], dtype=np.float32), self.plist[r], self.rngs[r])
                for r, i in zip(rows, index)]

    def accept(self, r: int, tok: int) -> None:
        """Record row r's new token and apply the stop rules: stop token, on_token cancel, stop check, length."""
        if tok in self.stops[r]:
            self.done[r], self.reasons[r] = True, "stop"
            return
        self.out_tokens[r].append(tok)
        if self.on_token is not None and self.on_token(r, tok):
            self.done[r], self.reasons[r] = True, "cancelled"
        elif self.stop_check is not None and self.stop_check(r, self.out_tokens[r]):
            self.done[r], self.reasons[r] = True, "stop"
        elif len(self.out_tokens[r]) >= self.plist[r].max_new_tokens:
            self.done[r] = True


def _generate_slots(engine, prompts, plist, on_token, stop_check) -> GenerationOutput:
    """generate() on an engine with KV-cache slots: one slot per prompt (no padding), only unfinished rows are
    decoded, and greedy rows take their token from the device-side argmax (one id per row crosses to the host, not
    a row of logits); sampled rows fetch their own row and share `sample_next` with the other engines."""
    b = len(prompts)
    if b > engine.num_free_slots():
        raise UserError(f"{b} prompts need {b} KV-cache slots but the engine has {engine.num_free_slots()} free — "
                        "send fewer prompts at once or build the engine with more slots")
    st = _Rows(plist, on_token, stop_check)
    slots: list[int] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    try:
        slots = [engine.alloc_slot() for _ in range(b)]

        def take(rows: list[int], logits) -> None:
            with nvtx_range("sample"):
                for r, tok in zip(rows, st.pick(logits, rows, range(len(rows)))):
                    nxt[r] = tok
                    st.accept(r, tok)

        nxt = [0] * b
        if engine.capabilities.paged_kv:   # each prompt's cached prefix is reused: prefill only the rest
            for s, p in zip(slots, prompts):
                if engine.admit_slot(s, p) is None:
                    raise UserError(f"{b} prompts need more KV blocks than the engine has free — send fewer "
                                    "prompts at once or build the engine with more blocks")
        fill = [p[engine.slot_length(s):] for s, p in zip(slots, prompts)]
        with nvtx_range("prefill"):
            if engine.capabilities.batched_prefill:
                take(list(range(b)), engine.prefill_slots(slots, fill))
            else:
                for r in range(b):
                    take([r], engine.prefill_slot(slots[r], fill[r]))
        ttft = time.perf_counter() - t0
        while not all(st.done):
            ts = time.perf_counter()
            rows = [r for r in range(b) if not st.done[r]]
            with nvtx_range("decode_step"):
                take(rows, engine.decode_slots([slots[r] for r in rows], [nxt[r] for r in rows]))
            steps.append(time.perf_counter() - ts)
    finally:
        for s in slots:
            if s is not None:
                engine.free_slot(s)
    return GenerationOutput(st.out_tokens, st.reasons, [len(p) for p in prompts], ttft, steps,
                            time.perf_counter() - t0)


def generate_text(engine, tokenizer, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                  on_token: Callable[[int, int], bool | None] | None = None) -> tuple[list[str], GenerationOutput]:
    """Text in, text out. Stop tokens default to the tokenizer's EOS; text and stop strings come from the one output
    path, lmopt.detokenize.TextStream (the text ends before the earliest stop string, as servers cut it), the same
    the scheduler, the Triton model and the OpenAI gateway use."""
    from .detokenize import TextStream

    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    eos = tokenizer.eos_token_id
    plist = [p if p.stop_token_ids or eos is None else _with_stop(p, eos) for p in plist]
    for i, t in enumerate(prompts):
        if not t:
            raise UserError(f"prompt {i} is empty — give some text")
    with nvtx_range("tokenize"):
        ids = [tokenizer(t)["input_ids"] for t in prompts]
    streams = [TextStream(tokenizer, i, p.stop_strings) for i, p in zip(ids, plist)]

    def stop_check(r: int, toks: list[int]) -> bool:
        streams[r].add_many(toks[len(streams[r].tokens):])
        return streams[r].stopped

    out = generate(engine, ids, plist, on_token, pad_id=tokenizer.pad_token_id or 0, stop_check=stop_check)
    with nvtx_range("detokenize"):
        for st, toks in zip(streams, out.tokens):   # a row on_token cancelled skipped its last stop check
            st.add_many(toks[len(st.tokens):])
        texts = [st.text + st.finish() for st in streams]
    out.finish_reasons = [st.finish_reason(reason) for st, reason in zip(streams, out.finish_reasons)]
    return texts, out


def _with_stop(p: SamplingParams, eos: int) -> SamplingParams:
    from dataclasses import replace

    return replace(p, stop_token_ids=(eos,))
