"""The paged KV cache with prefix caching (the compiled engine with kv_layout="paged", CPU, eager, built-in model):
greedy tokens identical to the contiguous engine with the cache on and off, across requests sharing 0, 1 or many
blocks, with eviction forced by a tiny pool and with preemption forced; the pool back to full after every test;
one-line errors; the metrics the Triton model exports."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from conftest import load_script
from lmopt.engines import create_engine
from lmopt.errors import UserError
from lmopt.generate import SamplingParams, generate

BS = 16
NO_EOS = (-1,)


def _paged(**kw):
    return create_engine("compiled", "tiny", "fp32", num_slots=4, kv_layout="paged", block_size=BS, max_len=256,
                         **kw)


def _assert_pool_full(eng) -> None:
    eng.kv.pool.check()
    assert eng.num_free_blocks() == eng.num_blocks and all(b.ref == 0 for b in eng.kv.pool.blocks)
    assert not eng.kv.seqs and eng.num_free_slots() == eng.num_slots
    assert (eng._table == eng.num_blocks).all()


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(2)
    eng = create_engine("compiled", "tiny", "fp32", num_slots=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def workload(ref):
    """Prompts sharing many blocks (a 3-block 'system prompt'), one block, or none; each request's tokens when run
    alone on the contiguous engine. The first of each group primes the cache for the others."""
    rng = np.random.default_rng(5)

    def ids(n):
        return rng.integers(1, 4096, n).tolist()

    many, one = ids(3 * BS + 5), ids(BS + 2)
    groups = [[many + ids(n) for n in (4, 11, 0, 19)], [one + ids(n) for n in (7, 30)], [ids(n) for n in (9, 40)]]
    params = [SamplingParams(max_new_tokens=int(n), stop_token_ids=NO_EOS) for n in rng.integers(8, 36, 8)]
    params[5] = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=40, seed=7, stop_token_ids=NO_EOS)
    prompts = [p for g in groups for p in g]
    alone = [generate(ref, [p], q).tokens[0] for p, q in zip(prompts, params)]
    first = [0, 4, 6]           # one of each group, run first
    return prompts, params, alone, first


def _serve(eng, workload):
    from lmopt.scheduler import Scheduler

    prompts, params, alone, first = workload
    with Scheduler(eng, max_queue=16) as s:
        reqs = {i: s.submit(prompts[i], params[i]) for i in first}
        for r in reqs.values():
            r.result(timeout=120)
        reqs.update({i: s.submit(prompts[i], params[i]) for i in range(len(prompts)) if i not in first})
        for r in reqs.values():
            r.result(timeout=120)
        st = s.stats()
    got = [reqs[i].tokens for i in range(len(prompts))]
    return got, alone, st


def test_cache_on_reuses_shared_blocks_and_gives_the_contiguous_tokens(workload):
    eng = _paged(num_blocks=64)
    got, alone, st = _serve(eng, workload)
    assert got == alone
    # second wave: 3 requests x 3 shared blocks (the one of 53 tokens = all 3), 1 x 1 block; none for the others
    assert st["prefix_cache_hits"] >= (3 * 3 + 1) * BS and st["preemptions"] == 0, st
    assert st["prefix_cache_queries"] == sum(len(p) for p in workload[0])
    _assert_pool_full(eng)


def test_cache_off_shares_nothing_and_gives_the_same_tokens(workload):
    from lmopt.engines.slotted import LimitedSlots, create_slot_engine

    eng = _paged(num_blocks=64, prefix_cache=False)
    limited = create_slot_engine(eng, num_slots=3)        # the engine's blocks through the slot-limiting adapter
    assert isinstance(limited, LimitedSlots)
    got, alone, st = _serve(limited, workload)
    assert got == alone
    assert st["prefix_cache_hits"] == 0 and not eng.kv.pool.cached and not eng.capabilities.prefix_cache
    _assert_pool_full(eng)


def test_tiny_pool_evicts_and_preempts_and_gives_the_same_tokens(workload):
    """8 blocks = 128 positions: two running requests (up to 4 and 5 blocks each) do not fit together, so the
    newest is preempted and recomputed; cached blocks nobody holds are evicted for new ones."""
    eng = _paged(num_blocks=8)
    got, alone, st = _serve(eng, workload)
    assert got == alone
    assert st["preemptions"] > 0 and st["kv_evictions"] > 0, st
    assert st["kv_blocks_free"] == st["kv_blocks_total"] == 8
    _assert_pool_full(eng)


def test_generated_tokens_blocks_are_cached_for_the_next_turn(ref):
    """A chat's next turn repeats the last answer: the blocks that answer filled are found although the pipelined
    loop fed its tokens on the device (the scheduler tells the engine the ids when the request finishes)."""
    from lmopt.scheduler import Scheduler

    eng = _paged(num_blocks=32)
    assert eng.capabilities.device_feed
    rng = np.random.default_rng(9)
    first = rng.integers(1, 4096, 20).tolist()
    params = SamplingParams(max_new_tokens=40, stop_token_ids=NO_EOS)
    with Scheduler(eng, max_queue=4) as s:
        a = s.submit(first, params).result(timeout=120)
        hits = s.stats()["prefix_cache_hits"]
        turn = first + a.tokens[:30] + rng.integers(1, 4096, 5).tolist()     # 55 tokens, 48 of them in A's blocks
        b = s.submit(turn, params).result(timeout=120)
        st = s.stats()
    assert a.tokens == generate(ref, [first], params).tokens[0]
    assert b.tokens == generate(ref, [turn], params).tokens[0]
    assert st["prefix_cache_hits"] - hits == 3 * BS, st          # 20 prompt + 28 generated: 3 full blocks
    _assert_pool_full(eng)


def test_admitted_prefix_gives_the_contiguous_logits(ref):
    eng = _paged(num_blocks=32)
    rng = np.random.default_rng(2)
    a = rng.integers(1, 4096, 45).tolist()
    b = a[:40] + rng.integers(1, 4096, 6).tolist()

    def first(engine, prompt, admit):
        s = engine.alloc_slot()
        try:
            n = engine.admit_slot(s, prompt) if admit else 0
            out = engine.prefill_slot(s, prompt[n:])
            step = engine.decode_slots([s], [int(out.argmax()[0])])
            return n, out.row(0), step.row(0)
        finally:
            engine.free_slot(s)

    assert first(eng, a, True)[0] == 0
    for prompt, hit in ((b, 2 * BS), (a[:2 * BS], BS), (a, 2 * BS)):   # all cached: the last block is recomputed
        n, logits, step = first(eng, prompt, True)
        _, want, want_step = first(ref, prompt, False)
        assert n == hit
        assert np.abs(logits - want).max() < 1e-4 and np.abs(step - want_step).max() < 1e-4
    st = eng.kv_stats()
    assert st["prefix_cache_hits"] == 5 * BS and st["kv_cached_blocks"] >= 2
    _assert_pool_full(eng)


def test_plain_interface_and_generate_on_the_paged_engine(ref):
    eng = _paged(num_blocks=40)
    rng = np.random.default_rng(3)
    ps = [rng.integers(1, 4096, n).tolist() for n in (30, 17, 52)]
    p = SamplingParams(max_new_tokens=12, stop_token_ids=NO_EOS)
    assert generate(eng, ps, p).tokens == generate(ref, ps, p).tokens
    assert generate(eng, ps, p).tokens == generate(ref, ps, p).tokens   # plain prefill(): cached prefixes reused
    assert eng.kv_stats()["prefix_cache_hits"] > 0
    _assert_pool_full(eng)


def test_one_line_errors():
    with pytest.raises(UserError, match="fused decode kernels read the contiguous"):
        _paged(decode_kernels="fused")
    with pytest.raises(UserError, match="contiguous or paged"):
        create_engine("compiled", "tiny", "fp32", kv_layout="blocks")
    with pytest.raises(UserError, match="add kv_layout='paged'"):
        create_engine("compiled", "tiny", "fp32", num_blocks=8)
    with pytest.raises(UserError, match="on the CPU give num_blocks"):
        _paged(kv_memory_fraction=0.5)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(UserError, match="paged_attention='triton' cannot run here"):
            _paged(paged_attention="triton")
    eng = _paged(num_blocks=2)
    a, b = eng.alloc_slot(), eng.alloc_slot()
    eng.prefill_slot(a, list(range(1, 2 * BS + 1)))
    with pytest.raises(UserError, match="no free block"):
        eng.prefill_slot(b, [5])
    assert eng.admit_slot(b, [5]) is None                       # nothing changed
    eng.free_slot(a)
    eng.free_slot(b)
    _assert_pool_full(eng)
    from lmopt.scheduler import Scheduler

    with Scheduler(eng) as s, pytest.raises(UserError, match="blocks of 16 positions the KV pool holds"):
        s.submit(list(range(1, 30)), SamplingParams(max_new_tokens=8))
    repo = load_script("serve/make_model_repository.py")
    for kw, needle in ((dict(kv_layout="paged"), "add --engine compiled"),
                       (dict(engine="compiled", kv_layout="paged", decode_kernels="fused"), "fused decode kernels"),
                       (dict(engine="compiled", kv_num_blocks=8), "add --kv-layout paged"),
                       (dict(engine="compiled", kv_layout="paged", kv_memory_fraction=0.5), "--kv-num-blocks")):
        with pytest.raises(UserError, match=needle):
            repo._check_kv(repo.RepoSettings(**kw))


def test_triton_model_exports_kv_metrics(monkeypatch):
    """The Triton model's _Metrics with a paged engine: the KV gauges and counters, under vLLM-like names, follow
    the scheduler's stats (a stand-in for triton_python_backend_utils records what would be exported)."""
    exported, families = {}, {}

    class Metric:
        def __init__(self, name):
            self.name = name

        def set(self, v):
            exported[self.name] = v

        def increment(self, d):
            exported[self.name] = exported.get(self.name, 0) + d

    class MetricFamily:
        GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

        def __init__(self, name, description, kind):
            self.name = name
            families[name] = kind

        def Metric(self, labels, **kw):
            return Metric(self.name)

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.SimpleNamespace(MetricFamily=MetricFamily))
    from pathlib import Path
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_model_template",
                                                  Path(__file__).parents[1] / "serve" / "templates" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod._Metrics("lm_stream", None, kv=True)
    from lmopt.scheduler import Scheduler

    eng = _paged(num_blocks=8)
    with Scheduler(eng, on_step=m.update) as s:
        for _ in range(2):
            s.submit(list(range(1, 40)), SamplingParams(max_new_tokens=4, stop_token_ids=NO_EOS)).result(60)
        st = s.stats()
    m.update(st)
    m.close()
    assert exported["lm_prefix_cache_queries_total"] == 78 and exported["lm_prefix_cache_hits_total"] == 2 * BS
    assert exported["lm_kv_blocks_free"] == 8 and exported["lm_kv_cache_usage_perc"] == 0
    assert exported.get("lm_num_preemptions_total", 0) == 0 and exported["lm_kv_blocks_used"] == 0
    assert {n for n, k in families.items() if k == "gauge"} >= {"lm_kv_blocks_used", "lm_kv_blocks_free",
                                                                "lm_kv_cache_usage_perc"}
    assert {n for n, k in families.items() if k == "counter"} >= {
        "lm_prefix_cache_queries_total", "lm_prefix_cache_hits_total", "lm_kv_evictions_total",
        "lm_num_preemptions_total"}
    _assert_pool_full(eng)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (CPU torch wheel): the kernel runs in the GPU benchmark instead")
