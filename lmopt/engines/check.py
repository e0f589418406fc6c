"""Checks and timings of one slot engine against its Hugging Face model, shared by the GPU check scripts
(profile/compiled_engine_gpu.py, profile/decode_kernels_gpu.py): the settings both refuse (`cuda_device`,
`batch_list`), last-token logits and greedy tokens against HF (`validate`), teacher-forced perplexity over
data/eval.txt (`accuracy`), decode ms per step with a host sync every step (`time_decode`), time to first token
(`time_ttft`), the GPU's busy share of host-synced steps (`profile_synced_steps`, `busy_us`). `s` is the calling
script's settings (fields: model, device, precision, short_prompt, max_new_tokens, repeats, parity_tokens,
eval_windows, eval_len)."""
from __future__ import annotations

import statistics
import time

from .. import results as R
from ..errors import UserError
from ..log import get_logger

log = get_logger("lmopt.engines.check")

# relative logits tolerance per precision (of the largest |logit|), plus an absolute floor
_TOL = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 1e-2), "bf16": (5e-2, 2e-2)}


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}     # --precision -> load_model's dtype


def cuda_device(device: str, precision: str) -> bool:
    """Whether `device` is a CUDA device, after the checks of every GPU script: torch installed, a GPU visible when
    one is asked for, FP16/BF16 only on a GPU."""
    try:
        import torch
    except ImportError:
        raise UserError("torch is not installed — pip install torch") from None
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError("no CUDA GPU visible to torch — run on a GPU machine or pass --device cpu --precision fp32")
    if precision != "fp32" and not cuda:
        raise UserError(f"{precision} needs a GPU — pass --precision fp32 with --device cpu")
    return cuda


def batch_list(text: str) -> list[int]:
    """--batch-sizes "1,8,64" as integers."""
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes {text!r} is not a comma-separated list of integers") from None


def gpu_info() -> dict:
    import subprocess

    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "torch_cuda": torch.version.cuda}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20).stdout.strip()
        info["driver"] = q
    except Exception as e:  # nvidia-smi missing: keep going, say so
        info["driver"] = f"unknown ({type(e).__name__})"
    return info


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(1, min(vocab, 32000), size=(n, length)).tolist()


def validate(engine, hf, s) -> dict:
    """Engine vs HF model: last-token logits after a prompt, and greedy tokens."""
    import numpy as np
    import torch

    from lmopt.generate import SamplingParams, generate

    prompt = make_prompts(1, s.short_prompt, engine.info.vocab_size, seed=1)[0]
    slot = engine.alloc_slot()
    try:
        got = engine.prefill_slot(slot, prompt).row(0)
    finally:
        engine.free_slot(slot)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=s.device)
        want = hf(input_ids=ids).logits[0, -1].float().cpu().numpy()
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.parity_tokens,
                          min_new_tokens=s.parity_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_tokens = ref[0, len(prompt):].tolist()
    ours = generate(engine, [prompt], SamplingParams(max_new_tokens=s.parity_tokens)).tokens[0]
    diff = float(np.abs(got - want).max())
    rtol, atol = _TOL[s.precision]
    tol = atol + rtol * float(np.abs(want).max())
    agree = sum(a == b for a, b in zip(ref_tokens, ours)) / max(1, len(ref_tokens))
    first_diverge = next((i for i, (a, b) in enumerate(zip(ref_tokens, ours)) if a != b), None)
    res = {"prompt_len": len(prompt), "max_abs_logit_diff": diff, "max_abs_logit": float(np.abs(want).max()),
           "tolerance": tol, "top1_equal": int(np.argmax(got)) == int(np.argmax(want)),
           "greedy_agreement_vs_hf": agree, "first_divergence": first_diverge, "tokens_hf": ref_tokens,
           "tokens_engine": ours, "ok": diff <= tol}
    log.info("[%s] logits vs HF: max |diff| %.3g (tolerance %.3g); greedy agreement %.2f over %d tokens",
             "ok" if res["ok"] else "FAIL", diff, tol, agree, len(ref_tokens))
    return res


def accuracy(engine, hf, s) -> dict:
    """Teacher-forced decode over held-out windows: the engine's logits at every position against the HF model's."""
    import torch

    from lmopt.data import builtin_text, token_windows
    from lmopt.models import load_tokenizer

    n, L = min(s.eval_windows, engine.num_slots), s.eval_len
    try:
        tok = load_tokenizer(s.model)
        windows = token_windows(tok, builtin_text("eval"), n, L + 1, "data/eval.txt")
    except UserError:
        windows = make_prompts(n, L + 1, engine.info.vocab_size, seed=4)
    windows = [w for w in windows if max(w) < engine.info.vocab_size]
    ids = torch.tensor(windows, device=s.device)
    with torch.inference_mode():
        ref = hf(input_ids=ids[:, :L]).logits.float()                       # [n, L, V]
    slots = [engine.alloc_slot() for _ in windows]
    got = []
    try:
        first = engine.prefill_slots(slots, [w[:1] for w in windows])
        got.append(first.logits.float()[:len(slots)])
        for t in range(1, L):
            out = engine.decode_slots(slots, [w[t] for w in windows])
            got.append(out.logits[out.rows].float())
    finally:
        for sl in slots:
            engine.free_slot(sl)
    got = torch.stack(got, dim=1)                                          # [n, L, V]
    tgt = ids[:, 1:L + 1]

    def ppl(logits):
        return float(torch.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 tgt.reshape(-1))))

    res = {"windows": len(windows), "tokens": len(windows) * L, "ppl_engine": ppl(got), "ppl_hf": ppl(ref),
           "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
           "max_abs_logit_diff": float((got - ref).abs().max())}
    res["ppl_delta_pct"] = (res["ppl_engine"] / res["ppl_hf"] - 1) * 100
    log.info("accuracy: ppl %.3f vs HF %.3f (%+.2f%%), top-1 agreement %.4f over %d tokens", res["ppl_engine"],
             res["ppl_hf"], res["ppl_delta_pct"], res["top1_agreement"], res["tokens"])
    return res


