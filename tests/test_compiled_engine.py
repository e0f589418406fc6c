"""The compiled engine on the CPU (eager; the same decode step the GPU compiles and captures): logits against the
Hugging Face model, greedy tokens against the PyTorch engine, slots at different positions in one step, chunked
prefill, slot reuse, one-line errors."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, read_json, run_cli
from lmopt.engines import create_engine
from lmopt.errors import UserError
from lmopt.generate import SamplingParams, generate
from lmopt.models import load_model

MODELS = ["tiny", "llama-test", "gpt2-test"]


def prompts(n: int, length: int, seed: int = 0, vocab: int = 4096) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=length - 3 * i).tolist() for i in range(n)]


@pytest.fixture(scope="module", params=MODELS)
def engines(request):
    torch.set_num_threads(2)
    comp = create_engine("compiled", request.param, "fp32", num_slots=6)
    ref = create_engine("torch", request.param, "fp32")
    yield request.param, comp, ref
    comp.close()


def test_logits_match_hf(engines):
    name, comp, _ = engines
    hf = load_model(name)
    ids = prompts(1, 40, seed=3)[0]
    slot = comp.alloc_slot()
    try:
        got = comp.prefill_slot(slot, ids)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(got.row(0) - want).max() < 1e-4
        assert int(got.argmax()[0]) == int(np.argmax(want))
        toks = ids + [int(got.argmax()[0])]
        step = comp.decode_slots([slot], [toks[-1]])
        with torch.no_grad():
            want = hf(torch.tensor([toks])).logits[0, -1].numpy()
        assert np.abs(step.row(0) - want).max() < 1e-4
    finally:
        comp.free_slot(slot)


def test_greedy_tokens_equal_torch_engine(engines):
    _, comp, ref = engines
    ps = prompts(3, 24, seed=1)
    p = SamplingParams(max_new_tokens=32)
    a, b = generate(comp, ps, p), generate(ref, ps, p)
    assert a.tokens == b.tokens
    assert all(len(t) == 32 for t in a.tokens)
    assert comp.num_free_slots() == comp.num_slots      # generate() gave every slot back


def test_sampled_tokens_equal_torch_engine(engines):
    _, comp, ref = engines
    ps = prompts(2, 16, seed=2)
    p = [SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, seed=7), SamplingParams(max_new_tokens=12)]
    assert generate(comp, ps, p).tokens == generate(ref, ps, p).tokens


def test_stop_tokens_and_cancellation_like_torch_engine(engines):
    """generate()'s slot path ends rows the way the padded path does: stop token, cancellation, own max length."""
    _, comp, ref = engines
    ps = prompts(3, 18, seed=10)
    first = generate(ref, ps, SamplingParams(max_new_tokens=12)).tokens
    stop = first[0][4]                                        # row 0 stops at its 5th token
    p = [SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)), SamplingParams(max_new_tokens=12),
         SamplingParams(max_new_tokens=5)]

    def cancel_row1(row, tok):
        return row == 1 and tok == first[1][2]                 # row 1 cancelled at its 3rd token

    a, b = generate(comp, ps, p, on_token=cancel_row1), generate(ref, ps, p, on_token=cancel_row1)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    assert a.finish_reasons[0] == "stop" and a.finish_reasons[1] == "cancelled" and len(a.tokens[2]) == 5
    assert comp.num_free_slots() == comp.num_slots


def test_plain_engine_interface(engines):
    """prefill/decode/release with left padding, as the benchmark calls it."""
    from lmopt.generate import pad_batch

    _, comp, ref = engines
    ps = prompts(2, 12, seed=4)
    ids, mask, pos = pad_batch(ps, 0)
    la, sa = comp.prefill(ids, mask, pos)
    lb, sb = ref.prefill(ids, mask, pos)
    assert np.abs(la - lb).max() < 1e-4
    nxt = la.argmax(-1)[:, None]
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    da, _ = comp.decode(sa, nxt, mask, pos[:, -1:] + 1)
    db, _ = ref.decode(sb, nxt, mask, pos[:, -1:] + 1)
    assert np.abs(da - db).max() < 1e-4
    comp.release(sa)
    assert comp.num_free_slots() == comp.num_slots


def _alone(comp, prompt: list[int], n: int) -> list[int]:
    s = comp.alloc_slot()
    try:
        tok = int(comp.prefill_slot(s, prompt).argmax()[0])
        out = [tok]
        for _ in range(n - 1):
            tok = int(comp.decode_slots([s], [tok]).argmax()[0])
            out.append(tok)
        return out
    finally:
        comp.free_slot(s)


