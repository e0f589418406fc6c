"""In-flight batching in process (lmopt.scheduler over lmopt.engines.slotted) on the built-in model: the tokens equal
lmopt.generate run one request at a time; requests join and leave the running batch; cancellation, the bounded
queue, chunked prefill, seeded sampling and stop strings."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lmopt.errors import UserError
from lmopt.generate import SamplingParams, generate, generate_text

NO_EOS = (-1,)  # never sampled: lengths are exactly max_new_tokens


@pytest.fixture(scope="module")
def engines(tiny_export, artifacts):
    from lmopt.engines import create_engine
    from lmopt.models import load_tokenizer

    eng = {name: create_engine(name, "tiny", artifacts=str(artifacts), threads=2) for name in ("ort", "torch")}
    yield eng, load_tokenizer("tiny")
    for e in eng.values():
        e.close()


def _scheduler(engine, tok=None, slots=4, chunk=64, max_queue=16, **kw):
    from lmopt.engines.slotted import create_slot_engine
    from lmopt.scheduler import Scheduler

    return Scheduler(create_slot_engine(engine, num_slots=slots, max_prefill_chunk=chunk), tokenizer=tok,
                     max_queue=max_queue, **kw)


def _until(pred, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while not pred() and time.time() < deadline:
        time.sleep(0.002)
    return pred()


def _greedy(n):
    return SamplingParams(max_new_tokens=n, stop_token_ids=NO_EOS)


def test_slot_engine_picks():
    from lmopt.engines.slots import SlotEngine
    from lmopt.engines.slotted import OrtSlotEngine, SerialSlotEngine, create_slot_engine
    from lmopt.engines.ort_engine import OrtEngine
    from lmopt.engines.torch_engine import TorchEngine

    ort, pt = OrtEngine.__new__(OrtEngine), TorchEngine.__new__(TorchEngine)
    ort.device, ort.kv_dtype, ort.kv_heads, ort.head_dim, ort.info = "cpu", np.float32, 2, 32, None
    pt.info = None
    assert isinstance(create_slot_engine(ort, 2), OrtSlotEngine)
    assert isinstance(create_slot_engine(pt, 2), SerialSlotEngine)
    native = SlotEngine()
    assert create_slot_engine(native) is native


# batched ONNX Runtime slots (16 requests); the serial adapter over PyTorch (fewer: PyTorch eager is slow per call)
@pytest.mark.parametrize("name,count", [("ort", 16), ("torch", 6)])
def test_random_arrivals_give_the_tokens_of_each_request_run_alone(engines, name, count):
    eng, _ = engines
    rng = np.random.default_rng(15)
    prompts = [rng.integers(1, eng[name].info.vocab_size, int(n)).tolist() for n in rng.integers(1, 90, count)]
    lengths = [int(n) for n in rng.integers(1, 40, count)]
    alone = [generate(eng[name], [p], _greedy(n)).tokens[0] for p, n in zip(prompts, lengths)]
    with _scheduler(eng[name], slots=6, chunk=32) as s:
        reqs = []
        for p, n in zip(prompts, lengths):  # arrivals at random times, while earlier requests generate
            time.sleep(float(rng.uniform(0, 0.01)))
            reqs.append(s.submit(p, _greedy(n)))
        for r in reqs:
            r.result(timeout=120)
        st = s.stats()
    assert [r.tokens for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)
    assert st["slots_in_use"] == 0 and st["queue_length"] == 0 and st["finished"] == count
    assert st["tokens"] == sum(lengths)


def test_short_request_arriving_during_a_long_one_finishes_first(engines):
    # under static batching the short request would wait for the long one to finish
    eng, _ = engines
    with _scheduler(eng["ort"], slots=4) as s:
        started = threading.Event()
        long = s.submit([5, 6, 7], _greedy(400), on_event=lambda ev: started.set() if ev.token is not None else None)
        assert started.wait(60)
        short = s.submit([9, 10, 11, 12], _greedy(4))
        short.result(timeout=60)
        long_done_at_short_end = long.finished
        long.result(timeout=120)
    assert not long_done_at_short_end
    assert short.finished_at < long.finished_at and long.first_token_at < short.submitted_at
    assert len(long.tokens) == 400 and len(short.tokens) == 4
    assert short.tokens == generate(eng["ort"], [[9, 10, 11, 12]], _greedy(4)).tokens[0]


@pytest.mark.parametrize("how", ["cancel", "is_cancelled"])
def test_cancellation_frees_the_slot_within_one_step(engines, how):
    eng, _ = engines
    flag = threading.Event()
    with _scheduler(eng["ort"], slots=2) as s:
        seen, at_final = [], {}

        def on_event(ev):
            if ev.finished:
                at_final.update(s.stats(), reason=ev.finish_reason)
            else:
                seen.append(ev.token)

        other = s.submit([3, 4], _greedy(300))
        r = s.submit([1, 2, 3], _greedy(400), on_event=on_event,
                     is_cancelled=flag.is_set if how == "is_cancelled" else None)
        assert _until(lambda: len(seen) >= 5)
        steps_at_cancel = s.stats()["steps"]
        r.cancel() if how == "cancel" else flag.set()
        assert r.wait(30)
        # the step running when cancel() came may finish; the next one retires the request first thing
        assert at_final["reason"] == "cancelled" and r.retired_step <= steps_at_cancel + 1
        assert at_final["slots_in_use"] == 1  # only `other` still holds a slot
        assert len(r.tokens) < 400 and not other.finished
        other.cancel()
        other.wait(30)
        assert s.stats()["slots_in_use"] == 0 and s.stats()["cancelled"] == 2


def test_full_queue_raises_server_busy_and_keeps_serving(engines):
    from lmopt.scheduler import BUSY_PREFIX, ServerBusy

    eng, _ = engines
    with _scheduler(eng["ort"], slots=2, max_queue=1) as s:
        running = [s.submit([7, 8, 9], _greedy(300)) for _ in range(3)]  # 2 in slots + 1 waiting
        with pytest.raises(ServerBusy) as e:
            s.submit([1, 2], _greedy(4))
        assert str(e.value).startswith(BUSY_PREFIX) and str(e.value).startswith("server busy: ")
        assert isinstance(e.value, UserError)
        assert _until(lambda: s.stats()["slots_in_use"] == 2)  # the loop admits the first two
        assert s.stats()["rejected"] == 1 and s.stats()["queue_length"] == 1
        running[2].cancel()    # a waiting request can be cancelled too: it frees its queue place
        running[2].wait(30)
        ok = s.submit([1, 2], _greedy(4))
        for r in running[:2]:
            r.cancel()
        assert ok.result(timeout=60).tokens == generate(eng["ort"], [[1, 2]], _greedy(4)).tokens[0]
        assert ok.finish_reason == "length"


def test_chunked_prefill_does_not_stall_running_streams(engines):
    """A long prompt arriving during 16 running streams: it is prefilled in chunks, and every step that prefills a
    chunk also decodes all 16 (decode steps run between the chunks: the running streams never wait for the whole
    prompt). The inter-token latency this costs is bounded by the chunk's time budget (decode_wait_ratio, tested
    below on synthetic timings; the measured ITL p99 with and without the long prompt is a benchmark row,
    profile/long_prompt_itl.py, not a timed unit test)."""
    eng, _ = engines
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, eng["ort"].info.vocab_size, 300).tolist()
    with _scheduler(eng["ort"], slots=17, chunk=64, max_queue=4) as s:
        running = [s.submit(rng.integers(1, 4096, 3).tolist(), _greedy(400)) for _ in range(16)]
        assert _until(lambda: s.stats()["tokens"] >= 16 * 3)
        r = s.submit(prompt, _greedy(8))
        r.result(timeout=120)
        # the steps from the one that admitted it (it ended after the admission) to its first token
        steps = [st for st in list(s.timeline) if st[0] + st[1] >= r.admitted_at and st[0] <= r.first_token_at]
        for x in running:
            x.cancel()
    chunks = [(rows, pf) for _, _, _, rows, pf in steps if pf]
    assert sum(pf for _, pf in chunks) == 300 and len(chunks) >= 300 // 64, chunks
    assert all(rows >= 16 and pf <= 64 for rows, pf in chunks), chunks  # (the last one decodes the newcomer too)
    assert r.tokens == generate(eng["ort"], [prompt], _greedy(8)).tokens[0]


def test_prefill_chunk_time_bound_converges_to_the_decode_step(engines):
    """The chunk controller on synthetic timings: a decode-only step of 10 ms, a prefill costing 2 ms + 0.1 ms per
    token. With decode_wait_ratio 1 the chunk settles where its prefill costs one decode step (80 tokens); with 0.5,
    where it costs half (30); the engine's chunk limit and min_prefill_chunk bound it."""
    eng, _ = engines
    for ratio, want in ((1.0, 80), (0.5, 30), (4.0, 256)):
        with _scheduler(eng["ort"], chunk=256, decode_wait_ratio=ratio) as s:
            s._t_decode, s._t_token = 0.010, 0.0001
            s._decoding = [object()]         # the budget while a request decodes (the loop is idle: none queued)
            for _ in range(30):
                c = s._prefill_budget()
                s._adapt_chunk(0.010 + 0.002 + 0.0001 * c, c, True)
            s._decoding = []
        assert abs(c - want) <= 2, (ratio, c)
    with _scheduler(eng["ort"], chunk=256, min_prefill_chunk=16) as s:
        s._t_decode, s._t_token, s._chunk = 0.001, 0.001, None
        s._decoding = [object()]
        assert s._prefill_budget() == 16     # one token costs as much as a decode step: the floor still advances
        s._decoding = []


