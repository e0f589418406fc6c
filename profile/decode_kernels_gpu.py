"""Check and time the fused decode kernels (lmopt.engines.kernels, the compiled engine's decode_kernels="fused")
against today's torch.compile'd step, in one run: kernels against their torch reference, engines against the
Hugging Face model, decode speed, and one profiled step of each.

    python profile/decode_kernels_gpu.py --out $OUT/decode-kernels.json            # on a GPU, ~4 min
    python profile/decode_kernels_gpu.py --device cpu --precision fp32 --model llama-test --small-model gpt2-test \
        --quality-model "" --long-prompt 48 --short-prompt 16 --batch-sizes 1,4 --max-new-tokens 6 --repeats 1 \
        --num-slots 4 --group-size 16                  # CPU smoke run (the torch reference of every kernel)

Reads:  the models (presets with seeded random weights, the built-in model for the INT4 accuracy cell)
Writes: --out (default artifacts/<model>/profile/decode-kernels-<device>.json): machine, GPU, versions, settings and
        the cells below; written after every cell (complete=false until the end); a table printed last.

Cells:
    kernels   per weight shape of --model at 1 and 8 rows: the fused Triton GEMV (with the prologue/epilogue the step
              uses) against the torch reference on float32 copies (relative error), the bare GEMV against cuBLAS
              (F.linear) and, for INT4, against PyTorch's tinygemm (median ms, GB/s), and the choice the engine
              keeps per shape; the decode attention kernel against the reference at short and long contexts
    engines   --model: today's step (inductor) and the fused step (fp16, then INT4 weights): validation against
              HF (prefill logits, greedy tokens) and the fused decode logits against today's; ms per decode step
              with a host sync every step (as a server streams; median of --repeats), at --batch-sizes and after a
              --long-prompt prompt; ms per step when the next step is queued before the last one's ids are read
              (the device-fed path the scheduler uses); GPU time per step from back-to-back graph replays; the
              fused step with every GEMM forced through cuBLAS (the fusions as separate launches)
    small     --small-model (GPT-2 shape): today's step and the fused one at batch 1
    quality   --quality-model (the built-in model, real weights): fused fp16 and fused INT4 (int4g) against HF,
              teacher-forced perplexity over data/eval.txt windows
    profile   one batch-1 step of each --model engine under the PyTorch profiler: kernels and copies per step
              inside the captured graph (graph replays alone), per-kernel name/count/us, and the GPU's idle share
              of a host-synced step
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import statistics
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lmopt import cli
from lmopt import results as R
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("decode_kernels_gpu")


@dataclass
class KernelSettings:
    model: str = "llama-1b"
    small_model: str = "gpt2-124m"          # the GPT-2 shape cell ("" = skip)
    quality_model: str = "tiny"             # INT4 accuracy cell on real weights ("" = skip)
    device: str = "cuda"
    precision: str = "fp16"                 # fp16 on a GPU, fp32 on the CPU (the reference path)
    batch_sizes: str = "1,8,64"
    short_prompt: int = 128
    long_prompt: int = 2048                 # the long-context decode cell (0 = skip)
    max_new_tokens: int = 64
    repeats: int = 3
    num_slots: int = 64
    baseline_long: bool = False             # also time today's step after the long prompt (one more compile)
    profile_steps: int = 20
    group_size: int = 128                   # INT4 group size of --model
    quality_groups: str = "32,16"           # INT4 group sizes of the quality cell (the built-in model: hidden 192)
    cells: str = "kernels,engines,small,quality,profile"
    out: str = ""


@dataclass
class _Check:
    """The fields lmopt.engines.check reads (validation, accuracy, decode timing) for one model."""
    model: str
    device: str
    precision: str
    short_prompt: int
    max_new_tokens: int
    repeats: int
    parity_tokens: int = 32
    eval_windows: int = 8
    eval_len: int = 128


def _check_settings(s: KernelSettings) -> _Check:
    return _Check(s.model, s.device, s.precision, s.short_prompt, s.max_new_tokens, s.repeats)


# ---------------------------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _poison(dev: str) -> None:
    """Fill freed memory with NaN, so an output element a kernel never wrote shows up in the error."""
    import torch

    if dev.startswith("cuda"):
        torch.full((64 << 20,), float("nan"), dtype=torch.float16, device=dev)


def kernel_cell(s: KernelSettings, cfg: dict) -> dict:
    import torch

    from lmopt.engines import kernels as K
    from lmopt.engines.weight_quant import Int4Weight

    dev = s.device
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[s.precision]
    C, H, KV, D, I, V = cfg["C"], cfg["H"], cfg["KV"], cfg["D"], cfg["I"], cfg["V"]
    cuda = dev.startswith("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

    shapes = [("qkv", (H + 2 * KV) * D, C, "norm"), ("o", C, H * D, "res"), ("gate_up", 2 * I, C, "norm+swiglu"),
              ("down", C, I, "res"), ("head", V, C, "norm+argmax")]
    rows = []
    for name, n, k, fuse in shapes:
        w = rnd(n, k, scale=k ** -0.5)
        nw = 1 + rnd(k, scale=0.1)
        for int4 in (False, True):
            if int4 and (k % s.group_size or not (cuda or K.INTERPRET)):
                continue
            wq = K.Int4Gemv(w, s.group_size) if int4 else w
            wref = wq.dequantize(torch.float32) if int4 else w.float()
            for m in (1, 8):
                x = rnd(m, k)
                norm = K.Norm("rms", nw, None, 1e-5) if "norm" in fuse else None
                act = "silu_pair" if "swiglu" in fuse else None
                res = rnd(m, n // 2 if act else n) if fuse == "res" else None
                am = torch.empty(m, dtype=torch.long, device=dev) if "argmax" in fuse else None
                if cuda:   # the bare GEMV first: it tunes the shape's launch configuration the fused call reuses
                    cmp = K.compare_gemm(x, wq)
                _poison(dev)
                got = K.linear(x, wq, None, norm, act, res, argmax_out=am, impl="triton" if cuda or K.INTERPRET
                               else "torch")
                nf = None if norm is None else K.Norm("rms", nw.float(), None, 1e-5)
                want = K.linear_ref(x.float(), wref, None, nf, act, None if res is None else res.float())
                row = {"weight": name, "n": n, "k": k, "fused": fuse, "int4": int4, "rows": m,
                       "rel_err": _rel(got, want), "nan": bool(torch.isnan(got).any())}
                if am is not None:
                    row["argmax_equal"] = bool((am == got.argmax(-1)).all())
                if cuda:
                    nbytes = K.gemv_bytes(n, k, int4, s.group_size, x.element_size())
                    row.update(triton_ms=cmp["triton_ms"], triton_gbs=nbytes / cmp["triton_ms"] / 1e6,
                               weight_copies=cmp["copies"])
                    if int4:
                        tg = Int4Weight(w.to(torch.bfloat16), s.group_size)
                        xb = x.to(torch.bfloat16)
                        tgs = [tg] + [Int4Weight(w.to(torch.bfloat16), s.group_size)
                                      for _ in range(cmp["copies"] - 1)]
                        row["tinygemm_ms"] = K._bench(lambda j: tgs[j % len(tgs)](xb))
                        row["tinygemm_gbs"] = tg.nbytes() / row["tinygemm_ms"] / 1e6
                        del tgs
                    else:
                        row.update(cublas_ms=cmp["cublas_ms"], cublas_gbs=nbytes / cmp["cublas_ms"] / 1e6,
                                   faster=cmp["best"])
                rows.append(row)
                log.info("gemv %-8s %5dx%-5d int4=%d M=%d rel err %.2e %s", name, n, k, int4, m, row["rel_err"],
                         " ".join(f"{k_}={v:.4f}" for k_, v in row.items() if k_.endswith("_ms")))
    att = []
    for L, B in ((256, 1), (2176, 1), (256, 8)):
        L = min(L, cfg["max_len"])
        S = 8
        qkv = rnd(B, (H + 2 * KV) * D)
        kc, vc = rnd(S, KV, L + 1, D), rnd(S, KV, L + 1, D)
        pos = torch.randint(0, L, (B,), generator=g, device=dev)
        pos[0] = L - 1
        t = torch.arange(L, device=dev).float()[:, None] * torch.rand(D // 2, device=dev, generator=g)[None]
        cos, sin = torch.cat([t.cos(), t.cos()], -1).to(dt), torch.cat([t.sin(), t.sin()], -1).to(dt)
        kr, vr = kc.float(), vc.float()
        want = K.decode_attention_ref(qkv.float(), kr, vr, pos, cos.float(), sin.float(), L, H, KV, D, L)
        kt, vt = kc.clone(), vc.clone()
        _poison(dev)
        got = K.decode_attention(qkv, kt, vt, pos, cos, sin, L, H, KV, D, L,
                                 impl="triton" if cuda or K.INTERPRET else "torch")
        row = {"kv_len": L, "rows": B, "rel_err": _rel(got, want), "kv_write_rel_err": _rel(kt, kr),
               "nan": bool(torch.isnan(got).any()), "chunk": K.attention_chunk(L, B * KV) if K.HAS_TRITON else None}
        if cuda:
            row["triton_ms"] = K._bench(lambda j: K.decode_attention(qkv, kt, vt, pos, cos, sin, L, H, KV, D, L))
            row["reference_ms"] = K._bench(lambda j: K.decode_attention_ref(qkv, kt, vt, pos, cos, sin, L, H, KV, D,
                                                                            L))
            row["kv_bytes"] = 2 * B * KV * L * D * qkv.element_size()
            row["triton_gbs"] = row["kv_bytes"] / row["triton_ms"] / 1e6
        att.append(row)
        log.info("attention L=%d B=%d rel err %.2e %s", L, B, row["rel_err"],
                 f"{row.get('triton_ms', 0):.4f} ms vs reference {row.get('reference_ms', 0):.4f}")
    return {"gemv": rows, "attention": att}


# ---------------------------------------------------------------------------------------------------------------
def time_pipelined(engine, batch: int, s: KernelSettings) -> float:
    """ms per step when step k+1 is queued (its tokens fed from the device) before step k's ids are read."""
    from lmopt.engines.check import make_prompts

    prompts = make_prompts(batch, s.short_prompt, engine.info.vocab_size, seed=2)
    meds = []
    for rep in range(s.repeats + 1):
        slots = [engine.alloc_slot() for _ in range(batch)]
        try:
            toks = engine.prefill_slots(slots, prompts).argmax()
            out = engine.decode_slots(slots, toks.tolist())
            engine.synchronize()
            t = time.perf_counter()
            n = s.max_new_tokens - 2
            for _ in range(n):
                nxt = engine.decode_slots(slots, [None] * batch)
                out.argmax()                                  # the previous step's ids, as the scheduler reads them
                out = nxt
            out.argmax()
            if rep:
                meds.append((time.perf_counter() - t) / n)
        finally:
            for sl in slots:
                engine.free_slot(sl)
    return statistics.median(meds) * 1e3