def test_rows_at_different_positions_in_one_step(engines):
    """Three requests of different lengths, started at different times, decoded together (out of slot order, one
    slot left idle inside the batch bucket) give each request's own tokens."""
    _, comp, _ = engines
    ps = prompts(3, 30, seed=5)
    n = 10
    alone = [_alone(comp, p, n) for p in ps]
    slots = [comp.alloc_slot() for _ in range(4)]          # slot 1 stays idle: a hole in the bucket
    use = [slots[0], slots[2], slots[3]]
    toks: list[list[int]] = [[], [], []]
    for r in range(3):
        toks[r].append(int(comp.prefill_slot(use[r], ps[r]).argmax()[0]))
    # request 0 runs two steps alone first, so the rows sit at different offsets from their prompts too
    for _ in range(2):
        toks[0].append(int(comp.decode_slots([use[0]], [toks[0][-1]]).argmax()[0]))
    while len(toks[2]) < n:
        rows = [r for r in (2, 0, 1) if len(toks[r]) < n]
        out = comp.decode_slots([use[r] for r in rows], [toks[r][-1] for r in rows]).argmax()
        for i, r in enumerate(rows):
            toks[r].append(int(out[i]))
    assert [comp.slot_length(use[r]) for r in range(3)] == [len(ps[r]) + n - 1 for r in range(3)]
    for s in slots:
        comp.free_slot(s)
    assert toks == alone


@pytest.mark.parametrize("name", ["llama-test", "gpt2-test"])
def test_sdpa_decode_attention_matches(name):
    """The fused-attention decode variant gives the logits of the three-kernel one, rows at different lengths."""
    a = create_engine("compiled", name, "fp32", num_slots=4)
    b = create_engine("compiled", name, "fp32", num_slots=4, decode_attention="sdpa")
    ps = prompts(3, 20, seed=9)
    for e in (a, b):
        for p in ps:
            e.prefill_slot(e.alloc_slot(), p)
    la, lb = a.decode_slots([2, 0], [7, 8]), b.decode_slots([2, 0], [7, 8])
    for i in range(2):
        assert np.abs(la.row(i) - lb.row(i)).max() < 1e-4


def test_graph_prefill_matches_eager_prefill(engines):
    """The fresh prefill the GPU replays as a CUDA graph (device-tensor inputs, rows padded to a bucket, a padding
    row of length 0) gives the eager prefill's logits and fills the same cache entries."""
    _, comp, _ = engines
    m = comp.model
    ps = prompts(2, 20, seed=5)
    a, b = comp.alloc_slot(), comp.alloc_slot()
    try:
        want = comp.prefill_slots([a], [ps[0]]).row(0)
        with torch.inference_mode():
            k_want = m.layers[0].k_cache[a, :, :len(ps[0])].clone()
            m.layers[0].k_cache[a].zero_()
        S = 32
        ids = torch.zeros((3, S), dtype=torch.long)
        ids[0, :len(ps[0])] = torch.tensor(ps[0])
        ids[1, :len(ps[1])] = torch.tensor(ps[1])
        with torch.inference_mode():
            logits, greedy = m.prefill_fresh(torch.tensor([a, b, 0]), ids, torch.tensor([len(ps[0]), len(ps[1]), 0]))
        assert np.abs(logits[0].float().numpy() - want).max() < 1e-4
        assert int(greedy[0]) == int(np.argmax(want))
        assert torch.allclose(m.layers[0].k_cache[a, :, :len(ps[0])], k_want, atol=1e-5)
        with torch.inference_mode():
            alone, _ = m.prefill_fresh(torch.tensor([b]), ids[1:2, :len(ps[1])], torch.tensor([len(ps[1])]))
        assert torch.allclose(logits[1], alone[0], atol=1e-4)
    finally:
        comp.free_slot(a)
        comp.free_slot(b)


def test_chunked_prefill_equals_one_shot(engines):
    _, comp, _ = engines
    p = prompts(1, 45, seed=6)[0]
    a, b = comp.alloc_slot(), comp.alloc_slot()
    try:
        one = comp.prefill_slot(a, p).row(0)
        for chunk in (p[:16], p[16:17], p[17:40], p[40:]):
            last = comp.prefill_slot(b, chunk)
        assert comp.slot_length(b) == len(p)
        assert np.abs(last.row(0) - one).max() < 1e-4
        ta = comp.decode_slots([a, b], [5, 5]).argmax()
        assert ta[0] == ta[1]
    finally:
        comp.free_slot(a)
        comp.free_slot(b)


