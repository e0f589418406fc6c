"""Structured output in process: grammar masks applied to the logits where they are (host array and torch tensor
agree), logprobs of the unmasked logits, requests with and without a grammar in one batch of the scheduler (rows
without one keep their tokens), seeded sampling under a grammar, one-line errors for a bad schema, and the library
measurement's CLI. The served path (gateway, Triton, the openai client) is tested in test_openai.py."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import read_json, run_cli

pytest.importorskip("llguidance")
torch = pytest.importorskip("torch")

from lmopt.errors import UserError  # noqa: E402
from lmopt.generate import SamplingParams  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "inner": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}},
                                   "required": ["s"], "additionalProperties": False},
                         "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "maxItems": 4}},
          "required": ["kind", "n", "inner", "xs"], "additionalProperties": False}


def _bitmask(allowed_rows: list[list[int]], vocab: int) -> np.ndarray:
    bits = np.zeros((len(allowed_rows), (vocab + 31) // 32 * 32), np.uint8)
    for i, a in enumerate(allowed_rows):
        bits[i, a] = 1
    return np.packbits(bits, axis=-1, bitorder="little").view(np.int32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def test_mask_and_logprobs_on_host_and_device_agree():
    from lmopt.engines.slots import DeviceLogits, HostLogits

    rng = np.random.default_rng(0)
    raw = rng.standard_normal((4, 100)).astype(np.float32)
    allowed = [[3, 50, 99], [7]]
    mask = _bitmask(allowed, 100)
    host = HostLogits(raw.copy())
    # a padded device batch (rows 3, 0, 2 of 4) whose greedy ids came with the step, as a captured graph gives them
    dev = DeviceLogits(torch.from_numpy(raw.copy()), greedy=torch.from_numpy(raw.argmax(-1)), rows=[3, 0, 2])
    host.apply_mask([3, 0], mask)
    dev.apply_mask([0, 1], mask)
    want = [int(np.argmax(np.where(np.isin(np.arange(100), allowed[0]), raw[3], -np.inf))), 7,
            int(np.argmax(raw[2]))]
    assert host.argmax()[[3, 0, 2]].tolist() == want == dev.argmax().tolist()
    assert np.array_equal(host.row(2), raw[2]) and np.array_equal(dev.row(2), raw[2])   # no grammar: untouched
    assert np.isinf(host.row(3)).sum() == 97 and np.isinf(dev.row(0)).sum() == 97
    ref = _log_softmax(raw)
    for sl, rows in ((host, [3, 0]), (dev, [0, 1])):
        chosen, top_ids, top_lp = sl.logprobs(rows, [50, 7], 5)
        assert np.allclose(chosen, [ref[3, 50], ref[0, 7]], atol=1e-5)     # of the unmasked logits
        assert np.array_equal(top_ids[0], np.argsort(-ref[3])[:5]) and np.all(np.diff(top_lp, axis=1) <= 0)
        assert np.allclose(top_lp, np.sort(ref[[3, 0]], axis=1)[:, ::-1][:, :5], atol=1e-5)
    assert np.array_equal(raw, host.raw) and np.array_equal(raw, dev.raw.numpy())      # the engine's own logits


@pytest.fixture(scope="module")
def sched():
    from lmopt.engines import create_engine
    from lmopt.engines.slotted import create_slot_engine
    from lmopt.models import load_tokenizer
    from lmopt.scheduler import Scheduler

    tok = load_tokenizer("tiny")
    engine = create_engine("torch", "tiny", threads=2)
    s = Scheduler(create_slot_engine(engine, num_slots=6, max_prefill_chunk=64), tokenizer=tok)
    s.engine_ref, s.tok = engine, tok
    yield s
    s.close()
    engine.close()


def _events(req):
    evs = list(req.events(timeout=60))
    return [e for e in evs if not e.finished], evs[-1]


def test_requests_with_and_without_a_grammar_share_a_batch(sched):
    import jsonschema

    from lmopt.generate import generate
    from lmopt.grammar import json_schema_spec

    tok, eos = sched.tok, sched.tok.eos_token_id
    prompt = tok("def parse(x):")["input_ids"]
    spec = json_schema_spec(SCHEMA)
    plain = [SamplingParams(max_new_tokens=12, stop_token_ids=(-1,)),
             SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, stop_token_ids=(-1,))]
    constrained = [SamplingParams(max_new_tokens=120, stop_token_ids=(eos,), grammar=spec, logprobs=3),
                   SamplingParams(max_new_tokens=120, temperature=1.0, seed=5, stop_token_ids=(eos,), grammar=spec),
                   SamplingParams(max_new_tokens=120, temperature=1.0, seed=5, stop_token_ids=(eos,), grammar=spec)]
    reqs = [sched.submit(prompt, p) for p in constrained + plain]
    outs = [_events(r) for r in reqs]
    texts = ["".join(e.text for e in evs) + last.text for evs, last in outs]
    for (evs, last), text in zip(outs[:3], texts):
        assert last.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts[1] == texts[2]                          # seeded sampling under a grammar repeats
    # rows without a grammar give the tokens they give alone (generate() runs the same engine unbatched)
    for (evs, _), p in zip(outs[3:], plain):
        alone = generate(sched.engine_ref, [prompt], p).tokens[0]
        assert [e.token for e in evs] == alone
    # logprobs are of the model's distribution before the mask: the first token "{" as the engine scores it
    evs = outs[0][0]
    assert all(e.logprob is not None and len(e.logprob.top) == 3 for e in evs)
    x, mask, pos = (np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
    logits, state = sched.engine_ref.prefill(x, mask, pos)
    sched.engine_ref.release(state)
    ref = _log_softmax(np.asarray(logits, np.float32).reshape(-1))
    assert abs(evs[0].logprob.logprob - ref[evs[0].token]) <= 1e-3
    assert abs(evs[0].logprob.top[0][1] - ref.max()) <= 1e-3


def test_a_bad_schema_is_a_one_line_user_error(sched):
    from lmopt.generate import generate

    bad = json.dumps({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}})
    with pytest.raises(UserError) as e:
        sched.submit([1, 2, 3], SamplingParams(max_new_tokens=4, grammar=bad))
    assert "invalid JSON schema" in str(e.value) and "nope" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="scheduler"):
        generate(sched.engine_ref, [[1, 2]], SamplingParams(max_new_tokens=2, logprobs=1))
    with pytest.raises(UserError, match="between 0 and 20"):
        sched.submit([1, 2, 3], SamplingParams(max_new_tokens=4, logprobs=21))
    r = sched.submit([1, 2, 3], SamplingParams(max_new_tokens=2, stop_token_ids=(-1,)))   # still serving
    assert r.result(30).finish_reason == "length"


def test_grammar_choice_cli_measures_and_checks_a_valid_document(tmp_path):
    out = tmp_path / "choice.json"
    run_cli("profile/grammar_choice.py", "--big-vocab", "", "--libraries", "llguidance", "--repeats", "1",
            "--passes", "1", "--out", str(out))
    doc = read_json(out)
    (row,) = doc["summary"]
    assert doc["kind"] == "grammar_choice" and row["library"] == "llguidance" and row["valid_document_refused"] == 0
    assert row["mask_ms"] > 0 and row["compile_ms"] > 0


def test_gpu_overhead_benchmark_smoke_on_cpu(tmp_path):
    """profile/structured_gpu.py --smoke: the GPU benchmark's whole path on the CPU (figures not judged here)."""
    out = tmp_path / "structured.json"
    run_cli("profile/structured_gpu.py", "--smoke", "--out", str(out))
    doc = read_json(out)
    s = doc["summary"]
    assert doc["kind"] == "structured_overhead" and s["card"] == "cpu" and doc["versions"]["llguidance"]
    assert s["itl_ratio_1"] > 0 and s["tok_s_ratio_64"] > 0 and set(s["meets"]) == {"itl_ratio_1", "tok_s_ratio_64"}
    assert set(s["tok_s_64"]) == {"all-plain", "half-schema"} and s["itl_ms_1"]["schema"]["count"] > 0