def time_replay(engine, batch: int, kv_len: int, n: int = 200) -> float:
    """GPU ms per step: the captured graph replayed back to back (no host work between), CUDA events."""
    import torch

    L = engine.kv_buckets[[i for i, b in enumerate(engine.kv_buckets) if b >= kv_len][0]]
    B = engine.batch_buckets[[i for i, b in enumerate(engine.batch_buckets) if b >= batch][0]]
    with torch.inference_mode():
        g, _ = engine._graph(B, L)
        for _ in range(10):
            g.replay()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(n):
            g.replay()
        b.record()
        b.synchronize()
    return a.elapsed_time(b) / n


def profile_step(engine, s: KernelSettings, step_ms: float | None) -> dict:
    """Kernels and copies inside one captured batch-1 step (graph replays alone) with the per-kernel table, and the
    GPU's idle share of a host-synced step (decode_slots with a token read back every step)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from lmopt.engines.check import busy_us, profile_synced_steps

    n = s.profile_steps
    L = engine.kv_buckets[0]
    with torch.inference_mode():
        g, _ = engine._graph(1, L)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                g.replay()
            torch.cuda.synchronize()
    dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = [e for e in dev if e.name.startswith(("Memcpy", "Memset"))]
    kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
    table: dict[str, list[float]] = {}
    for e in kernels:
        table.setdefault(e.name[:160], []).append(e.time_range.end - e.time_range.start)
    per_kernel = sorted(({"name": k, "count": len(v) / n, "us": sum(v) / n} for k, v in table.items()),
                        key=lambda r: -r["us"])
    res = {"steps": n, "kernels_per_step": len(kernels) / n, "copies_in_graph_per_step": len(copies) / n,
           "kernel_us_per_step": sum(r["us"] for r in per_kernel), "per_kernel": per_kernel}
    # the host-synced step: busy share of the wall time
    dev, ker, wall = profile_synced_steps(engine, s.short_prompt, n)
    busy = busy_us(ker)
    busy_ms = busy / 1e3 / n
    ref = step_ms or wall * 1e3
    res.update(step_kernels_per_step=len(ker) / n, step_copies_per_step=(len(dev) - len(ker)) / n,
               gpu_busy_ms_per_step=busy_ms, step_ms_unprofiled=step_ms, step_ms_profiled=wall * 1e3,
               gpu_idle_share=max(0.0, 1 - busy_ms / ref))
    log.info("profile: %.0f kernels and %.0f copies in the graph; GPU busy %.3f of %.3f ms (idle %.0f%%)",
             res["kernels_per_step"], res["copies_in_graph_per_step"], busy_ms, ref, 100 * res["gpu_idle_share"])
    return res


def decode_logits_vs(a, b, s: KernelSettings, steps: int = 8) -> dict:
    """The same decode steps (prompt, then a fixed token each step) through two engines: max |logit diff| and
    greedy agreement per step."""
    import numpy as np

    from lmopt.engines.check import make_prompts

    prompt = make_prompts(1, s.short_prompt, a.info.vocab_size, seed=7)[0]
    toks = make_prompts(1, steps, a.info.vocab_size, seed=8)[0]
    sa, sb = a.alloc_slot(), b.alloc_slot()
    diffs, agree, mx = [], 0, 0.0
    try:
        a.prefill_slot(sa, prompt), b.prefill_slot(sb, prompt)
        for t in toks:
            ra, rb = a.decode_slots([sa], [t]).row(0), b.decode_slots([sb], [t]).row(0)
            diffs.append(float(np.abs(ra - rb).max()))
            mx = max(mx, float(np.abs(ra).max()))
            agree += int(np.argmax(ra) == np.argmax(rb))
    finally:
        a.free_slot(sa), b.free_slot(sb)
    return {"steps": steps, "max_abs_logit_diff": max(diffs), "max_abs_logit": mx, "argmax_agreement": agree / steps}


# ---------------------------------------------------------------------------------------------------------------
def _engine(model, s: KernelSettings, hf, max_len: int, **kw):
    from lmopt.engines.compiled import CompiledEngine

    e = CompiledEngine(model, s.precision, s.device, num_slots=s.num_slots, max_len=max_len, hf_model=hf,
                       decode_attention="sdpa", **kw)
    e.prefill_lens = [n for n in e.prefill_lens if n <= max(16, s.short_prompt)][-1:] or e.prefill_lens[:1]
    return e


def engine_rows(name: str, e, s: KernelSettings, floor_bw: float, batches, long: bool, cuda: bool) -> list[dict]:
    from lmopt.engines.check import time_decode

    cs = _check_settings(s)
    wb = e.weight_bytes()
    floor = {"weight_bytes": wb, "read_gbs": floor_bw, "read_bytes_per_ms": floor_bw * 1e6,
             "floor_ms": wb / (floor_bw * 1e6)}
    rows = []
    for b in batches:
        if b > e.num_slots:
            continue
        r = time_decode(e, b, cs, floor)
        r.pop("raw_step_s", None)
        r.update(variant=name, context="short")
        if cuda:
            r["replay_ms"] = time_replay(e, b, s.short_prompt + s.max_new_tokens)
            if b == 1:
                r["pipelined_ms"] = time_pipelined(e, b, s)
        rows.append(r)
        log.info("%-14s batch %-3d %.3f ms/step (replay %s, pipelined %s)", name, b, r["ms_per_step"],
                 r.get("replay_ms"), r.get("pipelined_ms"))
    if long and s.long_prompt and s.long_prompt + s.max_new_tokens < e.max_len:
        r = time_decode(e, 1, replace(cs, short_prompt=s.long_prompt), floor)
        r.pop("raw_step_s", None)
        r.update(variant=name, context="long")
        if cuda:
            r["replay_ms"] = time_replay(e, 1, s.long_prompt + s.max_new_tokens)
        rows.append(r)
        log.info("%-14s batch 1 after %d tokens: %.3f ms/step", name, s.long_prompt, r["ms_per_step"])
    return rows


def run_kernels(*, settings: KernelSettings) -> Path:
    s = settings
    from lmopt.engines.check import DTYPES, accuracy, batch_list, cuda_device, gpu_info, validate

    cuda = cuda_device(s.device, s.precision)
    import torch

    from lmopt.engines import kernels as K
    from lmopt.models import load_model
    from lmopt.paths import stage_dir

    cells = {c.strip() for c in s.cells.split(",") if c.strip()}
    unknown = cells - {"kernels", "engines", "small", "quality", "profile"}
    if unknown:
        raise UserError(f"--cells {','.join(sorted(unknown))} unknown — use kernels,engines,small,quality,profile")
    batches = batch_list(s.batch_sizes)
    out = Path(s.out) if s.out else stage_dir("artifacts", s.model, "profile", "") / \
        f"decode-kernels-{'cuda' if cuda else 'cpu'}.json"
    t0 = time.perf_counter()
    dtype = DTYPES[s.precision]
    probe = R.read_bandwidth_gbs(s.device, nbytes=(1 << 30) if cuda else (64 << 20), reps=20 if cuda else 3)
    bw = probe["gbs"]
    doc: dict = R.envelope("decode-kernels-check", settings=asdict(s),
                           versions=R.versions("torch", "transformers", "numpy", "triton"),
                           gpu=gpu_info() if cuda else None, triton_kernels=K.HAS_TRITON and cuda,
                           bandwidth={"read_gbs": bw, "copy_gbs": R.copy_bandwidth_gbs(
                               s.device, nbytes=(1 << 30) if cuda else (64 << 20))},
                           complete=False, errors={})

    def save():
        doc["elapsed_s"] = time.perf_counter() - t0
        R.write_json(out, doc)

    def cell(name, fn):
        try:
            return fn()
        except Exception as e:   # one cell failing still leaves the others' figures; the error is recorded
            doc["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
            log.error("cell %s failed: %s", name, traceback.format_exc()[-2000:])
            return None
        finally:
            save()

    hf = load_model(s.model, dtype=dtype, device=s.device)
    c = hf.config
    shape = dict(C=c.hidden_size, H=c.num_attention_heads, KV=getattr(c, "num_key_value_heads", None) or
                 c.num_attention_heads, I=getattr(c, "intermediate_size", 4 * c.hidden_size), V=c.vocab_size)
    shape["D"] = getattr(c, "head_dim", None) or shape["C"] // shape["H"]
    ctx = getattr(c, "max_position_embeddings", 2048)
    max_len = min(ctx, s.long_prompt + s.max_new_tokens + 64) if s.long_prompt else min(ctx, 512)
    shape["max_len"] = max_len
    doc["shape"] = shape

    doc["decode"], doc["validation"], doc["profile"] = [], {}, {}
    if "engines" in cells:
        pdl_default = K.PDL["on"]
        K.PDL["on"] = False          # the fused rows without programmatic dependent launch first; then with it
        base = cell("engines/build-inductor", lambda: _engine(s.model, s, hf, max_len))
        fused = cell("engines/build-fused", lambda: _engine(s.model, s, hf, max_len, decode_kernels="fused"))
        if base is not None:
            doc["validation"]["inductor"] = cell("validate/inductor", lambda: validate(base, hf, _check_settings(s)))
        if fused is not None:
            doc["validation"]["fused"] = cell("validate/fused", lambda: validate(fused, hf, _check_settings(s)))
        if base is not None and fused is not None:
            doc["validation"]["fused_vs_inductor_decode"] = cell(
                "validate/fused-vs-inductor", lambda: decode_logits_vs(base, fused, s))
        # batch 1 twice each, interleaved (the spread between the two is the noise of the comparison)
        for rnd_ in range(2):
            for name, e in (("inductor", base), ("fused", fused)):
                if e is not None:
                    rows = cell(f"decode/{name}/b1/{rnd_}", lambda: engine_rows(name, e, s, bw, [1], False, cuda))
                    for r in rows or []:
                        r["round"] = rnd_
                        doc["decode"].append(r)
        for name, e, more in (("fused", fused, [b for b in batches if 1 < b <= 8]),
                              ("inductor", base, [b for b in batches if b > 8])):
            if e is not None:
                doc["decode"] += cell(f"decode/{name}/more", lambda: engine_rows(
                    name, e, s, bw, more, name == "fused" or s.baseline_long, cuda)) or []
        if fused is not None and cuda:
            # the fused kernels at batch 64 too (cuBLAS GEMMs + fused norm/attention/epilogue launches)
            def fused64():
                fused.fused_max_batch = max(batches)
                fused._graphs.clear()
                return engine_rows("fused-all-b", fused, s, bw, [b for b in batches if b > 8], False, cuda)
            doc["decode"] += cell("decode/fused-all-batches", fused64) or []
            fused.fused_max_batch = 8
            fused._graphs.clear()

            def forced_cublas():
                saved = dict(K.IMPL)
                for k_ in list(K.IMPL):
                    K.IMPL[k_] = "cublas"
                for n_, k2 in ((shape["V"], shape["C"]), ((shape["H"] + 2 * shape["KV"]) * shape["D"], shape["C"]),
                               (shape["C"], shape["H"] * shape["D"]), (2 * shape["I"], shape["C"]),
                               (shape["C"], shape["I"])):
                    K.IMPL[(n_, k2, 1, False)] = "cublas"
                try:
                    fused._graphs.clear()
                    return engine_rows("fused-cublas", fused, s, bw, [1], False, cuda)
                finally:
                    K.IMPL.clear()
                    K.IMPL.update(saved)
                    fused._graphs.clear()
            doc["decode"] += cell("decode/fused-cublas", forced_cublas) or []
        if fused is not None and cuda:
            def with_pdl():
                K.PDL["on"] = True
                fused._graphs.clear()
                rows = engine_rows("fused-pdl", fused, s, bw, [1, 8], True, cuda)
                doc["validation"]["fused-pdl_vs_inductor_decode"] = decode_logits_vs(base, fused, s)
                return rows
            doc["decode"] += cell("decode/fused-pdl", with_pdl) or []
        if "profile" in cells and cuda:
            for name, e, pdl in (("inductor", base, False), ("fused-pdl", fused, True), ("fused", fused, False)):
                if e is not None:
                    if e is fused and K.PDL["on"] != pdl:
                        K.PDL["on"] = pdl
                        fused._graphs.clear()
                    b1 = [r["ms_per_step"] for r in doc["decode"] if r["variant"] == name and r["batch"] == 1
                          and r["context"] == "short"]
                    doc["profile"][name] = cell(f"profile/{name}", lambda: profile_step(
                        e, s, statistics.median(b1) if b1 else None))
        K.PDL["on"] = pdl_default
        doc["pdl_default"] = pdl_default
        doc["linear_impl"] = [{"key": list(map(str, k)), "impl": v, "ms": K.TIMES.get(k)} for k, v in K.IMPL.items()]
        doc["linear_impl_errors"] = {str(k): v for k, v in K.ERRORS.items()}
        for e in (base, fused):
            if e is not None:
                e.close()
        if cuda:
            torch.cuda.empty_cache()
        q = cell("engines/build-fused-int4", lambda: _engine(s.model, s, hf, max_len, decode_kernels="fused",
                                                             weight_quant="int4g", group_size=s.group_size))
        if q is not None:
            v = cell("validate/fused-int4", lambda: validate(q, hf, _check_settings(s)))
            if v:
                v["ok"] = None      # quantized logits: judged by the quality cell's perplexity
            doc["validation"]["fused-int4"] = v
            doc["decode"] += cell("decode/fused-int4", lambda: engine_rows(
                "fused-int4", q, s, bw, [b for b in batches if b <= 8], False, cuda)) or []
            if "profile" in cells and cuda:
                b1 = [r["ms_per_step"] for r in doc["decode"] if r["variant"] == "fused-int4" and r["batch"] == 1]
                doc["profile"]["fused-int4"] = cell("profile/fused-int4", lambda: profile_step(
                    q, s, b1[0] if b1 else None))
            q.close()
    del hf
    if cuda:
        torch.cuda.empty_cache()

    if "small" in cells and s.small_model:
        def small():
            hf2 = load_model(s.small_model, dtype=dtype, device=s.device)
            ml = min(512, getattr(hf2.config, "n_positions", 512))
            s2 = replace(s, model=s.small_model)
            rows, val = [], {}
            for name, kw in (("inductor", {}), ("fused", {"decode_kernels": "fused"})):
                e = _engine(s.small_model, s2, hf2, ml, **kw)
                try:
                    val[name] = validate(e, hf2, _check_settings(s2))
                    for rep in range(2):
                        for r in engine_rows(name, e, s2, bw, [1], False, cuda):
                            r.update(model=s.small_model, round=rep)
                            rows.append(r)
                finally:
                    e.close()
            return {"decode": rows, "validation": val}
        doc["small"] = cell("small", small)

    if "quality" in cells and s.quality_model:
        def quality():
            hfq = load_model(s.quality_model, dtype=dtype, device=s.device)
            sq = replace(_check_settings(s), model=s.quality_model, short_prompt=32, eval_windows=8, eval_len=128)
            res = {}
            variants = [("fused", {"decode_kernels": "fused"})] + [
                (f"fused-int4-g{g}", {"decode_kernels": "fused", "weight_quant": "int4g", "group_size": int(g)})
                for g in s.quality_groups.split(",") if g.strip()]
            for name, kw in variants:
                e = _engine(s.quality_model, replace(s, num_slots=8), hfq, 512, **kw)
                try:
                    res[name] = {"validation": validate(e, hfq, sq), "accuracy": accuracy(e, hfq, sq)}
                finally:
                    e.close()
            return res
        doc["quality"] = cell("quality", quality)

    if "kernels" in cells and getattr(c, "model_type", "") != "gpt2":   # last: the engines' figures come first
        doc["kernels"] = cell("kernels", lambda: kernel_cell(s, shape))

    doc["complete"] = True
    save()
    log.info("Saving results to %s", out)
    print_table(doc)
    bad = [k for k, v in doc["validation"].items() if isinstance(v, dict) and v.get("ok") is False]
    if bad:
        raise UserError(f"logits of {', '.join(bad)} differ from the HF model beyond the tolerance; the "
                        f"measurements are in {out} — this is a bug to report")
    return out


def print_table(doc: dict) -> None:
    p = print
    p("\n== decode ms/step (host sync every step; replay = GPU time per step; pipelined = device-fed) ==")
    for r in doc.get("decode", []) + ((doc.get("small") or {}).get("decode") or []):
        p(f"{r.get('model', doc['settings']['model']):10s} {r['variant']:14s} b{r['batch']:<3d} {r['context']:5s} "
          f"{r['ms_per_step']:.3f} ms  floor {r['floor_ms']:.3f}  replay {r.get('replay_ms') or 0:.3f}  "
          f"pipelined {r.get('pipelined_ms') or 0:.3f}")
    for name, pr in (doc.get("profile") or {}).items():
        if pr:
            p(f"profile {name}: {pr['kernels_per_step']:.0f} kernels, {pr['copies_in_graph_per_step']:.0f} copies in "
              f"graph, kernels {pr['kernel_us_per_step']:.0f} us, idle {100 * pr['gpu_idle_share']:.0f}%")
    for name, v in (doc.get("validation") or {}).items():
        if v:
            p(f"valid {name}: " + " ".join(f"{k}={v[k]}" for k in v if k in (
                "ok", "max_abs_logit_diff", "greedy_agreement_vs_hf", "argmax_agreement")))
    for name, q in (doc.get("quality") or {}).items():
        a = q["accuracy"]
        p(f"quality {name}: ppl {a['ppl_engine']:.3f} vs HF {a['ppl_hf']:.3f} ({a['ppl_delta_pct']:+.2f}%), "
          f"greedy {q['validation']['greedy_agreement_vs_hf']:.2f}")
    k = doc.get("kernels") or {}
    for r in k.get("gemv", []):
        p(f"gemv {r['weight']:8s} int4={int(r['int4'])} M={r['rows']} err {r['rel_err']:.1e} triton "
          f"{r.get('triton_ms', 0) * 1e3:.1f} us ({r.get('triton_gbs', 0):.0f} GB/s) cublas "
          f"{(r.get('cublas_ms') or 0) * 1e3:.1f} tinygemm {(r.get('tinygemm_ms') or 0) * 1e3:.1f}")
    for r in k.get("attention", []):
        p(f"attn L={r['kv_len']} B={r['rows']} err {r['rel_err']:.1e} triton {r.get('triton_ms', 0) * 1e3:.1f} us "
          f"ref {r.get('reference_ms', 0) * 1e3:.1f} us")
    if doc.get("errors"):
        p("errors: " + "; ".join(f"{k}: {v[:150]}" for k, v in doc["errors"].items()))


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, KernelSettings)
    return p


main = cli.main_for(build_parser, KernelSettings, run_kernels)

if __name__ == "__main__":
    cli.run(main)
