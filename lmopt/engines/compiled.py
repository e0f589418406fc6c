"""The compiled decode engine: a static, slotted KV cache and one CUDA graph per decode batch bucket.

    eng = CompiledEngine("llama-1b", precision="fp16", device="cuda")   # or create_engine("compiled", ...)
    slot = eng.alloc_slot()
    first = eng.prefill_slot(slot, prompt_ids).argmax()[0]
    nxt = eng.decode_slots([slot], [first]).argmax()

The model is lmopt.engines.static_decoder (weights copied from the Hugging Face model `lmopt.models.load_model`
gives). Decode pads the step to a captured batch bucket (1, 2, 4, ..., num_slots): slots are handed out lowest id
first, so the rows of a step are slots [0, bucket) and the cache is read as a view; rows of the bucket that are not
in the step write to a scratch column and their outputs are dropped. Attention reads the first `kv_len` cache
columns, a power-of-two bucket (from 256) over the longest row, so a short request does not pay for the whole
context. On CUDA each (batch bucket, kv bucket) pair is compiled with torch.compile (inductor, fullgraph, static
shapes) and captured once in a CUDA graph sharing one memory pool, then replayed; on the CPU the same step runs
eagerly. Prefill runs eagerly (it is compute-bound). docs/compiled_engine.md explains the choices.

With kv_layout="paged" the cache is a pool of blocks behind a block table instead (lmopt.kv_blocks: reference
counts, an LRU free queue, automatic prefix caching), `admit_slot` reuses a prompt's cached prefix and the scheduler
admits by free blocks; the table is an input of the captured step. docs/paged_kv.md.

The plain Engine interface (prefill/decode/release) is built on slots: one slot per row of the batch.
"""
from __future__ import annotations

import bisect
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..models import load_model, resolve
from .base import EngineInfo
from .slots import DeviceLogits, SlotCapabilities, SlotEngine, StepLogits

log = logging.getLogger("lmopt.compiled")

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KV_BUCKET_MIN = 256
DECODE_KERNELS = ("inductor", "fused")   # the decode step: torch.compile'd, or lmopt.engines.kernels (small batches)
DEFAULT_MAX_LEN = 4096     # positions per slot unless asked (a 128k-context model would not fit 64 slots otherwise)


@dataclass
class SlotState:
    """State of one plain-interface generation: the slots of its rows."""
    slots: list[int]