def test_grammar_requests_join_a_pipelined_batch_on_the_device_fed_engine():
    """The compiled engine feeds greedy tokens on the device (pipelining): a grammar request arriving turns it off
    while it decodes (docs/structured_output.md); the plain requests keep exactly their tokens across the switch."""
    import jsonschema

    from lmopt.engines import create_engine
    from lmopt.generate import generate
    from lmopt.grammar import json_schema_spec
    from lmopt.models import load_tokenizer
    from lmopt.scheduler import Scheduler

    tok = load_tokenizer("tiny")
    eng = create_engine("compiled", "tiny", "fp32", num_slots=4, max_len=192)
    try:
        assert eng.capabilities.device_feed
        prompts = [tok(p)["input_ids"] for p in ("def f(x):", "import os\n", "class A:")]
        plain = SamplingParams(max_new_tokens=40, stop_token_ids=(-1,))
        alone = [generate(eng, [p], plain).tokens[0] for p in prompts[:2]]
        sched = Scheduler(eng, tokenizer=tok)
        try:
            assert sched.pipeline
            reqs = [sched.submit(p, plain) for p in prompts[:2]]
            deadline = time.time() + 60
            while sched.stats()["tokens"] < 10 and time.time() < deadline:
                time.sleep(0.001)
            g = sched.submit(prompts[2], SamplingParams(max_new_tokens=120, stop_token_ids=(tok.eos_token_id,),
                                                        grammar=json_schema_spec(SCHEMA), logprobs=1))
            evs, last = _events(g)
            assert last.finish_reason == "stop"
            jsonschema.validate(json.loads("".join(e.text for e in evs) + last.text), SCHEMA)
            assert [r.result(60).tokens for r in reqs] == alone
        finally:
            sched.close()
    finally:
        eng.close()
