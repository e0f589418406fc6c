"""The block pool and prefix cache of lmopt.kv_blocks (pure Python, no model): chained keys, reference counts, the
LRU free queue, eviction, the longest cached prefix, counters, and the pool back to full after every request."""
from __future__ import annotations

import random

import pytest

from lmopt.kv_blocks import BlockPool, KVCacheManager, block_hashes, hash_block_tokens

BS = 4


def _full(kv: KVCacheManager) -> None:
    kv.pool.check()
    assert kv.num_free_blocks() == kv.num_blocks and all(b.ref == 0 for b in kv.pool.blocks)


def test_keys_are_chained_over_the_prefix_and_the_extra_key():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert len(a) == 2                                       # the partial third block has no key
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert a[1] != b[1]                                      # same block, different prefix: different key
    assert block_hashes([1, 2, 3, 4], BS, "model-a") != block_hashes([1, 2, 3, 4], BS, "model-b")
    assert a[0] == hash_block_tokens(None, [1, 2, 3, 4])
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, start=0)
    assert a[1:] == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, start=1, parent=a[0])


def test_shared_prefix_is_reused_in_whole_blocks_and_the_last_token_is_computed():
    kv = KVCacheManager(16, BS)
    p = list(range(1, 11))                                   # 10 tokens: 2 full blocks + 2
    assert kv.allocate("a", p) == 0
    kv.commit("a", len(p))
    assert kv.allocate("b", p + [50, 51]) == 8               # both full blocks hit
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]      # the partial block is never shared
    assert kv.allocate("c", p[:8]) == 4                      # all cached: the last block is recomputed
    assert kv.allocate("d", [7] + p[1:]) == 0                # first block differs: nothing after it matches
    st = kv.stats()
    assert st["prefix_cache_queries"] == 10 + 12 + 8 + 10 and st["prefix_cache_hits"] == 12
    assert [b.ref for b in kv.pool.blocks[:2]] == [3, 2]
    for k in "abcd":
        kv.free(k)
    _full(kv)
    assert len(kv.pool.cached) == 2                          # freed, still findable
    assert kv.allocate("e", p) == 8
    kv.free("e")
    _full(kv)


def test_cached_blocks_with_no_holder_are_evicted_least_recently_freed_first():
    kv = KVCacheManager(6, BS)
    x, y = list(range(100, 109)), list(range(200, 209))      # 2 full blocks + 1 each
    for key, p in (("x", x), ("y", y)):
        kv.allocate(key, p)
        kv.commit(key, len(p))
        kv.free(key)
    assert len(kv.pool.cached) == 4 and kv.pool.evictions == 0
    assert kv.allocate("z", list(range(300, 309))) == 0      # 3 blocks: the 2 unkeyed ones go first, then x's tail
    assert kv.pool.evictions == 1
    assert kv.allocate("x2", x) == 4                         # x's first block survived; its second was evicted
    assert kv.pool.evictions == 3                            # x2's 2 new blocks: y's two, freed after x's
    assert kv.allocate("y2", y) is None                      # nothing free: refused, nothing changed
    assert kv.pool.evictions == 3 and "y2" not in kv.seqs
    for k in ("z", "x2"):
        kv.free(k)
    _full(kv)


def test_eviction_never_touches_a_block_in_use():
    kv = KVCacheManager(4, BS)
    p = list(range(1, 10))
    kv.allocate("a", p)
    kv.commit("a", 9)
    assert kv.allocate("b", p) == 8 and kv.num_free_blocks() == 0
    assert kv.allocate("c", [1]) is None and not kv.grow("a", 13)
    kv.free("b")
    assert kv.grow("a", 13)                                  # b's own block, not a's shared ones
    assert all(b.ref == 1 for b in kv.seqs["a"].blocks)
    kv.free("a")
    _full(kv)


def test_grow_commit_and_decode_tokens():
    kv = KVCacheManager(8, BS)
    assert kv.allocate("a", [1, 2, 3]) == 0 and len(kv.block_ids("a")) == 1
    assert kv.grow("a", 4) and len(kv.block_ids("a")) == 1
    assert kv.grow("a", 5) and len(kv.block_ids("a")) == 2
    kv.append_tokens("a", 3, [4, 5])                         # known decode tokens: their block can be keyed
    kv.commit("a", 5)
    assert len(kv.pool.cached) == 1
    kv.append_tokens("a", 9, [9])                            # after a gap: ignored
    assert kv.seqs["a"].tokens == [1, 2, 3, 4, 5]
    kv.free("a")
    assert kv.allocate("b", [1, 2, 3, 4, 6]) == 4
    kv.free("b")
    _full(kv)


def test_caching_off_shares_nothing():
    kv = KVCacheManager(8, BS, enable_caching=False)
    p = list(range(1, 10))
    kv.allocate("a", p)
    kv.commit("a", 9)
    assert kv.allocate("b", p) == 0 and not kv.pool.cached
    kv.free("a")
    kv.free("b")
    _full(kv)


def test_random_requests_keep_the_invariants():
    rng = random.Random(0)
    kv = KVCacheManager(24, BS)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live = {}
    for i in range(400):
        if live and rng.random() < 0.4:
            k = rng.choice(sorted(live))
            kv.free(k)
            del live[k]
        else:
            p = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            n = kv.allocate(i, p)
            if n is None:
                continue
            assert n % BS == 0 and n < len(p)
            kv.commit(i, len(p))
            live[i] = p
            if rng.random() < 0.5 and kv.grow(i, len(p) + rng.randrange(1, 6)):
                pass
        kv.pool.check()
        held = {b.id for k in live for b in kv.seqs[k].blocks}
        assert kv.num_blocks - kv.num_free_blocks() == len(held)
    for k in list(live):
        kv.free(k)
    _full(kv)
    st = kv.stats()
    assert st["prefix_cache_hits"] > 0 and st["kv_evictions"] > 0


def test_pool_errors():
    with pytest.raises(ValueError):
        BlockPool(0)
    pool = BlockPool(2)
    b = pool.get_new_blocks(1)
    pool.free_blocks(b)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks(b)
    with pytest.raises(ValueError, match="3 blocks asked"):
        pool.get_new_blocks(3)