def test_free_and_reuse(engines):
    _, comp, _ = engines
    ps = prompts(2, 20, seed=8)
    want = _alone(comp, ps[1], 6)
    s0, s1 = comp.alloc_slot(), comp.alloc_slot()
    assert (s0, s1) == (0, 1)
    comp.prefill_slot(s0, ps[0])
    comp.free_slot(s0)                          # cancelled: its stale cache must not leak into the next request
    assert comp.alloc_slot() == 0               # the lowest free id comes back first
    assert comp.slot_length(0) == 0
    got = [int(comp.prefill_slot(0, ps[1]).argmax()[0])]
    for _ in range(5):
        got.append(int(comp.decode_slots([0], [got[-1]]).argmax()[0]))
    comp.free_slot(0)
    comp.free_slot(s1)
    assert got == want
    with pytest.raises(ValueError):
        comp.free_slot(s1)                      # double free is a bug, not a user error


def test_errors():
    comp = create_engine("compiled", "llama-test", "fp32", num_slots=2, max_len=64)
    held = [comp.alloc_slot(), comp.alloc_slot()]
    assert comp.alloc_slot() is None and comp.num_free_slots() == 0
    with pytest.raises(UserError, match="slots"):
        comp.prefill(np.ones((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64), np.zeros((1, 4), np.int64))
    comp.free_slot(held[1])
    with pytest.raises(UserError, match="does not fit"):
        comp.prefill_slot(held[0], list(range(1, 66)))
    comp.prefill_slot(held[0], list(range(1, 60)))
    with pytest.raises(UserError, match="does not fit"):
        comp.prefill_slot(held[0], list(range(1, 10)))    # the cached 59 + 9 exceed 64 positions
    with pytest.raises(UserError, match="vocabulary"):
        comp.decode_slots([held[0]], [10**6])
    with pytest.raises(UserError, match="GPU"):
        create_engine("compiled", "llama-test", "fp16", device="cpu")
    with pytest.raises(UserError, match="int8"):
        create_engine("compiled", "llama-test", "int8")


def _small_hf(kind: str):
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "qwen2":            # q/k/v biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common)).eval()
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**common)).eval()
    # Llama 3 rope scaling, untied head
    rs = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
    return T.LlamaForCausalLM(T.LlamaConfig(**common, rope_scaling=rs, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3-rope-untied"])
def test_other_llama_family_configs_match_hf(kind):
    from lmopt.engines.static_decoder import StaticDecoder

    hf = _small_hf(kind)
    m = StaticDecoder.from_hf(hf, torch.float32, "cpu")
    m.allocate_cache(2, 200)
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = m.prefill([1], ids, [0], [150])[0]
        want = hf(ids).logits[0, -1]
        assert (got - want).abs().max() < 1e-4
        nxt = int(want.argmax())
        pos = torch.tensor([m.max_len, 150])                 # row 0 idle (scratch column), row 1 = slot 1
        step, greedy = m.decode(torch.tensor([0, nxt]), pos, 200)
        want = hf(torch.cat([ids, torch.tensor([[nxt]])], dim=1)).logits[0, -1]
    assert (step[1] - want).abs().max() < 1e-4
    assert int(greedy[1]) == int(want.argmax())


def test_unsupported_architecture():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lmopt.engines.static_decoder import StaticDecoder

    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=128))
    with pytest.raises(UserError, match="not supported by the compiled engine"):
        StaticDecoder.from_hf(hf, torch.float32, "cpu")


