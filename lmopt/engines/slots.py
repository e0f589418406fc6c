"""The slot interface: what in-flight batching needs from an engine.

An engine with slots owns a fixed pool of KV-cache slots. Each request lives in one slot with its own length, so the
rows of one decode step may sit at different positions. The scheduler (lmopt.scheduler) drives it:

    slot = engine.alloc_slot()                       # None when every slot is taken
    out = engine.prefill_slot(slot, prompt_ids)      # appends tokens to the slot's cache; may be called again with
                                                     # the next chunk of a long prompt (chunked prefill)
    first = out.argmax()[0]                          # greedy on the device; out.row(0) gives host logits to sample
    out = engine.decode_slots([s0, s1, ...], [t0, t1, ...])   # one token per slot, each at its own position
    engine.free_slot(slot)                           # request finished or cancelled: the slot is reusable at once

Positions are the engine's business: a slot's next position is its current length (`slot_length`). Logits stay on
the engine's device until asked for: `StepLogits.argmax()` moves one id per row to the host, `row(i)` one row of
float32 logits (for seeded sampling on the host, shared with lmopt.generate.sample_next). On a GPU this keeps a
[64, 128256] logits tensor from crossing PCIe every step. Structured output and logprobs stay on the device too:
`apply_mask(rows, bitmask)` sends a grammar's token bitmask (4 bytes per 32 tokens) and masks those rows there, and
`logprobs(rows, tokens, k)` brings back the chosen token's log-probability and the top k of each row asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Engine


class StepLogits:
    """Logits of the last position of each row of one step (prefill: one row; decode: one row per slot)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def argmax(self) -> np.ndarray:
        """Greedy next token per row, int64 [rows] on the host."""
        raise NotImplementedError

    def row(self, i: int) -> np.ndarray:
        """Row i as float32 [vocab] on the host."""
        raise NotImplementedError

    def apply_mask(self, rows: Sequence[int], bitmask: np.ndarray) -> None:
        """Forbid tokens: row rows[j] keeps the logits whose bit is set in bitmask[j] (int32 [len(rows), words], bit
        t % 32 of word t // 32, lmopt.grammar's layout) and gets -inf elsewhere, on the logits' own device. argmax()
        and row() see the masked logits afterwards; logprobs() still reads the logits as the engine returned them.
        The other rows are untouched."""
        raise NotImplementedError

    def logprobs(self, rows: Sequence[int], tokens: Sequence[int], k: int):
        """Log-softmax of the logits as the engine returned them (before any mask), for rows `rows`: the log-
        probability of tokens[j] in row rows[j] (float32 [n]), and the k most likely tokens of each row, most likely
        first (int64 [n, k] ids, float32 [n, k] log-probabilities). Computed where the logits are: only n + 2nk
        numbers cross to the host."""
        raise NotImplementedError

    # callers written for a host array [rows, vocab] keep working: logits[i], np.asarray(logits)
    def __getitem__(self, i: int) -> np.ndarray:
        return self.row(i)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = np.stack([self.row(i) for i in range(len(self))]) if len(self) else np.zeros((0, 0), np.float32)
        return a if dtype is None else a.astype(dtype)


class HostLogits(StepLogits):
    """StepLogits over a host array (engines that compute on the CPU)."""

    def __init__(self, logits: np.ndarray):
        self.logits = self.raw = logits

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def argmax(self) -> np.ndarray:
        return np.argmax(self.logits, axis=-1).astype(np.int64)

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.logits[i], dtype=np.float32)

    def apply_mask(self, rows: Sequence[int], bitmask: np.ndarray) -> None:
        if not len(rows):
            return
        if self.logits is self.raw:        # the engine's array stays as it was (logprobs read it)
            self.logits = np.array(self.raw, dtype=np.float32)
        idx = np.asarray(rows, dtype=np.int64)
        bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint8), axis=-1,
                             bitorder="little")[:, :self.logits.shape[-1]].astype(bool)
        self.logits[idx] = np.where(bits, self.logits[idx], -np.inf)

    def logprobs(self, rows: Sequence[int], tokens: Sequence[int], k: int):
        x = np.asarray(self.raw, dtype=np.float64)[np.asarray(rows, dtype=np.int64)]
        m = x.max(-1, keepdims=True)
        lp = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
        chosen = lp[np.arange(len(rows)), np.asarray(tokens, dtype=np.int64)].astype(np.float32)
        if k <= 0:
            return chosen, np.zeros((len(rows), 0), np.int64), np.zeros((len(rows), 0), np.float32)
        top = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
        return chosen, top.astype(np.int64), np.take_along_axis(lp, top, -1).astype(np.float32)


