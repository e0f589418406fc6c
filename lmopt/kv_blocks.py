"""KV-cache blocks and automatic prefix caching: which block of the pool holds which tokens (pure Python, no torch).

The KV cache of a paged engine is a pool of fixed-size blocks (`block_size` positions each); a request's cache is a
list of block ids, its block table. This module decides which ids; the engine stores the keys and values
(lmopt.engines.compiled, `kv_layout="paged"`; docs/paged_kv.md). The shape follows vLLM V1
(`vllm/v1/core/block_pool.py`, `kv_cache_utils.py`, `kv_cache_manager.py`):

- A full block is keyed by a hash chained over its tokens: hash(parent block's hash, its token ids, an extra key
  such as the model), so equal keys mean equal prefixes, not only equal blocks. The last, partial block of a
  request is never keyed and never shared.
- Blocks are reference-counted. A block whose count drops to 0 goes to the free queue but keeps its key: it can be
  found and reused by the next request with that prefix until it is evicted. The free queue is in eviction order
  (least recently freed first; a request's blocks are freed tail first, so a shared prefix outlives its suffixes;
  blocks without a key go to the front, they are worth nothing). Taking a new block from the front evicts its key.
  A block with a count above 0 is never in the free queue, so eviction never touches a block in use.

    kv = KVCacheManager(num_blocks=64, block_size=16, extra_key="tiny")
    hit = kv.allocate("r1", prompt_ids)        # the longest cached prefix is reused; None: not enough free blocks
    ...prefill prompt_ids[hit:]...
    kv.commit("r1", len(prompt_ids))           # computed: its full blocks become findable by later requests
    kv.grow("r1", len(prompt_ids) + 1)         # room for one more position (False: the pool is exhausted)
    kv.free("r1")
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, tokens: Sequence[int], extra_key: str = "") -> BlockHash:
    """The key of a full block: chained over the parent block's key, so it names the whole prefix up to this block.
    blake2b (16 bytes) rather than Python's hash(): stable across processes and collision-safe in practice."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root:" + extra_key.encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(tokens: Sequence[int], block_size: int, extra_key: str = "", start: int = 0,
                 parent: BlockHash | None = None) -> list[BlockHash]:
    """Keys of the full blocks of `tokens` from block index `start` (whose parent key is `parent`)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size], extra_key)
        out.append(parent)
    return out


@dataclass(eq=False)
class KVBlock:
    id: int
    ref: int = 0
    hash: BlockHash | None = None     # set once the block is full and computed (cached); None = not findable


class BlockPool:
    """Blocks, their reference counts, the free queue (eviction order) and the key -> block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block (got {num_blocks})")
        self.num_blocks, self.enable_caching = num_blocks, enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, KVBlock] = OrderedDict((b.id, b) for b in self.blocks)   # front = evict first
        self.cached: dict[BlockHash, KVBlock] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a request may take now: free ones and cached ones nobody holds (ref 0)."""
        return len(self.free)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > len(self.free):
            raise ValueError(f"{n} blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            _, b = self.free.popitem(last=False)
            if b.hash is not None:   # evicted: its prefix can no longer be found
                if self.cached.get(b.hash) is b:
                    del self.cached[b.hash]
                b.hash = None
                self.evictions += 1
            b.ref = 1
            out.append(b)
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """A request takes cached blocks: one more reference each (out of the free queue if nobody held them)."""
        for b in blocks:
            if b.ref == 0:
                del self.free[b.id]
            b.ref += 1

    def free_blocks(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference each, in the given order (the first is evicted first among them)."""
        for b in blocks:
            if b.ref <= 0:
                raise ValueError(f"block {b.id} freed more often than taken")
            b.ref -= 1
            if b.ref == 0:
                self.free[b.id] = b
                if b.hash is None:
                    self.free.move_to_end(b.id, last=False)   # nothing to keep: reused first

    def cache_block(self, block: KVBlock, h: BlockHash) -> None:
        """The block is full and computed: findable under `h` (a block computed twice keeps the first one's key)."""
        if not self.enable_caching or block.hash is not None or h in self.cached:
            return
        block.hash = h
        self.cached[h] = block

    def lookup(self, hashes: Sequence[BlockHash]) -> list[KVBlock]:
        """The cached blocks of the longest prefix of `hashes`."""
        out = []
        if self.enable_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def check(self) -> None:
        """Invariants (tests): the free queue holds exactly the blocks with ref 0; every key maps to its block."""
        for b in self.blocks:
            if b.ref < 0 or (b.ref == 0) != (b.id in self.free):
                raise AssertionError(f"block {b.id}: ref {b.ref}, in free queue {b.id in self.free}")
        for h, b in self.cached.items():
            if b.hash != h:
                raise AssertionError(f"block {b.id} is cached under a key it does not carry")