def test_gpu_check_script_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    run_cli("profile/compiled_engine_gpu.py", "--device", "cpu", "--model", "llama-test", "--precision", "fp32",
            "--batch-sizes", "1,4", "--short-prompt", "16", "--long-prompt", "64", "--max-new-tokens", "8",
            "--repeats", "1", "--profile-steps", "2", "--out", str(out))
    r = read_json(out)
    assert r["kind"] == "compiled-engine-check" and r["complete"]
    assert r["validation"]["ok"] and r["validation"]["greedy_agreement_vs_hf"] == 1.0
    assert [row["batch"] for row in r["decode"]] == [1, 4]
    assert all(row["ms_per_step"] > 0 and row["floor_ms"] > 0 and row["step_ms"]["count"] == 7
               and row["floor_step"]["kv_bytes"] > 0 for row in r["decode"])
    assert r["ttft"]["prompt_len"] == 64 and r["ttft"]["ms"] > 0
    bad = run_cli("profile/compiled_engine_gpu.py", "--device", "cpu", "--model", "llama-test", "--out",
                  str(tmp_path / "x.json"), check=False)
    assert_one_line_error(bad, "fp16", "GPU")
    assert not (tmp_path / "x.json").exists()
    bad = run_cli("profile/compiled_engine_gpu.py", "--device", "cpu", "--precision", "fp32", "--model", "llama-test",
                  "--batch-sizes", "1,128", "--out", str(tmp_path / "x.json"), check=False)
    assert_one_line_error(bad, "--num-slots")
    assert not (tmp_path / "x.json").exists()


# ---- the scheduler pipelined over the compiled engine: step k+1 is queued before step k's tokens are read ----------
@pytest.fixture(scope="module")
def tiny_compiled():
    torch.set_num_threads(2)
    comp = create_engine("compiled", "tiny", "fp32", num_slots=4)
    yield comp
    comp.close()


def test_decode_from_device_token_equals_host_token(tiny_compiled):
    comp = tiny_compiled
    ps = prompts(2, 12, seed=4)
    a, b = comp.alloc_slot(), comp.alloc_slot()
    try:
        first = comp.prefill_slots([a, b], ps).argmax()
        s1 = comp.decode_slots([a, b], first.tolist())
        host = s1.argmax()
        s2 = comp.decode_slots([a, b], [None, int(host[1])])    # a: its step-1 token on the device; b: on the host
        assert s1.argmax().tolist() == host.tolist()            # step 1's ids stay readable one step longer
        third = s2.argmax()
        comp.decode_slots([b], [int(third[1])])                 # a sits this step out ...
        with pytest.raises(ValueError, match="was not in the previous decode step"):
            comp.decode_slots([a], [None])                      # ... so its device token is gone
    finally:
        comp.free_slot(a)
        comp.free_slot(b)
    ref = generate(comp, ps, SamplingParams(max_new_tokens=3)).tokens
    assert ref == [[int(first[r]), int(host[r]), int(third[r])] for r in range(2)]


@pytest.mark.parametrize("pipeline", [True, False])
def test_scheduler_pipelined_tokens_equal_generate(tiny_compiled, pipeline):
    """Random arrivals, stop tokens that end requests while their next step is already queued, max tokens, a
    cancellation and a sampled request (pipelining pauses while it runs): every request gets the tokens it gets
    alone, and every slot comes back."""
    import threading
    import time

    from lmopt.scheduler import Scheduler

    comp = tiny_compiled
    rng = np.random.default_rng(8)
    ps = [rng.integers(1, 4096, int(n)).tolist() for n in rng.integers(2, 40, 9)]
    params = [SamplingParams(max_new_tokens=int(n)) for n in rng.integers(1, 24, 9)]
    for i in (1, 4):   # these two end on a stop token: their 3rd token when run without one
        third = generate(comp, [ps[i]], SamplingParams(max_new_tokens=3)).tokens[0][2]
        params[i] = SamplingParams(max_new_tokens=20, stop_token_ids=(third,))
    params[6] = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=3)
    alone = [generate(comp, [p], q) for p, q in zip(ps, params)]
    assert alone[1].finish_reasons[0] == alone[4].finish_reasons[0] == "stop"
    alone = [g.tokens[0] for g in alone]
    long = SamplingParams(max_new_tokens=200)
    fed = {"device": 0, "host": 0}
    decode_slots = comp.decode_slots

    def counting(slots, toks):
        for t in toks:
            fed["host" if t is not None else "device"] += 1
        return decode_slots(slots, toks)

    comp.decode_slots = counting
    with Scheduler(comp, max_queue=16, pipeline=pipeline) as s:
        assert s.pipeline is pipeline
        got = threading.Event()
        victim = s.submit(ps[0], long, on_event=lambda ev: got.set() if ev.token is not None else None)
        reqs = []
        for p, q in zip(ps, params):
            time.sleep(float(rng.uniform(0, 0.005)))
            reqs.append(s.submit(p, q))
        assert got.wait(60)
        victim.cancel()
        for r in reqs:
            r.result(timeout=120)
        victim.result(timeout=60)
        st = s.stats()
    del comp.decode_slots
    assert [r.tokens for r in reqs] == alone
    assert (fed["device"] > 10) if pipeline else fed["device"] == 0, fed
    assert victim.finish_reason == "cancelled" and len(victim.tokens) < 200
    assert st["slots_in_use"] == 0 and comp.num_free_slots() == comp.num_slots
    assert st["tokens"] == sum(len(r.tokens) for r in reqs) + len(victim.tokens)