class DeviceLogits(StepLogits):
    """Logits [B, vocab] left on a torch device: `argmax()` moves one id per row to the host, `row(i)` one row.
    `greedy` (optional): argmax ids already computed on the device, e.g. inside a captured graph; `rows`: the
    rows of the step that belong to the caller (a padded batch has more). `host_greedy` (optional): (pinned host
    buffer, CUDA event) the engine already queued the greedy ids' copy into: argmax() waits for that event only, not
    for work queued after this step. Valid until the engine's next step (a replayed graph writes its outputs in
    place); argmax() of a step with host_greedy stays valid one step longer."""

    def __init__(self, logits, greedy=None, rows: Sequence[int] | None = None, host_greedy=None):
        self.logits, self.greedy, self.host_greedy = logits, greedy, host_greedy
        self.raw = logits        # as the engine returned them (apply_mask never changes them)
        self._masked = None      # apply_mask: ({row: index}, masked rows [n, vocab] on the device)
        self.rows = list(range(int(logits.shape[0]))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), int(self.logits.shape[-1]))

    def argmax(self) -> np.ndarray:
        if self.host_greedy is not None:
            buf, done = self.host_greedy
            if done is not None:
                done.synchronize()
            out = buf.numpy()[self.rows].astype(np.int64)   # fancy indexing copies out of the reused buffer
        else:
            ids = self.greedy if self.greedy is not None else self.logits.argmax(-1)
            out = ids.cpu().numpy().astype(np.int64)[self.rows]
        if self._masked is not None:   # rows under a grammar: the argmax of their masked logits
            where, masked = self._masked
            out[list(where)] = masked.argmax(-1).cpu().numpy()
        return out

    def row(self, i: int) -> np.ndarray:
        if self._masked is not None and i in self._masked[0]:
            return self._masked[1][self._masked[0][i]].float().cpu().numpy()
        return self.logits[self.rows[i]].float().cpu().numpy()

    def apply_mask(self, rows: Sequence[int], bitmask: np.ndarray) -> None:
        """The masked rows are a tensor of their own ([len(rows), vocab], on the device): the engine's logits (a
        captured graph's output) and its greedy ids stay as they are for the other rows, so argmax() reads those as
        before and adds one argmax over the masked rows."""
        import torch

        if not len(rows):
            return
        if self._masked is not None:
            raise ValueError("apply_mask is called once per step")
        dev = self.logits.device
        idx = torch.tensor([self.rows[i] for i in rows], device=dev)
        m = torch.from_numpy(np.ascontiguousarray(bitmask, dtype=np.int32)).to(dev, non_blocking=True)
        shifts = torch.arange(32, device=dev, dtype=torch.int32)
        allowed = ((m.unsqueeze(-1) >> shifts) & 1).reshape(len(rows), -1)[:, :self.logits.shape[-1]].bool()
        self._masked = ({int(i): j for j, i in enumerate(rows)},
                        self.logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))

    def logprobs(self, rows: Sequence[int], tokens: Sequence[int], k: int):
        import torch

        dev = self.raw.device
        idx = torch.tensor([self.rows[i] for i in rows], device=dev)
        lp = torch.log_softmax(self.raw.index_select(0, idx).float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(list(tokens), device=dev, dtype=torch.int64).unsqueeze(1)).squeeze(1)
        if k <= 0:
            return (chosen.cpu().numpy(), np.zeros((len(rows), 0), np.int64), np.zeros((len(rows), 0), np.float32))
        top_lp, top_ids = torch.topk(lp, k, dim=-1)      # sorted, most likely first
        return chosen.cpu().numpy(), top_ids.cpu().numpy().astype(np.int64), top_lp.cpu().numpy()