@pytest.mark.parametrize("name", ["ort", "torch"])
def test_seeded_sampling_is_reproducible_and_equals_generate(engines, name):
    eng, _ = engines
    p = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=11, stop_token_ids=NO_EOS)
    with _scheduler(eng[name]) as s:
        # a greedy neighbour in the same batch must not disturb the sampled request's generator
        reqs = [s.submit([1, 2, 3], p), s.submit([7, 7], _greedy(24)), s.submit([1, 2, 3], p)]
        a, _, b = [r.result(timeout=60).tokens for r in reqs]
        c = s.submit([1, 2, 3], SamplingParams(**{**p.__dict__, "seed": 12})).result(timeout=60).tokens
    assert a == b == generate(eng[name], [[1, 2, 3]], p).tokens[0]
    assert a != c


def test_text_stop_strings_and_stop_tokens_match_generate_text(engines):
    eng, tok = engines
    prompts = ["The list", "def f(", "A class attribute"]
    with _scheduler(eng["ort"], tok) as s:
        for stop in ((" the",), ("\n",), ()):
            p = SamplingParams(max_new_tokens=40, stop_strings=stop, stop_token_ids=(tok.eos_token_id,))
            texts, out = generate_text(eng["ort"], tok, prompts, [p] * len(prompts))
            pieces: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
            reqs = [s.submit(tok(t)["input_ids"], p, on_event=lambda ev, i=i: pieces[i].append(ev.text))
                    for i, t in enumerate(prompts)]
            for i, r in enumerate(reqs):
                r.result(timeout=60)
                assert r.text == texts[i] == "".join(pieces[i]), (stop, i)
                assert r.tokens == out.tokens[i]
                assert r.finish_reason == out.finish_reasons[i]


def test_bad_requests_are_one_line_user_errors(engines):
    eng, tok = engines
    with _scheduler(eng["ort"]) as s:
        with pytest.raises(UserError, match="empty prompt"):
            s.submit([], _greedy(4))
        with pytest.raises(UserError, match="exceeds the context length"):
            s.submit([1] * 500, _greedy(100))
        with pytest.raises(UserError, match="top_p"):
            s.submit([1], SamplingParams(top_p=2.0))
        with pytest.raises(UserError, match="need a tokenizer"):
            s.submit([1], SamplingParams(stop_strings=("x",)))
        assert s.submit([1, 2], _greedy(3)).result(timeout=30).finish_reason == "length"
        assert s.stats()["rejected"] == 0


def test_requests_admitted_together_share_one_batched_prefill(engines):
    from lmopt.engines.slotted import OrtSlotEngine, create_slot_engine
    from lmopt.scheduler import Scheduler

    eng, _ = engines
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, eng["ort"].info.vocab_size, int(n)).tolist() for n in (5, 31, 12, 2, 60, 17)]
    slots = create_slot_engine(eng["ort"], num_slots=6, max_prefill_chunk=256)
    assert isinstance(slots, OrtSlotEngine)
    calls = []
    batched = slots.prefill_slots
    slots.prefill_slots = lambda s, t: calls.append(len(s)) or batched(s, t)
    s = Scheduler(slots, max_queue=8)
    with s._cond:  # submitted while the loop waits on the lock: all six are admitted in the same step
        reqs = [s.submit(p, _greedy(10)) for p in prompts]
    for r in reqs:
        r.result(timeout=60)
    s.close()
    assert calls == [6]
    assert [r.tokens for r in reqs] == [generate(eng["ort"], [p], _greedy(10)).tokens[0] for p in prompts]


def test_transport_cancel_check_is_rate_limited_when_asked(engines):
    # is_cancelled() of a server transport can be a round trip to another process: cancel_poll_s bounds how often
    # it is called, and a cancellation is still seen within that time
    eng, _ = engines
    calls, flag = [], threading.Event()

    def is_cancelled():
        calls.append(time.monotonic())
        return flag.is_set()

    with _scheduler(eng["ort"], cancel_poll_s=0.05) as s:
        r = s.submit([1, 2, 3], _greedy(400), is_cancelled=is_cancelled)
        assert _until(lambda: len(r.tokens) >= 50)
        flag.set()
        t_cancel = time.monotonic()
        assert r.wait(30) and r.finish_reason == "cancelled"
        stopped = time.monotonic()
    gaps = np.diff(calls)
    assert len(gaps) and gaps.min() >= 0.045, gaps.min()
    assert stopped - t_cancel < 1.0 and s.stats()["steps"] > len(calls)  # checked less often than every step


@pytest.fixture(scope="module")
def table_scheduler(engines):
    eng, tok = engines
    with _scheduler(eng["ort"], tok) as s:
        yield s