class CompiledEngine(SlotEngine):
    def __init__(self, model: str, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 num_slots: int | None = None, max_len: int | None = None, compile: bool | None = None,
                 cuda_graphs: bool | None = None, decode_attention: str = "sdpa", hf_model=None,
                 weight_quant: str | None = None, group_size: int = 128, max_prefill_chunk: int | None = None,
                 decode_kernels: str = "inductor", fused_max_batch: int = 8, kv_layout: str = "contiguous",
                 block_size: int = 16, num_blocks: int | None = None, kv_memory_fraction: float | None = None,
                 prefix_cache: bool = True, paged_attention: str = "gather"):
        import torch

        if precision not in _DTYPES:
            raise UserError(f"the compiled engine runs fp32, fp16 or bf16, not {precision} — pick one of those")
        cuda = device.startswith("cuda")
        if precision != "fp32" and not cuda:
            raise UserError(f"compiled {precision} needs a GPU (--device cuda) — use fp32 on CPU")
        if cuda and not torch.cuda.is_available():
            raise UserError("no CUDA GPU visible to torch — run on a GPU machine or pass --device cpu")
        if decode_attention not in ("matmul", "sdpa"):
            raise UserError(f"decode attention '{decode_attention}' is unknown — use matmul or sdpa")
        if decode_kernels not in DECODE_KERNELS:
            raise UserError(f"decode kernels '{decode_kernels}' are unknown — use one of {', '.join(DECODE_KERNELS)}")
        if weight_quant == "int4g" and decode_kernels != "fused":
            raise UserError("weight quantization int4g is made for the fused decode kernels — add "
                            "decode_kernels='fused' (or use int4)")
        _check_kv_layout(kv_layout, block_size, num_blocks, kv_memory_fraction, decode_kernels, cuda)
        if paged_attention not in ("gather", "triton"):
            raise UserError(f"paged attention '{paged_attention}' is unknown — use gather or triton")
        if paged_attention == "triton":
            from .paged_attention import available

            why = available(device) or (None if kv_layout == "paged" else "it reads the paged KV cache — add "
                                        "kv_layout='paged'")
            if why is None and (block_size < 16 or block_size & (block_size - 1)):
                why = f"it takes blocks of a power of two >= 16 positions, not {block_size}"
            if why:
                raise UserError(f"paged_attention='triton' cannot run here: {why} — or use paged_attention='gather'")
        if threads:
            torch.set_num_threads(threads)
        spec = resolve(model)
        if spec.kind in ("builtin", "local") and not any(spec.path.glob("*.safetensors")):
            raise UserError(f"{spec.path} has no *.safetensors file — the compiled engine loads safetensors "
                            "weights only (re-save the model with save_pretrained(..., safe_serialization=True))")
        self.torch, self.device, self.cuda = torch, device, cuda
        dtype = getattr(torch, _DTYPES[precision])
        t0 = time.perf_counter()
        hf = hf_model if hf_model is not None else load_model(model, dtype=_DTYPES[precision], device=device)
        from .static_decoder import StaticDecoder

        with torch.inference_mode():
            self.model = StaticDecoder.from_hf(hf, dtype, device)
            if weight_quant:  # weight-only INT8/INT4 (lmopt.engines.weight_quant); activations stay `precision`
                self.model.quantize_weights(weight_quant, group_size)
        del hf
        if weight_quant and cuda:
            torch.cuda.empty_cache()
        self.weight_quant = weight_quant
        if decode_kernels == "fused" and self.model.fused_ready():
            raise UserError(f"the fused decode kernels do not take {self.model.fused_ready()} — use int4g or none")
        self.decode_kernels, self.fused_max_batch = decode_kernels, fused_max_batch
        self.model.decode_attention = decode_attention
        self.model.paged_attention = paged_attention
        ctx = self.model.cfg["max_positions"]
        self.max_len = min(max_len or min(ctx, DEFAULT_MAX_LEN), ctx)
        self.num_slots = num_slots or (64 if cuda else 8)
        self.paged = kv_layout == "paged"
        if self.paged:   # a slot's positions are whole blocks (the table's last column is the scratch block)
            self.max_len -= self.max_len % block_size
        if self.num_slots < 1 or self.max_len < 2:
            raise UserError(f"num_slots must be >= 1 and max_len >= 2 (got {self.num_slots}, {self.max_len})")
        per_token = self.model.kv_bytes_per_token()
        free = torch.cuda.mem_get_info(torch.device(device))[0] if cuda else None
        if self.paged:
            if num_blocks is None and kv_memory_fraction is not None:
                num_blocks = int(kv_memory_fraction * free) // (block_size * per_token) - 1
            # default: the memory the contiguous cache of these slots would take
            num_blocks = num_blocks or self.num_slots * (self.max_len // block_size)
            if num_blocks < 1:
                raise UserError(f"a KV pool of {num_blocks} blocks holds nothing — give more memory or num_blocks")
            kv_total = (num_blocks + 1) * block_size * per_token
            what = f"{num_blocks} blocks x {block_size} positions"
        else:
            kv_total = self.num_slots * (self.max_len + 1) * per_token
            what = f"{self.num_slots} slots x {self.max_len} positions"
        if cuda and kv_total > 0.9 * free:
            raise UserError(f"a KV cache of {what} needs {kv_total / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of "
                            "GPU memory is free — lower " + ("num_blocks or kv_memory_fraction" if self.paged
                                                             else "num_slots or max_len"))
        with torch.inference_mode():
            if self.paged:
                self.model.allocate_cache(self.num_slots, self.max_len, num_blocks, block_size)
            else:
                self.model.allocate_cache(self.num_slots, self.max_len)
        self.kv = None
        if self.paged:
            from ..kv_blocks import KVCacheManager

            # the extra key: blocks of another model or precision never match (one engine holds one model, but
            # the key costs nothing and keeps a shared pool honest)
            self.kv = KVCacheManager(num_blocks, block_size, enable_caching=prefix_cache,
                                     extra_key=f"{model}|{precision}|{weight_quant or ''}")
            self.block_size, self.num_blocks = block_size, num_blocks
            # the block table's host copy; rows are uploaded with each step's inputs (the captured step reads the
            # device table, never Python state)
            self._table = np.full((self.num_slots, self.max_len // block_size + 1), num_blocks, dtype=np.int64)
        self.info = EngineInfo("compiled", precision + (f"+{weight_quant}w" if weight_quant else "")
                               + ("+fused" if decode_kernels == "fused" else ""), device, "hf",
                               model, self.max_len, self.model.cfg["vocab"])
        self.batch_buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < self.num_slots] + [self.num_slots]
        if max_prefill_chunk is not None:   # after batch_buckets (its capabilities name them), before prefill_lens
            self.set_max_prefill_chunk(max_prefill_chunk)
        self.kv_buckets = sorted({min(self.max_len, KV_BUCKET_MIN << i) for i in range(16)})
        # fresh prefills replayed as CUDA graphs: rows x tokens buckets (longer or continued prompts run eagerly)
        self.prefill_rows = [r for r in (1, 2, 4, 8) if r <= self.num_slots]
        self.prefill_lens = [n for n in (16, 32, 64, 128, 256, 512) if n <= min(self.max_len, self.max_prefill_chunk)]
        if not self.prefill_lens:
            self.prefill_lens = [self.max_len]
        self.use_compile = cuda if compile is None else compile
        self.use_graphs = cuda if cuda_graphs is None else (cuda_graphs and cuda)
        self._step = self.model.decode
        if self.use_compile:
            import torch._dynamo.config as dc

            # one compiled variant per (batch bucket, kv bucket): raise dynamo's recompile limit to hold them all
            n = len(self.batch_buckets) * len(self.kv_buckets) + 8
            for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                if hasattr(dc, name):
                    setattr(dc, name, max(getattr(dc, name), n))
            self._step = torch.compile(self.model.decode, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.compile_error: str | None = None
        self._pool = None
        B = self.batch_buckets[-1]
        # the step's inputs live in one buffer so a step uploads them with one copy: ids, positions, and a flag per
        # row "take the token this slot got in the previous decode step" (decode_slots with token None)
        self._host = torch.zeros((3, B), dtype=torch.long, pin_memory=cuda)
        self._dev = torch.zeros((3, B), dtype=torch.long, device=device)
        self._ids, self._pos, self._use_prev = self._dev[0], self._dev[1], self._dev[2]
        self._h2d_done = torch.cuda.Event() if cuda else None
        # each slot's greedy token of the last decode step it was in, kept on the device (read by the next step)
        self._last = torch.zeros(B, dtype=torch.long, device=device)
        self._last_slots: set[int] = set()   # slots whose _last entry is their newest token
        # greedy ids of a decode step go to the host through a ring of two pinned buffers, each with an event, so
        # the step after can be queued before this one's ids are read (DeviceLogits.argmax waits on the event only)
        self._d2h = [torch.zeros(B, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._d2h_done = [torch.cuda.Event() for _ in range(2)] if cuda else [None, None]
        self._d2h_next = 0
        if self.paged:
            self._table_host = torch.from_numpy(self._table.copy()).pin_memory() if cuda else \
                torch.from_numpy(self._table.copy())
        self._free = list(range(self.num_slots))      # a heap: the lowest free id first keeps decode rows packed
        self._used = [False] * self.num_slots
        self._len = [0] * self.num_slots
        self.load_s = time.perf_counter() - t0
        log.info("compiled engine: %s %s on %s, %d slots x %d positions, KV cache %s (%.1f MB), loaded in %.1f s",
                 model, precision, device, self.num_slots, self.max_len,
                 f"paged, {what}, prefix cache {'on' if prefix_cache else 'off'}" if self.paged else "contiguous",
                 kv_total / 1e6, self.load_s)

    @property
    def capabilities(self) -> SlotCapabilities:
        # a prompt may continue in later chunks (they run eagerly); fresh prompts of one step share one forward
        return SlotCapabilities(batched_prefill=True, max_prefill_chunk=self.max_prefill_chunk, device_feed=True,
                                capture=True, batch_buckets=tuple(self.batch_buckets), paged_kv=self.paged,
                                prefix_cache=bool(self.paged and self.kv.enable_caching),
                                kv_block_size=self.block_size if self.paged else 0,
                                kv_num_blocks=self.num_blocks if self.paged else 0)

    # ---------------------------------------------------------------------------------------------------------
    # slots
    def alloc_slot(self) -> int | None:
        if not self._free:
            return None
        s = heapq.heappop(self._free)
        self._used[s], self._len[s] = True, 0
        return s

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self._used[slot], self._len[slot] = False, 0
        self._last_slots.discard(slot)
        if self.paged:
            self.kv.free(slot)
            self._table[slot] = self.num_blocks
        heapq.heappush(self._free, slot)

    # ---------------------------------------------------------------------------------------------------------
    # the paged KV cache (kv_layout="paged"; docs/paged_kv.md): blocks of lmopt.kv_blocks behind a block table
    def admit_slot(self, slot: int, token_ids: Sequence[int]) -> int | None:
        """A fresh slot that will hold `token_ids`: its table points at the cached blocks of their longest cached
        prefix and at new blocks for the rest. Returns the tokens already cached (the slot's length now: prefill
        only token_ids[n:]), or None, changing nothing, when the pool lacks free blocks."""
        self._check_slot(slot)
        if self._len[slot] or slot in self.kv.seqs:
            raise ValueError(f"slot {slot} is not fresh")
        if len(token_ids) > self.max_len:
            raise UserError(f"prompt of {len(token_ids)} tokens does not fit the engine's {self.max_len} positions "
                            "— shorten the prompt or build the engine with a larger max length")
        n = self.kv.allocate(slot, [int(t) for t in token_ids])
        if n is None:
            return None
        self._set_table(slot)
        self._len[slot] = n
        return n

    def reserve_slot(self, slot: int, n: int) -> bool:
        """Blocks for the slot's next `n` positions; False, changing nothing, when the pool has too few free."""
        self._check_slot(slot)
        if not self.paged:
            return True
        held = len(self.kv.seqs[slot].blocks) if slot in self.kv.seqs else 0
        if not self.kv.grow(slot, min(self._len[slot] + n, self.max_len)):
            return False
        if len(self.kv.seqs[slot].blocks) != held:
            self._set_table(slot)
        return True

    def blocks_for(self, num_tokens: int) -> int:
        return self.kv.blocks_for(num_tokens)

    def set_prefix_cache(self, on: bool) -> None:
        """Prefix lookup and caching on or off from now on (a benchmark compares both on one engine); blocks
        cached so far stay cached, unused while off."""
        if not self.paged:
            raise UserError("the prefix cache is a feature of the paged KV cache — build the engine with "
                            "kv_layout='paged'")
        self.kv.pool.enable_caching = bool(on)

    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks()

    def cache_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        """The slot's tokens as the caller knows them: a decode step fed on the device leaves the engine without
        its token's id, so the blocks after it cannot be keyed until the caller says what they hold (the scheduler
        does when a request finishes). Ids that contradict what the engine knows change nothing."""
        self._check_slot(slot)
        seq = self.kv.seqs.get(slot) if self.paged else None
        if seq is None or not self.kv.enable_caching:
            return
        known = len(seq.tokens)
        if len(token_ids) <= known or [int(t) for t in token_ids[:known]] != seq.tokens:
            return
        self.kv.append_tokens(slot, known, token_ids[known:])
        self.kv.commit(slot, self._len[slot])

    def kv_stats(self) -> dict:
        """Blocks total/used/free, prefix cache queries and hits (tokens), evictions (lmopt.kv_blocks)."""
        return self.kv.stats() if self.paged else {}

    def _set_table(self, slot: int) -> None:
        ids = self.kv.block_ids(slot)
        row = self._table[slot]
        row[:] = self.num_blocks
        row[:len(ids)] = ids

    def _reserve_or_fail(self, slot: int, n: int) -> None:
        if not self.reserve_slot(slot, n):
            raise UserError(f"the KV pool has no free block for slot {slot} ({self.kv.num_free_blocks()} of "
                            f"{self.num_blocks} free) — free a slot first (lmopt.scheduler preempts for you)")

    def _upload_table_rows(self, slots) -> None:
        """The host table rows of `slots` into the device table (before an eager or graph prefill)."""
        t = self.torch
        idx = t.tensor(slots, dtype=t.long)
        self.model.block_table[idx.to(self.device)] = t.from_numpy(self._table[slots]).to(self.device)

    def slot_length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._len[slot]

    def num_free_slots(self) -> int:
        return len(self._free)

    def _check_slot(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots) or not self._used[slot]:
            raise ValueError(f"slot {slot} is not allocated")

    # ---------------------------------------------------------------------------------------------------------
    def prefill_slot(self, slot: int, token_ids: Sequence[int]) -> StepLogits:
        return self.prefill_slots([slot], [token_ids])

    def prefill_slots(self, slots: Sequence[int], seqs: Sequence[Sequence[int]]) -> StepLogits:
        """Prefill several slots in one forward (rows right-padded to the longest chunk); one logits row each."""
        t = self.torch
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one prefill")
        starts = []
        for s, seq in zip(slots, seqs):
            self._check_slot(s)
            if len(seq) == 0:
                raise UserError("empty prompt — give at least one token")
            if self._len[s] + len(seq) > self.max_len:
                raise UserError(f"prompt of {len(seq)} tokens after {self._len[s]} cached does not fit the engine's "
                                f"{self.max_len} positions — shorten the prompt or build the engine with a larger "
                                "max length")
            starts.append(self._len[s])
            self._last_slots.discard(s)
        if self.paged:
            for s, seq in zip(slots, seqs):
                self._reserve_or_fail(s, len(seq))
            with t.inference_mode():
                self._upload_table_rows(slots)
        lengths = [len(q) for q in seqs]
        ids = np.zeros((len(slots), max(lengths)), dtype=np.int64)
        for r, q in enumerate(seqs):
            ids[r, :len(q)] = np.asarray(q, dtype=np.int64)
        self._check_vocab(ids)
        R, S = len(slots), max(lengths)
        if self.use_graphs and not any(starts) and R <= self.prefill_rows[-1] and S <= self.prefill_lens[-1]:
            Rb = self.prefill_rows[bisect.bisect_left(self.prefill_rows, R)]
            Sb = self.prefill_lens[bisect.bisect_left(self.prefill_lens, S)]
            with t.inference_mode():
                graph, bufs, out = self._prefill_graph(Rb, Sb)
                host = np.zeros((Rb, Sb + 2), dtype=np.int64)   # [ids | slot | length]; padding rows: length 0
                host[:R, :S] = ids
                host[:R, Sb] = slots
                host[:R, Sb + 1] = lengths
                bufs.copy_(t.from_numpy(host), non_blocking=False)
                graph.replay()
            self._prefilled(slots, seqs)
            return DeviceLogits(out[0], out[1], list(range(R)))
        with t.inference_mode():
            logits = self.model.prefill(slots, t.from_numpy(ids).to(self.device), starts, lengths)
            greedy = logits.argmax(dim=-1)
        self._prefilled(slots, seqs)
        return DeviceLogits(logits, greedy)

    def _prefilled(self, slots, seqs) -> None:
        for s, q in zip(slots, seqs):
            if self.paged:   # the slot's full blocks are computed: findable by later prompts
                self.kv.append_tokens(s, self._len[s], q)
                self.kv.commit(s, self._len[s] + len(q))
            self._len[s] += len(q)

    # decode_slots takes token None for a slot: "the greedy token this slot got in the previous decode step", read
    # on the device, so a caller can queue step k+1 before it has read step k's tokens (lmopt.scheduler does;
    # capabilities.device_feed declares it)

    def decode_slots(self, slots: Sequence[int], token_ids: Sequence[int | None]) -> StepLogits:
        slots = [int(s) for s in slots]
        if not slots:
            raise ValueError("decode_slots needs at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one decode step")
        if len(token_ids) != len(slots):
            raise ValueError("one token per slot")
        for s, tok in zip(slots, token_ids):
            self._check_slot(s)
            if self._len[s] >= self.max_len:
                raise UserError(f"slot {s} is full ({self.max_len} positions) — stop generating at the context "
                                "length or build the engine with a larger max length")
            if tok is None and s not in self._last_slots:
                raise ValueError(f"slot {s} was not in the previous decode step: give its token")
        if self.paged:
            for s, tok in zip(slots, token_ids):
                self._reserve_or_fail(s, 1)
                if tok is not None:   # a known token: the block it completes can be cached (None: the gap stops it)
                    self.kv.append_tokens(s, self._len[s], [tok])
        B = self.batch_buckets[bisect.bisect_left(self.batch_buckets, max(slots) + 1)]
        L = self.kv_buckets[bisect.bisect_left(self.kv_buckets, max(self._len[s] for s in slots) + 1)]
        prev = [tok is None for tok in token_ids]
        ids = np.asarray([0 if tok is None else tok for tok in token_ids], dtype=np.int64)
        self._check_vocab(ids)
        t = self.torch
        if self._h2d_done is not None:
            self._h2d_done.synchronize()           # the previous step's upload has left the pinned buffer
        host = self._host.numpy()
        host[:, :B] = 0
        host[1, :B] = self.max_len                 # rows not in the step: scratch column
        host[0, slots] = ids
        host[1, slots] = [self._len[s] for s in slots]
        host[2, slots] = prev
        if self.paged:   # the block table rows of the step travel with its inputs
            self._table_host.numpy()[:B] = self._table[:B]
        k = self._d2h_next
        self._d2h_next = 1 - k
        with t.inference_mode():
            self._dev.copy_(self._host, non_blocking=True)
            if self.paged:
                self.model.block_table[:B].copy_(self._table_host[:B], non_blocking=True)
            if self._h2d_done is not None:
                self._h2d_done.record()
            fused = self._fused(B)        # the fused step reads the device feed and writes _last itself
            if any(prev) and not fused:
                ids_b = self._ids[:B]
                ids_b.copy_(t.where(self._use_prev[:B] != 0, self._last[:B], ids_b))
            if self.use_graphs:
                graph, out = self._graph(B, L)
                graph.replay()
            else:
                out = self._step_for(B)(self._ids[:B], self._pos[:B], L)
            if not fused:
                self._last[:B].copy_(out[1])
            done = self._d2h_done[k]
            if done is not None:
                done.synchronize()                 # the step before last has finished reading this buffer's copy
            self._d2h[k][:B].copy_(out[1], non_blocking=True)
            if done is not None:
                done.record()
        for s in slots:
            self._len[s] += 1
            if self.paged:
                self.kv.commit(s, self._len[s])
        self._last_slots = set(slots)
        return DeviceLogits(out[0], out[1], slots, host_greedy=(self._d2h[k], done))

    def _fused(self, B: int) -> bool:
        return self.decode_kernels == "fused" and B <= self.fused_max_batch

    def _step_for(self, B: int):
        """The decode step of batch bucket B: the fused kernels' (eager; captured as it is) up to fused_max_batch
        rows, else the inductor-compiled one."""
        if not self._fused(B):
            return self._step
        use_prev, last = self._use_prev, self._last
        return lambda ids, pos, L: self.model.decode_fused(ids, pos, L, feed=(use_prev, last))

    def _graph(self, B: int, L: int):
        """The CUDA graph of the decode step at batch bucket B and kv bucket L, captured on first use."""
        key = (B, L)
        if key in self._graphs:
            return self._graphs[key]
        t = self.torch
        t0 = time.perf_counter()
        ids, pos = self._ids[:B], self._pos[:B]
        # warm-up (compiles, autotunes, initializes cuBLAS) with every row on the scratch column, so no slot's
        # cache changes; then restore the real inputs
        saved = ids.clone(), pos.clone(), self._use_prev[:B].clone(), self._last[:B].clone()
        ids.zero_()
        pos.fill_(self.max_len)
        self._use_prev[:B].zero_()
        step = self._step_for(B)
        s = t.cuda.Stream()
        s.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(s):
            try:
                for _ in range(3):
                    step(ids, pos, L)
            except Exception as e:
                if not self.use_compile or self._fused(B):
                    raise
                # a compiler failure costs speed, not the run: capture the eager step instead, and say so
                self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning("torch.compile failed (%s); capturing the eager decode step instead", self.compile_error)
                self.use_compile, self._step = False, self.model.decode
                self._graphs.clear()
                step = self._step
                for _ in range(3):
                    step(ids, pos, L)
        t.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = t.cuda.graph_pool_handle()
        g = t.cuda.CUDAGraph()
        # thread_local: a serving thread that touches CUDA while this one captures does not break the capture
        with t.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            out = step(ids, pos, L)
        ids.copy_(saved[0])
        pos.copy_(saved[1])
        self._use_prev[:B].copy_(saved[2])
        self._last[:B].copy_(saved[3])
        self._graphs[key] = (g, out)
        log.info("captured decode graph batch %d, kv %d in %.1f s", B, L, time.perf_counter() - t0)
        return g, out

    def _prefill_graph(self, R: int, S: int):
        """The CUDA graph of a fresh prefill of R rows right-padded to S tokens (StaticDecoder.prefill_fresh, eager
        kernels: the graph removes the launch cost of a few hundred small kernels), captured on first use."""
        key = ("prefill", R, S)
        if key in self._graphs:
            return self._graphs[key]
        t = self.torch
        t0 = time.perf_counter()
        bufs = t.zeros((R, S + 2), dtype=t.long, device=self.device)     # lengths 0: warm-up writes scratch only
        ids, slots, lengths = bufs[:, :S], bufs[:, S], bufs[:, S + 1]
        s = t.cuda.Stream()
        s.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(s):
            for _ in range(2):
                self.model.prefill_fresh(slots, ids, lengths)
        t.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = t.cuda.graph_pool_handle()
        g = t.cuda.CUDAGraph()
        with t.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            out = self.model.prefill_fresh(slots, ids, lengths)
        self._graphs[key] = (g, bufs, out)
        log.info("captured prefill graph rows %d, tokens %d in %.2f s", R, S, time.perf_counter() - t0)
        return self._graphs[key]

    def capture(self, batches: Sequence[int], kv_len: int) -> None:
        """Capture the graphs a run will need before timing it (a first use otherwise compiles mid-run)."""
        if not self.use_graphs:
            return
        L = self.kv_buckets[bisect.bisect_left(self.kv_buckets, min(kv_len, self.max_len))]
        with self.torch.inference_mode():
            for b in batches:
                self._graph(self.batch_buckets[bisect.bisect_left(self.batch_buckets, b)], L)
            for r in self.prefill_rows:       # fresh prefills of prompts that fit kv_len
                for n in self.prefill_lens:
                    if n <= max(kv_len, self.prefill_lens[0]):
                        self._prefill_graph(r, n)

    def _check_vocab(self, ids: np.ndarray) -> None:
        v = self.info.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            raise UserError(f"token id {int(ids.max() if ids.max() >= v else ids.min())} is outside the model's "
                            f"vocabulary of {v} — use the model's own tokenizer")

    # ---------------------------------------------------------------------------------------------------------
    # the plain Engine interface, one slot per row
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        b = input_ids.shape[0]
        if b > self.num_free_slots():
            raise UserError(f"a batch of {b} needs {b} KV-cache slots but {self.num_free_slots()} of "
                            f"{self.num_slots} are free — lower the batch or build the engine with more slots")
        # left padding is dropped: each row's real tokens go into its own slot from position 0
        seqs = [input_ids[r][attention_mask[r].astype(bool)].tolist() for r in range(b)]
        slots = [self.alloc_slot() for _ in range(b)]
        try:
            if self.paged:   # each row reuses its cached prefix and prefills the rest
                for s, q in zip(slots, seqs):
                    if self.admit_slot(s, q) is None:
                        raise UserError(f"the KV pool has too few free blocks for a batch of {b} — lower the batch "
                                        "or build the engine with more blocks")
                seqs = [q[self._len[s]:] for s, q in zip(slots, seqs)]
            out = self.prefill_slots(slots, seqs)
            logits = out.logits.float().cpu().numpy()
        except BaseException:
            for s in slots:
                self.free_slot(s)
            raise
        return logits, SlotState(slots)

    def decode(self, state: SlotState, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
        out = self.decode_slots(state.slots, input_ids[:, -1].tolist())
        return out.logits[out.rows].float().cpu().numpy(), state

    def release(self, state: Any) -> None:
        if isinstance(state, SlotState):
            for s in state.slots:
                if self._used[s]:
                    self.free_slot(s)
            state.slots = []

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    def close(self) -> None:
        self._graphs.clear()
        del self.model
        if self.cuda:
            self.torch.cuda.empty_cache()


def _check_kv_layout(kv_layout: str, block_size: int, num_blocks: int | None, kv_memory_fraction: float | None,
                     decode_kernels: str, cuda: bool) -> None:
    """One-line errors for KV-layout settings the engine cannot honour."""
    if kv_layout not in ("contiguous", "paged"):
        raise UserError(f"KV layout '{kv_layout}' is unknown — use contiguous or paged")
    if kv_layout != "paged":
        if num_blocks is not None or kv_memory_fraction is not None:
            raise UserError("num_blocks and kv_memory_fraction size the paged KV cache — add kv_layout='paged'")
        return
    if decode_kernels == "fused":
        raise UserError("the fused decode kernels read the contiguous KV cache — use decode_kernels='inductor' "
                        "with kv_layout='paged'")
    if block_size < 1:
        raise UserError(f"block_size must be >= 1 (got {block_size})")
    if num_blocks is not None and num_blocks < 1:
        raise UserError(f"num_blocks must be >= 1 (got {num_blocks})")
    if kv_memory_fraction is not None:
        if not 0 < kv_memory_fraction < 1:
            raise UserError(f"kv_memory_fraction must be in (0, 1) (got {kv_memory_fraction})")
        if not cuda:
            raise UserError("kv_memory_fraction is a share of free GPU memory — on the CPU give num_blocks")