def time_decode(engine, batch: int, s, floor: dict) -> dict:
    t0 = time.perf_counter()
    engine.capture([batch], s.short_prompt + s.max_new_tokens)
    capture_s = time.perf_counter() - t0
    prompts = make_prompts(batch, s.short_prompt, engine.info.vocab_size, seed=2)
    medians, raw = [], []
    for rep in range(s.repeats + 1):                  # rep 0 warms up
        slots = [engine.alloc_slot() for _ in range(batch)]
        try:
            toks = engine.prefill_slots(slots, prompts).argmax()
            engine.synchronize()
            steps = []
            for _ in range(s.max_new_tokens - 1):
                ts = time.perf_counter()
                toks = engine.decode_slots(slots, toks.tolist()).argmax()   # host sync, as a server streams
                steps.append(time.perf_counter() - ts)
        finally:
            for sl in slots:
                engine.free_slot(sl)
        if rep:
            medians.append(statistics.median(steps))
            raw.append(steps)
    ms = statistics.median(medians) * 1e3
    ctx = s.short_prompt + s.max_new_tokens // 2
    m = engine.model
    shape = {"num_layers": m.cfg["n_layers"], "num_kv_heads": m.cfg["n_kv"], "head_dim": m.cfg["head_dim"]}
    kv_bytes = R.kv_bytes(shape, batch, ctx, m.emb.element_size())
    row = {"batch": batch, "prompt_len": s.short_prompt, "new_tokens": s.max_new_tokens, "ms_per_step": ms,
           "tokens_per_s": batch * 1e3 / ms, "floor_ms": floor["floor_ms"],
           "ratio_to_floor": ms / floor["floor_ms"], "kv_bytes_read_mean": kv_bytes,
           "floor_with_kv_ms": (floor["weight_bytes"] + kv_bytes) / floor["read_bytes_per_ms"],
           # the project's common floor (lmopt.results): weights + KV at the mean context / read bandwidth
           "floor_step": R.step_floor(floor["weight_bytes"], shape, batch, ctx, m.emb.element_size(),
                                      floor["read_gbs"]),
           "step_ms": R.stats([x for st in raw for x in st], scale=1e3),
           "capture_s": capture_s, "raw_step_s": raw}
    log.info("batch %-3d decode %.3f ms/step, %.0f tokens/s, %.2fx the %.3f ms floor (graph ready in %.1f s)",
             batch, ms, row["tokens_per_s"], row["ratio_to_floor"], floor["floor_ms"], capture_s)
    return row


def time_ttft(engine, length: int, s) -> dict:
    prompt = make_prompts(1, length, engine.info.vocab_size, seed=3)[0]
    times = []
    for rep in range(s.repeats + 1):
        engine.synchronize()
        t = time.perf_counter()
        slot = engine.alloc_slot()
        try:
            int(engine.prefill_slot(slot, prompt).argmax()[0])
            if rep:
                times.append(time.perf_counter() - t)
        finally:
            engine.free_slot(slot)
    ms = statistics.median(times) * 1e3
    log.info("TTFT %d-token prompt: %.2f ms", length, ms)
    return {"prompt_len": length, "ms": ms, "raw_s": times}


def profile_synced_steps(engine, prompt_len: int, steps: int) -> tuple[list, list, float]:
    """`steps` batch-1 decode steps under the PyTorch profiler (CUPTI: it sees the kernels a replayed CUDA graph
    launches), each synced with the host (its token read back, as a server streams), after 3 unprofiled ones:
    (device events, the kernels among them, wall seconds per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prompt = make_prompts(1, prompt_len, engine.info.vocab_size, seed=4)
    slot = engine.alloc_slot()
    try:
        toks = engine.prefill_slots([slot], prompt).argmax()
        for _ in range(3):
            toks = engine.decode_slots([slot], toks.tolist()).argmax()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.cuda else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                toks = engine.decode_slots([slot], toks.tolist()).argmax()
            wall = (time.perf_counter() - t) / steps
    finally:
        engine.free_slot(slot)
    dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return dev, [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))], wall


def busy_us(events) -> float:
    """Microseconds covered by the union of the events' intervals (the GPU's busy time)."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in events):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy
