"""SlotEngine implementations for engines that are not slot-native (see slots.py for the interface).

    slots = create_slot_engine(engine, num_slots=8)

picks, in order: the engine itself when it already is a SlotEngine (the compiled GPU engine); `OrtSlotEngine` for the
ONNX Runtime engine on the CPU (one batched decode over rows of different lengths); `SerialSlotEngine` for any other
Engine (each slot decoded on its own at batch 1: correct, not fast).

How the ONNX Runtime decode batches rows of different lengths: the exported graph takes attention_mask
[batch, past+1], position_ids [batch, 1] and past_key_values.N.{key,value} [batch, kv_heads, past, head_dim]. Each
slot keeps its own cache; a decode step left-pads every slot's cache to the longest one, masks the padding with 0 in
attention_mask and gives each row its own position (its length). A masked position gets zero attention weight, so a
row's logits equal those of the same request run alone (up to float summation order; greedy tokens agree).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import Engine
from .slots import HostLogits, SlotCapabilities, SlotEngine, StepLogits


class _SlotPool(SlotEngine):
    """Slot bookkeeping shared by the adapters: a free list, a length per slot, and a per-slot cache state."""

    def __init__(self, engine: Engine, num_slots: int, max_prefill_chunk: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1 (got {num_slots})")
        self.engine = engine
        self.info = engine.info
        self.num_slots = num_slots
        self.max_prefill_chunk = max_prefill_chunk
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._len = [0] * num_slots
        self._state: list[Any] = [None] * num_slots

    def alloc_slot(self) -> int | None:
        return self._free.pop() if self._free else None

    def free_slot(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        if self._state[slot] is not None:
            self.engine.release(self._state[slot])
        self._state[slot], self._len[slot] = None, 0
        self._free.append(slot)

    def slot_length(self, slot: int) -> int:
        return self._len[slot]

    def num_free_slots(self) -> int:
        return len(self._free)

    def _check_room(self, slot: int, n: int) -> None:
        if self._len[slot] + n > self.info.max_positions:
            raise ValueError(f"slot {slot} would hold {self._len[slot] + n} tokens, above the model's context of "
                             f"{self.info.max_positions}")

    def prefill_slot(self, slot: int, token_ids: Sequence[int]) -> StepLogits:
        n = len(token_ids)
        if n == 0:
            raise ValueError("prefill_slot needs at least one token")
        self._check_room(slot, n)
        past = self._len[slot]
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        mask = np.ones((1, past + n), dtype=np.int64)
        pos = np.arange(past, past + n, dtype=np.int64)[None, :]
        if self._state[slot] is None:
            logits, state = self.engine.prefill(ids, mask, pos)
        else:  # the next chunk of a long prompt: a multi-token step on top of the slot's cache
            logits, state = self.engine.decode(self._state[slot], ids, mask, pos)
        self._state[slot], self._len[slot] = state, past + n
        return HostLogits(logits)

    def weight_bytes(self) -> int:
        return self.engine.weight_bytes()

    def synchronize(self) -> None:
        self.engine.synchronize()

    def close(self) -> None:
        for s in range(self.num_slots):
            if self._state[s] is not None:
                self.engine.release(self._state[s])
                self._state[s] = None
        self.engine.close()


class SerialSlotEngine(_SlotPool):
    """Any Engine behind the slot interface: each slot keeps the engine's own state; a decode step runs the slots one
    after the other at batch 1. Correct for every engine; no faster than one request at a time."""

    def decode_slots(self, slots: Sequence[int], token_ids: Sequence[int]) -> StepLogits:
        rows = []
        for slot, tok in zip(slots, token_ids):
            self._check_room(slot, 1)
            n = self._len[slot]
            logits, self._state[slot] = self.engine.decode(
                self._state[slot], np.array([[tok]], dtype=np.int64), np.ones((1, n + 1), dtype=np.int64),
                np.array([[n]], dtype=np.int64))
            self._len[slot] = n + 1
            rows.append(logits[0])
        return HostLogits(np.stack(rows))


class OrtSlotEngine(_SlotPool):
    """The ONNX Runtime CPU engine with one batched decode step over slots of different lengths (left padding, see
    the module docstring). A slot's state is the graph's own present tensors, [1, kv_heads, length, head_dim] per
    layer, so prefill chunks reuse OrtEngine.prefill/decode unchanged."""

    def __init__(self, engine, num_slots: int, max_prefill_chunk: int):
        super().__init__(engine, num_slots, max_prefill_chunk)
        self._last_batch = None   # (slots, their state lists, present tensors) of the last batched step
        self._dtype = engine.kv_dtype
        self._shape = (engine.kv_heads, engine.head_dim)

    @property
    def capabilities(self) -> SlotCapabilities:
        return SlotCapabilities(batched_prefill=True, max_prefill_chunk=self.max_prefill_chunk)

    def _contiguous(self, slot: int) -> None:
        # after a batched step a slot's cache is a strided view; ONNX Runtime's own calls take contiguous arrays
        st = self._state[slot]
        if st is not None:
            self._state[slot] = [np.ascontiguousarray(x) for x in st]

    def free_slot(self, slot: int) -> None:
        if self._last_batch is not None and slot in self._last_batch[0]:
            self._last_batch = None  # no longer reusable: do not keep its tensors alive
        super().free_slot(slot)

    def prefill_slot(self, slot: int, token_ids: Sequence[int]) -> StepLogits:
        self._contiguous(slot)
        return super().prefill_slot(slot, token_ids)

    def prefill_slots(self, slots: Sequence[int], token_lists: Sequence[Sequence[int]]) -> StepLogits:
        """Prefill several empty slots in one batched call (prompts left-padded, as lmopt.generate batches them);
        one logits row per slot. An optional extension of the slot interface: the scheduler uses it when present,
        so requests admitted together cost one prefill, as under static batching."""
        from ..generate import pad_batch

        if any(self._len[s] for s in slots):
            raise ValueError("prefill_slots takes empty slots only (later chunks go through prefill_slot)")
        for s, t in zip(slots, token_lists):
            self._check_room(s, len(t))
        ids, mask, pos = pad_batch(token_lists, 0)
        logits, present = self.engine.prefill(ids, mask, pos)
        L = ids.shape[1]
        for i, (s, t) in enumerate(zip(slots, token_lists)):
            self._state[s] = [p[i:i + 1, :, L - len(t):, :] for p in present]
            self._len[s] = len(t)
        return HostLogits(logits)

    def decode_slots(self, slots: Sequence[int], token_ids: Sequence[int]) -> StepLogits:
        b = len(slots)
        if b == 0:
            raise ValueError("decode_slots needs at least one slot")
        if b == 1:  # no padding to build: the plain batch-1 step
            self._contiguous(slots[0])
            return SerialSlotEngine.decode_slots(self, slots, token_ids)
        for s in slots:
            self._check_room(s, 1)
        lens = np.array([self._len[s] for s in slots], dtype=np.int64)
        L = int(lens.max())
        h, d = self._shape
        last = self._last_batch
        if last is not None and last[0] == tuple(slots) and all(self._state[s] is st for s, st in zip(slots, last[1])):
            # the same rows as the previous step, untouched since: its present tensors already are this step's
            # left-padded past (each row grew by one at the end), so no copy at all
            past = last[2]
        else:
            past = []
            for layer in range(len(self.engine.past_names)):
                buf = np.zeros((b, h, L, d), dtype=self._dtype)
                for i, s in enumerate(slots):
                    n = lens[i]
                    buf[i, :, L - n:, :] = self._state[s][layer][0]
                past.append(buf)
        mask = np.zeros((b, L + 1), dtype=np.int64)
        for i in range(b):
            mask[i, L - lens[i]:] = 1
        ids = np.asarray(token_ids, dtype=np.int64)[:, None]
        logits, present = self.engine._run_cpu(self.engine._feeds(ids, mask, lens[:, None].copy()), past)
        for i, s in enumerate(slots):
            # each row's cache is the unpadded tail of the batch's present tensors (a view, no copy)
            self._state[s] = [p[i:i + 1, :, L - lens[i]:, :] for p in present]
            self._len[s] = int(lens[i]) + 1
        self._last_batch = (tuple(slots), [self._state[s] for s in slots], present)
        return HostLogits(logits)


class LimitedSlots(SlotEngine):
    """A slot-native engine used with fewer slots than it was built with: at most `num_slots` held at once;
    everything else is the engine's own."""

    def __init__(self, engine: SlotEngine, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1 (got {num_slots})")
        self.engine, self.info, self.num_slots, self._held = engine, engine.info, num_slots, 0

    @property
    def capabilities(self):
        return self.engine.capabilities

    @property
    def max_prefill_chunk(self) -> int:
        return self.engine.max_prefill_chunk

    def set_max_prefill_chunk(self, n: int) -> None:
        self.engine.set_max_prefill_chunk(n)

    def alloc_slot(self) -> int | None:
        if self._held >= self.num_slots:
            return None
        slot = self.engine.alloc_slot()
        self._held += slot is not None
        return slot

    def free_slot(self, slot: int) -> None:
        self.engine.free_slot(slot)
        self._held -= 1

    def num_free_slots(self) -> int:
        return min(self.engine.num_free_slots(), self.num_slots - self._held)

    def slot_length(self, slot: int) -> int:
        return self.engine.slot_length(slot)

    def prefill_slot(self, slot: int, token_ids: Sequence[int]) -> StepLogits:
        return self.engine.prefill_slot(slot, token_ids)

    def prefill_slots(self, slots: Sequence[int], token_lists: Sequence[Sequence[int]]) -> StepLogits:
        return self.engine.prefill_slots(slots, token_lists)

    def decode_slots(self, slots: Sequence[int], token_ids: Sequence[int | None]) -> StepLogits:
        return self.engine.decode_slots(slots, token_ids)

    # a paged engine's blocks (capabilities.paged_kv): the engine's own
    def admit_slot(self, slot: int, token_ids: Sequence[int]) -> int | None:
        return self.engine.admit_slot(slot, token_ids)

    def reserve_slot(self, slot: int, n: int) -> bool:
        return self.engine.reserve_slot(slot, n)

    def blocks_for(self, num_tokens: int) -> int:
        return self.engine.blocks_for(num_tokens)

    def num_free_blocks(self) -> int:
        return self.engine.num_free_blocks()

    def kv_stats(self) -> dict:
        return self.engine.kv_stats()

    def cache_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        self.engine.cache_tokens(slot, token_ids)

    def close(self) -> None:
        self.engine.close()

    def weight_bytes(self) -> int:
        return self.engine.weight_bytes()

    def synchronize(self) -> None:
        self.engine.synchronize()

    def __getattr__(self, name):     # what else the engine has (capture, batch_buckets, ...)
        return getattr(self.engine, name)


def create_slot_engine(engine: Engine, num_slots: int | None = None,
                       max_prefill_chunk: int | None = None) -> SlotEngine:
    """The engine as a SlotEngine: itself when it is one, batched ONNX Runtime on the CPU, else the serial adapter.
    None: the default (8 slots, chunks of 256), or for an engine that already has slots its own (fewer: at most that
    many held at once). A setting a slot-native engine cannot honour is refused with a UserError, never dropped."""
    if isinstance(engine, SlotEngine):
        from ..errors import UserError

        if num_slots is not None and num_slots > engine.num_slots:
            raise UserError(f"{type(engine).__name__} was built with {engine.num_slots} slots, not {num_slots} — "
                            "give the slot count when the engine is created")
        if max_prefill_chunk is not None:
            engine.set_max_prefill_chunk(max_prefill_chunk)
        if num_slots is not None and num_slots < engine.num_slots:
            return LimitedSlots(engine, num_slots)
        return engine
    num_slots = 8 if num_slots is None else num_slots
    max_prefill_chunk = 256 if max_prefill_chunk is None else max_prefill_chunk
    from .ort_engine import OrtEngine

    if isinstance(engine, OrtEngine) and not engine.device.startswith("cuda"):
        return OrtSlotEngine(engine, num_slots, max_prefill_chunk)
    return SerialSlotEngine(engine, num_slots, max_prefill_chunk)