@dataclass
class _Seq:
    blocks: list[KVBlock] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)       # token ids known for positions 0.. (may be fewer)
    hashes: list[BlockHash] = field(default_factory=list)  # keys of the full blocks of `tokens`
    committed: int = 0                                      # blocks already offered to the cache


class KVCacheManager:
    """Block tables per request over one BlockPool, with prefix lookup and counters."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, extra_key: str = ""):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        self.block_size, self.extra_key = block_size, extra_key
        self.pool = BlockPool(num_blocks, enable_caching)
        self.seqs: dict[Hashable, _Seq] = {}
        self.queries = 0          # prompt tokens looked up (admitted requests)
        self.hits = 0             # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, key: Hashable) -> list[int]:
        return [b.id for b in self.seqs[key].blocks]

    def match(self, tokens: Sequence[int], hashes: list[BlockHash] | None = None) -> list[KVBlock]:
        """Cached blocks of the longest prefix of `tokens`, leaving at least its last token to compute (its logits
        are what the request needs), in whole blocks: a request never writes into a block it shares."""
        if not self.enable_caching or not tokens:
            return []
        hashes = block_hashes(tokens, self.block_size, self.extra_key) if hashes is None else hashes
        hit = self.pool.lookup(hashes[:(len(tokens) - 1) // self.block_size])
        return hit

    def allocate(self, key: Hashable, tokens: Sequence[int]) -> int | None:
        """A new request `key` whose cache will hold `tokens`: reuse the cached prefix, take new blocks for the
        rest. Returns the number of tokens already in the cache (a multiple of block_size), or None, changing
        nothing, when the pool has too few free blocks."""
        if key in self.seqs:
            raise ValueError(f"request {key!r} already holds blocks")
        tokens = list(tokens)
        hashes = block_hashes(tokens, self.block_size, self.extra_key) if self.enable_caching else []
        hit = self.match(tokens, hashes)
        need = self.blocks_for(len(tokens)) - len(hit)
        held_free = sum(1 for b in hit if b.ref == 0)   # taking them shrinks the free queue too
        if need + held_free > self.pool.num_free:
            return None
        self.pool.touch(hit)
        blocks = hit + self.pool.get_new_blocks(need)
        self.seqs[key] = _Seq(blocks, tokens, hashes, committed=len(hit))
        n = len(hit) * self.block_size
        self.queries += len(tokens)
        self.hits += n
        return n

    def grow(self, key: Hashable, num_tokens: int) -> bool:
        """Room for `num_tokens` positions in request `key`'s blocks (new ones at the end if needed); False,
        changing nothing, when the pool has too few free blocks."""
        s = self.seqs.get(key) or _Seq()
        need = self.blocks_for(num_tokens) - len(s.blocks)
        if need > self.pool.num_free:
            return False
        if need > 0:
            s.blocks += self.pool.get_new_blocks(need)
        self.seqs[key] = s
        return True

    def append_tokens(self, key: Hashable, position: int, tokens: Sequence[int]) -> None:
        """The ids of positions position.. of request `key` (so their blocks can be keyed once full); tokens after a
        gap in what is known (e.g. decode steps fed on the device) are ignored."""
        s = self.seqs[key]
        if position == len(s.tokens):
            s.tokens.extend(int(t) for t in tokens)

    def commit(self, key: Hashable, num_computed: int) -> None:
        """Positions 0..num_computed-1 of `key` are computed: its full blocks among them whose tokens are known
        become findable."""
        if not self.enable_caching:
            return
        s = self.seqs[key]
        full = min(num_computed, len(s.tokens)) // self.block_size
        if full > len(s.hashes):
            s.hashes += block_hashes(s.tokens, self.block_size, self.extra_key, len(s.hashes),
                                     s.hashes[-1] if s.hashes else None)[:full - len(s.hashes)]
        for i in range(s.committed, min(full, len(s.blocks))):
            self.pool.cache_block(s.blocks[i], s.hashes[i])
        s.committed = max(s.committed, min(full, len(s.blocks)))

    def free(self, key: Hashable) -> None:
        """Request `key` is done (finished, cancelled, preempted): its blocks go back, tail first."""
        s = self.seqs.pop(key, None)
        if s is not None:
            self.pool.free_blocks(list(reversed(s.blocks)))

    def stats(self) -> dict:
        used = self.num_blocks - self.pool.num_free
        return {"kv_blocks_total": self.num_blocks, "kv_blocks_used": used, "kv_blocks_free": self.pool.num_free,
                "kv_cache_usage": used / self.num_blocks, "kv_block_size": self.block_size,
                "kv_cached_blocks": len(self.pool.cached), "kv_evictions": self.pool.evictions,
                "prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits}