def test_paged_attention_kernel_in_the_interpreter():
    """The paged decode attention kernel (lmopt.engines.paged_attention), run by Triton's CPU interpreter, against
    the gather reference: blocks out of order, a shared prefix, one split and several, a padding row."""
    code = (
        "import torch\nfrom lmopt.engines.paged_attention import paged_decode_attention as k, "
        "paged_decode_attention_ref as r\n"
        "g=torch.Generator().manual_seed(0)\nB,H,KV,D,BS,NB=3,8,2,16,16,20\n"
        "kc=torch.randn(NB+1,BS,KV,D,generator=g);vc=torch.randn(NB+1,BS,KV,D,generator=g)\n"
        "t=torch.full((B,9),NB,dtype=torch.long);p=torch.randperm(NB,generator=g)\n"
        "t[0,:2]=p[:2];t[1,:8]=p[2:10];t[2,:5]=p[10:15];t[2,:2]=t[0,:2]\n"
        "pos=torch.tensor([20,127,70]);q=torch.randn(B,H,D,generator=g);ref=r(q,kc,vc,t[:,:8],pos)\n"
        "for c in (None,16,128):\n  assert (k(q,kc,vc,t[:,:8],pos,chunk=c)-ref).abs().max()<1e-5\n"
        "o=k(q,kc,vc,t[:,:8],torch.tensor([20,127,143]))\n"
        "assert (o[:2]-ref[:2]).abs().max()<1e-5 and torch.isfinite(o).all()\nprint('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_grammar_requests_survive_preemption():
    """Structured output on a pool too small for the requests at once: a preempted request is recomputed with its
    grammar's current state, so every document still validates and equals the run without preemption."""
    pytest.importorskip("llguidance")
    import json

    import jsonschema

    from lmopt.grammar import json_schema_spec
    from lmopt.models import load_tokenizer
    from lmopt.scheduler import Scheduler

    schema = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "xs": {"type": "array", "maxItems": 6,
              "items": {"type": "integer", "minimum": 0, "maximum": 99}}}, "required": ["kind", "xs"],
              "additionalProperties": False}
    tok = load_tokenizer("tiny")
    prompts = [tok(p)["input_ids"] for p in ("The quick brown fox jumps over", "def parse(x, y, z): return",
                                              "import os, sys, json; print(", "Once upon a time there was a")]
    p = SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eos_token_id,), grammar=json_schema_spec(schema))

    def run(num_blocks):
        eng = _paged(num_blocks=num_blocks)
        with Scheduler(eng, tokenizer=tok) as s:
            reqs = [s.submit(q, p) for q in prompts]
            for r in reqs:
                r.result(timeout=120)
            st = s.stats()
        _assert_pool_full(eng)
        return [(r.finish_reason, r.text) for r in reqs], st

    want, st = run(64)
    got, st_small = run(4)            # 4 requests of 2 blocks each in 4 blocks
    assert st["preemptions"] == 0 and st_small["preemptions"] > 0, st_small
    assert got == want
    for reason, text in got:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