@dataclass(frozen=True)
class SlotCapabilities:
    """What an engine with slots can do beyond the interface every SlotEngine has, declared (never probed): the
    scheduler and the server read it, and refuse a setting the engine cannot honour (lmopt.scheduler)."""
    batched_prefill: bool = False        # prefill_slots(): several fresh prompts in one call
    chunked_prefill: bool = True         # prefill_slot() may be called again with the next chunk of a prompt
    max_prefill_chunk: int = 512         # prompt tokens per prefill call (the scheduler splits longer prompts)
    settable_prefill_chunk: bool = True  # set_max_prefill_chunk() takes another value
    device_feed: bool = False            # decode_slots() takes None: the slot's greedy token of its last decode step,
                                         # read on the device (the scheduler's pipelined loop needs it)
    mixed_steps: bool = False            # prefill chunks and decode rows in one forward
    capture: bool = False                # capture(batch_buckets, kv_len) compiles/captures every decode bucket ahead
    batch_buckets: tuple[int, ...] = ()  # decode batch sizes the engine pads a step to (empty: any size as is)
    paged_kv: bool = False               # KV memory in blocks (lmopt.kv_blocks): admit_slot, reserve_slot,
                                         # num_free_blocks, blocks_for, kv_stats; the scheduler admits by free
                                         # blocks and preempts when a running request needs one and none is free
    prefix_cache: bool = False           # admit_slot reuses the cached blocks of a prompt's longest cached prefix
    kv_block_size: int = 0               # positions per block (paged_kv)
    kv_num_blocks: int = 0               # blocks in the pool (paged_kv)


class SlotEngine(Engine):
    """An Engine with a fixed pool of KV-cache slots (see the module docstring for the calling order)."""

    num_slots: int
    max_prefill_chunk: int = 512   # the scheduler splits longer prompts into chunks of at most this many tokens

    @property
    def capabilities(self) -> SlotCapabilities:
        """What this engine offers beyond the base interface (engines override it)."""
        return SlotCapabilities(max_prefill_chunk=self.max_prefill_chunk)

    def set_max_prefill_chunk(self, n: int) -> None:
        """Prompt tokens per prefill call; an engine that cannot take another value refuses with a UserError."""
        from ..errors import UserError

        if n < 1:
            raise UserError(f"the prefill chunk must be >= 1 token (got {n})")
        if not self.capabilities.settable_prefill_chunk and n != self.max_prefill_chunk:
            raise UserError(f"{type(self).__name__} prefills at most {self.max_prefill_chunk} tokens per call and "
                            f"cannot take {n} — leave the prefill chunk at {self.max_prefill_chunk}")
        self.max_prefill_chunk = n

    def alloc_slot(self) -> int | None:
        raise NotImplementedError

    def free_slot(self, slot: int) -> None:
        raise NotImplementedError

    def slot_length(self, slot: int) -> int:
        """Tokens held in the slot's cache (= the position of the next token)."""
        raise NotImplementedError

    def num_free_slots(self) -> int:
        raise NotImplementedError

    def prefill_slot(self, slot: int, token_ids: Sequence[int]) -> StepLogits:
        """Append `token_ids` to the slot's cache (positions slot_length .. +n-1); logits of the last one."""
        raise NotImplementedError

    def decode_slots(self, slots: Sequence[int], token_ids: Sequence[int]) -> StepLogits:
        """One token per slot, appended at each slot's own position; one logits row per slot, in order."""
        raise NotImplementedError

    # ---- engines with capabilities.paged_kv (KV memory in blocks; docs/paged_kv.md)
    def admit_slot(self, slot: int, token_ids: Sequence[int]) -> int | None:
        """A fresh slot that will hold `token_ids`: blocks for all of them, the cached prefix reused (prefix_cache).
        Returns the tokens already in the cache (the slot's length: prefill token_ids[n:]), or None, changing
        nothing, when too few blocks are free."""
        raise NotImplementedError

    def reserve_slot(self, slot: int, n: int) -> bool:
        """Blocks for the slot's next n positions; False, changing nothing, when too few are free."""
        raise NotImplementedError

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that num_tokens positions take."""
        raise NotImplementedError

    def num_free_blocks(self) -> int:
        raise NotImplementedError

    def kv_stats(self) -> dict:
        """Counters of the block pool (lmopt.kv_blocks.KVCacheManager.stats)."""
        raise NotImplementedError

    def cache_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        """The slot's tokens as the caller knows them (prompt, then every token generated): the full blocks among
        its computed positions become findable by later prompts (prefix_cache), those written by decode steps fed
        on the device included. Call it before free_slot."""
        raise NotImplementedError