def test_prefill_chunk_given_at_construction():
    """The served model builds the engine with its prefill chunk (serve/templates/model.py): the engine takes it as
    it is created, and declares it."""
    eng = create_engine("compiled", "tiny", "fp32", device="cpu", num_slots=2, max_len=128, max_prefill_chunk=64)
    try:
        assert eng.capabilities.max_prefill_chunk == 64 and eng.prefill_lens[-1] == 64
        assert tuple(eng.capabilities.batch_buckets) == (1, 2)
    finally:
        eng.close()


# ---- the fused decode step (lmopt.engines.kernels): on the CPU its torch reference runs, the same code path the GPU
# takes with Triton kernels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_fused_decode_gives_the_default_engine_tokens(name):
    """decode_kernels="fused" (eager on the CPU): the greedy tokens of today's step, logits of rows at different
    positions within rounding, and the device feed (token None) read inside the step."""
    torch.set_num_threads(2)
    a = create_engine("compiled", name, "fp32", num_slots=4)
    b = create_engine("compiled", name, "fp32", num_slots=4, decode_kernels="fused")
    assert b.info.precision == "fp32+fused"
    ps = prompts(3, 20, seed=11)
    p = SamplingParams(max_new_tokens=12)
    assert generate(a, ps, p).tokens == generate(b, ps, p).tokens
    for e in (a, b):
        for q in ps:
            e.prefill_slot(e.alloc_slot(), q)
    la, lb = a.decode_slots([2, 0], [7, 8]), b.decode_slots([2, 0], [7, 8])
    assert max(np.abs(la.row(i) - lb.row(i)).max() for i in range(2)) < 1e-4
    la, lb = a.decode_slots([2, 0], [None, 5]), b.decode_slots([2, 0], [None, 5])
    assert la.argmax().tolist() == lb.argmax().tolist()
    assert max(np.abs(la.row(i) - lb.row(i)).max() for i in range(2)) < 1e-4
    a.close(), b.close()


