"""The CUDA-graph engine's static-cache logic, run eagerly on the CPU (graphs=False): the same cache, mask and
position handling that the captured graph replays on a GPU, checked against the eager PyTorch engine."""
from __future__ import annotations

import numpy as np
import pytest



@pytest.fixture(scope="module", params=["tiny", "gpt2-test"])
def pair(request):
    from lmopt.data import builtin_text
    from lmopt.engines.cudagraph import CudaGraphEngine
    from lmopt.engines.torch_engine import TorchEngine
    from lmopt.models import load_tokenizer

    ids = load_tokenizer(request.param)(builtin_text("eval"))["input_ids"]
    static = CudaGraphEngine(request.param, "fp32", "cpu", graphs=False, max_new_tokens=24, cache_block=16)
    return TorchEngine(request.param), static, [ids[:20], ids[50:57], ids[200:213]]


def test_static_cache_matches_eager_on_a_padded_batch(pair):
    from lmopt.generate import SamplingParams, generate, pad_batch

    eager, static, prompts = pair
    p = SamplingParams(max_new_tokens=24)
    assert generate(static, prompts, p).tokens == generate(eager, prompts, p).tokens
    # logits, not only tokens: prefill and a few decode steps of the left-padded batch
    ids, mask, pos = pad_batch(prompts, 0)
    le, se = eager.prefill(ids, mask, pos), static.prefill(ids, mask, pos)
    diffs = [np.abs(np.asarray(se[0]) - le[0]).max()]
    nxt = le[0].argmax(-1)
    state_e, state_s = le[1], se[1]
    for _ in range(4):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        le = eager.decode(state_e, nxt[:, None], mask, pos)
        se = static.decode(state_s, nxt[:, None], mask, pos)
        state_e, state_s = le[1], se[1]
        diffs.append(np.abs(np.asarray(se[0]) - le[0]).max())
        nxt = le[0].argmax(-1)
    static.release(state_s)
    assert max(diffs) < 1e-4, diffs


def test_each_prompt_alone_gives_the_batch_tokens(pair):
    from lmopt.generate import SamplingParams, generate

    _, static, prompts = pair
    p = SamplingParams(max_new_tokens=12)
    batch = generate(static, prompts, p).tokens
    assert [generate(static, [x], p).tokens[0] for x in prompts] == batch


def test_full_cache_and_busy_buffers_are_refused(pair):
    from lmopt.errors import UserError
    from lmopt.generate import SamplingParams, generate, pad_batch

    _, static, prompts = pair
    ids, mask, pos = pad_batch(prompts[:1], 0)
    _, state = static.prefill(ids, mask, pos)
    with pytest.raises(UserError, match="release it first"):
        static.prefill(ids, mask, pos)
    static.release(state)
    with pytest.raises(UserError, match="larger max_new_tokens"):
        generate(static, prompts[:1], SamplingParams(max_new_tokens=200))


def test_cudagraph_needs_cuda_and_half_precision():
    from lmopt.engines import create_engine
    from lmopt.errors import UserError

    with pytest.raises(UserError, match="needs an NVIDIA GPU.*--device cuda"):
        create_engine("cudagraph", "tiny", precision="fp16", device="cpu")
    with pytest.raises(UserError, match="fp16 or bf16"):
        create_engine("cudagraph", "tiny", precision="int8", device="cuda")