@pytest.mark.parametrize("case, prompt", __import__("stop_cases").cases())
def test_stop_string_table_offline(engines, table_scheduler, case, prompt):
    """The shared stop-string table (tests/stop_cases.py) offline: generate_text and the in-process scheduler give
    what it says; tests/test_serve.py and tests/test_openai.py hold Triton and the gateway to the same table."""
    from stop_cases import CASES, MAX_TOKENS, expected

    eng, tok = engines
    base = SamplingParams(max_new_tokens=MAX_TOKENS, stop_token_ids=(tok.eos_token_id,))
    (full,), ref = generate_text(eng["ort"], tok, [prompt], base)
    stops = CASES[case](full)
    want = expected(stops, full, ref.finish_reasons[0])
    p = SamplingParams(max_new_tokens=MAX_TOKENS, stop_token_ids=(tok.eos_token_id,), stop_strings=stops)
    (text,), out = generate_text(eng["ort"], tok, [prompt], p)
    assert (text, out.finish_reasons[0]) == want
    pieces = []
    r = table_scheduler.submit(tok(prompt)["input_ids"], p, on_event=lambda ev: pieces.append(ev.text))
    r.result(timeout=60)
    assert (r.text, "".join(pieces), r.finish_reason) == (want[0], want[0], want[1])


def test_capabilities_are_declared_and_a_setting_an_engine_cannot_honour_is_refused(engines):
    from lmopt.engines.slots import SlotCapabilities, SlotEngine
    from lmopt.engines.slotted import create_slot_engine
    from lmopt.scheduler import Scheduler

    eng, _ = engines
    ort = create_slot_engine(eng["ort"], num_slots=2, max_prefill_chunk=32)
    caps = ort.capabilities
    assert caps.batched_prefill and not caps.device_feed and caps.max_prefill_chunk == 32
    with pytest.raises(UserError, match="cannot feed a decode step from the device"):
        Scheduler(ort, pipeline=True)

    class Fixed(SlotEngine):  # a slot-native engine with its own slots and a chunk it cannot change
        num_slots, max_prefill_chunk = 4, 128

        @property
        def capabilities(self):
            return SlotCapabilities(max_prefill_chunk=128, settable_prefill_chunk=False)

    e = Fixed()
    assert create_slot_engine(e) is e and create_slot_engine(e, max_prefill_chunk=128) is e
    with pytest.raises(UserError, match="cannot take 64") as err:
        create_slot_engine(e, max_prefill_chunk=64)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="built with 4 slots"):
        create_slot_engine(e, num_slots=8)


def test_a_slot_native_engine_used_with_fewer_slots_holds_at_most_that_many(engines):
    """create_slot_engine(native, num_slots=k < its own): at most k requests hold a slot; the tokens are the engine's."""
    from lmopt.engines.slotted import LimitedSlots, OrtSlotEngine, create_slot_engine
    from lmopt.scheduler import Scheduler

    eng, _ = engines
    native = OrtSlotEngine(eng["ort"], 4, 64)          # stands in for a slot-native engine built with 4 slots
    limited = create_slot_engine(native, num_slots=2)
    assert isinstance(limited, LimitedSlots) and limited.capabilities == native.capabilities
    with Scheduler(limited, max_queue=8) as s:
        reqs = [s.submit([1, 2, 3 + i], _greedy(30)) for i in range(4)]
        assert _until(lambda: s.stats()["tokens"] > 0)
        assert s.stats()["slots_in_use"] <= 2 and native.num_free_slots() >= 2
        for r in reqs:
            r.result(timeout=60)
    assert [r.tokens for r in reqs] == [generate(eng["ort"], [[1, 2, 3 + i]], _greedy(30)).tokens[0] for i in range(4)]
    assert native.num_free_slots() == 4


def test_long_prompt_itl_benchmark_runs_small(engines, artifacts, tmp_path):
    """profile/long_prompt_itl.py (the benchmark row behind docs/serving.md's long-prompt figure) on a small setting:
    both policies measured with and without the long prompt; the bounded one prefilled it in more chunks."""
    from conftest import read_json, run_cli

    out = tmp_path / "itl.json"
    run_cli("profile/long_prompt_itl.py", "--model", "tiny", "--artifacts", str(artifacts), "--streams", "4",
            "--prompt-len", "300", "--rounds", "1", "--out", str(out), "-q")
    s = read_json(out)["summary"]
    for p in ("bounded", "chunk-only"):
        assert s[p]["itl_ms_with_long_prompt"]["count"] and s[p]["itl_ms_without"]["count"], p
        assert s[p]["itl_p99_ratio"] is not None
    assert sum(s["bounded"]["chunks"][0]) == sum(s["chunk-only"]["chunks"][0]) == 300
    assert len(s["bounded"]["chunks"][0]) >= len(s["chunk-only"]["chunks"][0]) == 2