def test_fused_linear_reference_is_the_unfused_math():
    from lmopt.engines import kernels as K

    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 64, generator=g), torch.randn(3, 48, generator=g)
    w, nw = torch.randn(96, 64, generator=g), torch.randn(64, generator=g)
    h = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    gate, up = torch.nn.functional.linear(h, w).chunk(2, dim=-1)
    want = r + torch.nn.functional.silu(gate) * up
    got = K.linear(x, w, norm=K.Norm("rms", nw, None, 1e-5), act="silu_pair", residual=r, impl="torch")
    assert torch.allclose(got, want, atol=1e-5)
    am, last = torch.empty(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    logits = K.linear(x, w, argmax_out=am, last=last, impl="torch")
    assert am.tolist() == logits.argmax(-1).tolist() == last[:3].tolist()
    with pytest.raises(ValueError, match="no bias"):   # the GEMV kernels would add the gate half's bias only
        K.linear(x, w, bias=torch.zeros(96), act="silu_pair", impl="torch")


def test_int4_gemv_weights():
    """Int4Gemv packs two codes a byte (low nibble = even column) and dequantizes to within half a step."""
    from lmopt.engines.kernels import Int4Gemv

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    q = Int4Gemv(w, group_size=32)
    assert q.packed.shape == (8, 32) and q.packed.dtype == torch.uint8 and q.scale.shape == (8, 2)
    step = q.scale.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    codes = torch.stack([q.packed & 15, q.packed >> 4], dim=-1).reshape(8, 64).float()
    assert torch.allclose((codes - 8) * step + q.zero.repeat_interleave(32, dim=1), q.dequantize(), atol=1e-6)
    x = torch.randn(2, 64, generator=g)
    assert torch.allclose(q(x), x @ q.dequantize().T, atol=1e-5)
    with pytest.raises(UserError, match="group size"):
        Int4Gemv(w, group_size=24)


def test_fused_int4_engine_and_option_errors():
    torch.set_num_threads(2)
    e = create_engine("compiled", "tiny", "fp32", num_slots=2, decode_kernels="fused", weight_quant="int4g",
                      group_size=16)
    ref = create_engine("compiled", "tiny", "fp32", num_slots=2)
    assert e.weight_bytes() < 0.4 * ref.weight_bytes()
    ps = prompts(1, 16, seed=5)
    p = SamplingParams(max_new_tokens=8)
    a, b = generate(e, ps, p).tokens, generate(ref, ps, p).tokens
    assert len(a[0]) == 8 and a[0][0] == b[0][0]
    with pytest.raises(UserError, match="fused decode kernels"):
        create_engine("compiled", "tiny", "fp32", num_slots=2, weight_quant="int4g")
    with pytest.raises(UserError, match="decode kernels 'x'"):
        create_engine("compiled", "tiny", "fp32", num_slots=2, decode_kernels="x")
    with pytest.raises(UserError, match="fused decode kernels do not take"):
        create_engine("compiled", "tiny", "fp32", num_slots=2, decode_kernels="fused", weight_quant="int8")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (CPU torch wheel): the kernels run in the GPU script instead")
def test_triton_kernels_in_the_interpreter(tmp_path):
    """The Triton kernels themselves, run by Triton's CPU interpreter, against the torch reference."""
    code = (
        "import torch\nfrom lmopt.engines import kernels as K\n"
        "g=torch.Generator().manual_seed(0)\n"
        "x=torch.randn(3,64,generator=g);w=torch.randn(96,64,generator=g)/8;nw=torch.randn(64,generator=g)\n"
        "r=torch.randn(3,48,generator=g);n=K.Norm('rms',nw,None,1e-5)\n"
        "for wt in (w, K.Int4Gemv(w,32)):\n"
        "  a=K.linear(x,wt,None,n,'silu_pair',r,impl='triton');b=K.linear_ref(x,wt,None,n,'silu_pair',r)\n"
        "  assert (a-b).abs().max()<1e-4, (a-b).abs().max()\n"
        "qkv=torch.randn(2,8*16,generator=g)\n"
        "kc=torch.randn(2,2,41,16,generator=g);vc=torch.randn(2,2,41,16,generator=g)\n"
        "pos=torch.tensor([5,39]);t=torch.arange(40.)[:,None]*torch.rand(8,generator=g)\n"
        "cos,sin=torch.cat([t.cos()]*2,-1),torch.cat([t.sin()]*2,-1)\n"
        "k2,v2=kc.clone(),vc.clone()\n"
        "a=K.decode_attention(qkv,kc,vc,pos,cos,sin,40,4,2,16,40,impl='triton',chunk=16)\n"
        "b=K.decode_attention_ref(qkv,k2,v2,pos,cos,sin,40,4,2,16,40)\n"
        "assert (a-b).abs().max()<1e-4 and torch.equal(kc,k2)\nprint('ok')\n")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_decode_kernels_script_on_cpu(tmp_path):
    """profile/decode_kernels_gpu.py end to end on the CPU (torch reference kernels, no timing claims)."""
    out = tmp_path / "k.json"
    run_cli("profile/decode_kernels_gpu.py", "--device", "cpu", "--precision", "fp32", "--model", "llama-test",
            "--small-model", "", "--quality-model", "", "--cells", "kernels,engines", "--long-prompt", "40",
            "--short-prompt", "12", "--batch-sizes", "1,4", "--max-new-tokens", "4", "--repeats", "1",
            "--num-slots", "4", "--group-size", "16", "--out", str(out))
    r = read_json(out)
    assert r["kind"] == "decode-kernels-check" and r["complete"] and not r["errors"]
    assert all(row["rel_err"] < 1e-5 for row in r["kernels"]["gemv"] + r["kernels"]["attention"])
    assert r["validation"]["fused"]["ok"] and r["validation"]["fused"]["greedy_agreement_vs_hf"] == 1.0
    assert r["validation"]["fused_vs_inductor_decode"]["argmax_agreement"] == 1.0
    got = {(row["variant"], row["batch"], row["context"]) for row in r["decode"]}
    assert {("inductor", 1, "short"), ("fused", 1, "short"), ("fused", 4, "short"), ("fused", 1, "long"),
            ("fused-int4", 1, "short")} <= got
