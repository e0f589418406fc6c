"""The paged KV cache and its prefix cache against the contiguous-slot engine, in one run (docs/paged_kv.md).

    python profile/prefix_cache_gpu.py --out $OUT/prefix-cache.json          # on a GPU: Llama-1B shape, FP16, ~5 min
    python profile/prefix_cache_gpu.py --smoke --out /tmp/prefix-smoke.json  # CPU: built-in model, tiny sizes

Reads:  the model (preset llama-1b: seeded random weights; --smoke: the built-in model)
Writes: --out (default artifacts/<model>/profile/prefix-cache-<device>.json): machine, GPU name, versions, date,
        command, settings, raw samples and a summary with each target and whether it was met; written after every
        cell (complete=false until the end)

Cells (the compiled engine, lmopt.engines.compiled; the ratios come from one process, the compared engines
measured in turn, repetition by repetition):
  a. shared prefix: a --prefix-tokens prefix shared by every request plus a distinct --suffix-tokens suffix.
     TTFT (admission + prefill + first token on the host, one request at a time) with a prefix-cache hit, with the
     cache off (same paged engine) and on the contiguous engine; target: hit p50 >= 5x lower than off. Then
     --streams streams through lmopt.scheduler, --new-tokens each, cache on vs off: output tokens/s (target >= 2x).
     The prefix is computed once before each cache-on run (a system prompt seen before). Engines of this cell are
     CUDA-graph captured without torch.compile (its ramp of decode batch sizes would compile for minutes).
  b. same memory: the KV memory of --contiguous-slots slots x --context positions as a pool of blocks; --paged-slots
     requests of --mean-positions positions on average (prompt + output, +-50%) submitted at once: the most running
     at once and the preemptions (target: >= 2x --contiguous-slots with no preemption). Eager (counts, not speed).
  c. no shared prefix: --plain-prompt distinct prompts, --plain-new-tokens steps; decode ms/step with a host sync
     every step (lmopt.engines.check.time_decode) at batch 1 and at --streams, paged vs contiguous, both compiled
     and captured as the engine runs by default (target: within 5%); on a GPU also the paged engine with the paged
     attention kernel (paged_attention="triton", lmopt.engines.paged_attention) instead of gather + SDPA.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from lmopt import cli
from lmopt import results as R
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("prefix_cache_gpu")

NO_EOS = (-1,)   # never sampled: every request runs to its max tokens


@dataclass
class PrefixSettings:
    model: str = "llama-1b"
    device: str = "cuda"
    precision: str = "fp16"
    smoke: bool = False               # a CPU run of every cell at tiny sizes (built-in model, fp32): checks the script
    block_size: int = 16              # positions per KV block
    prefix_tokens: int = 2048         # a: the shared prefix
    suffix_tokens: int = 64           # a: each request's own suffix
    new_tokens: int = 64              # a: output tokens per stream
    streams: int = 64                 # a, c: concurrent streams
    ttft_repeats: int = 10            # a: TTFT samples per mode
    repeats: int = 2                  # a, c: runs per engine/mode, alternating
    context: int = 2048               # b: positions per contiguous slot
    contiguous_slots: int = 64        # b: today's slot count; the memory budget is these slots x context
    mean_positions: int = 512         # b: mean prompt + output positions per request
    paged_slots: int = 224            # b: requests at once (the paged engine's sequence slots)
    plain_prompt: int = 512           # c: prompt tokens
    plain_new_tokens: int = 128       # c: decode steps + 1
    seed: int = 0
    out: str = ""                     # result file (default artifacts/<model>/profile/prefix-cache-<device>.json)


SMOKE = dict(model="tiny", device="cpu", precision="fp32", prefix_tokens=64, suffix_tokens=8, new_tokens=8,
             streams=4, ttft_repeats=3, repeats=1, context=128, contiguous_slots=4, mean_positions=32,
             paged_slots=12, plain_prompt=24, plain_new_tokens=6)

TARGETS = {"ttft_hit_vs_off": 5.0, "tokens_per_s_on_vs_off": 2.0, "streams_vs_slots": 2.0,
           "paged_vs_contiguous_tokens_per_s": 0.95, "paged_vs_contiguous_itl_b1": 1.05}


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def ttft_once(engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from admission to the first token on the host, and the prompt tokens found in the cache."""
    engine.synchronize()
    t = time.perf_counter()
    slot = engine.alloc_slot()
    try:
        hit = engine.admit_slot(slot, prompt) if engine.capabilities.paged_kv else 0
        if hit is None:
            raise UserError("the KV pool cannot hold one request of the TTFT cell — raise the pool")
        int(engine.prefill_slot(slot, prompt[hit:]).argmax()[0])
        return time.perf_counter() - t, hit
    finally:
        engine.free_slot(slot)


def serve_streams(engine, prompts: list[list[int]], new_tokens: int, on_step=None) -> dict:
    """Every prompt submitted at once to lmopt.scheduler over `engine`; wall time to the last token."""
    from lmopt.generate import SamplingParams
    from lmopt.scheduler import Scheduler

    p = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=NO_EOS)
    with Scheduler(engine, max_queue=len(prompts), on_step=on_step) as sched:
        t0 = time.perf_counter()
        reqs = [sched.submit(q, p) for q in prompts]
        for r in reqs:
            r.result(timeout=600)
        wall = time.perf_counter() - t0
        st = sched.stats()
    toks = sum(len(r.tokens) for r in reqs)
    return {"wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall,
            "ttft_ms": R.stats([r.first_token_at - r.submitted_at for r in reqs], scale=1e3),
            "preemptions": st["preemptions"], "prefix_cache_hits": st.get("prefix_cache_hits"),
            "prefix_cache_queries": st.get("prefix_cache_queries"),
            "errors": sorted({r.error for r in reqs if r.error})}


def shared_prefix_cell(paged, contiguous, s: PrefixSettings, vocab: int) -> dict:
    rng = random.Random(s.seed)
    prefix = _ids(rng, s.prefix_tokens, vocab)
    ttft_once(paged, prefix + _ids(rng, s.suffix_tokens, vocab))         # the prefix is now cached
    samples: dict[str, list[float]] = {"hit": [], "off": [], "contiguous": []}
    hits = []
    for rep in range(s.ttft_repeats + 1):                                 # rep 0 warms up
        for mode in samples:
            prompt = prefix + _ids(rng, s.suffix_tokens, vocab)
            if mode == "contiguous":
                dt, hit = ttft_once(contiguous, prompt)
            else:
                paged.set_prefix_cache(mode == "hit")
                dt, hit = ttft_once(paged, prompt)
                paged.set_prefix_cache(True)
            if rep:
                samples[mode].append(dt)
                if mode == "hit":
                    hits.append(hit)
    ttft = {m: R.stats(v, scale=1e3) for m, v in samples.items()}
    log.info("TTFT p50: hit %.2f ms (%d of %d tokens cached), cache off %.2f ms, contiguous %.2f ms",
             ttft["hit"]["p50"], min(hits), s.prefix_tokens + s.suffix_tokens, ttft["off"]["p50"],
             ttft["contiguous"]["p50"])
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(s.repeats):
        for mode in runs:
            paged.set_prefix_cache(mode == "on")
            if mode == "on":                                               # a system prompt seen before
                ttft_once(paged, prefix + _ids(rng, s.suffix_tokens, vocab))
            prompts = [prefix + _ids(rng, s.suffix_tokens, vocab) for _ in range(s.streams)]
            r = serve_streams(paged, prompts, s.new_tokens)
            runs[mode].append(r)
            log.info("%d streams, prefix cache %s: %.0f output tokens/s, TTFT p50 %.1f ms, %d preemptions",
                     s.streams, mode, r["tokens_per_s"], r["ttft_ms"]["p50"], r["preemptions"])
    paged.set_prefix_cache(True)
    tps = {m: statistics.median(r["tokens_per_s"] for r in v) for m, v in runs.items()}
    return {"ttft_ms": ttft, "ttft_samples_s": samples, "hit_tokens": hits, "streams": runs,
            "tokens_per_s": tps}


def same_memory_cell(engine, s: PrefixSettings, vocab: int) -> dict:
    rng = random.Random(s.seed + 1)
    out_mean = max(1, s.mean_positions // 8)
    prompts, news = [], []
    for _ in range(s.paged_slots):
        n = min(s.context, rng.randint(s.mean_positions // 2, s.mean_positions * 3 // 2))
        new = min(out_mean, n - 1)
        prompts.append(_ids(rng, n - new, vocab))
        news.append(new)
    peak = {"running": 0, "blocks_used": 0}

    def on_step(st):
        peak["running"] = max(peak["running"], st["slots_in_use"])
        peak["blocks_used"] = max(peak["blocks_used"], st["kv_blocks_used"])

    from lmopt.generate import SamplingParams
    from lmopt.scheduler import Scheduler

    t0 = time.perf_counter()
    with Scheduler(engine, max_queue=len(prompts), on_step=on_step) as sched:
        reqs = [sched.submit(q, SamplingParams(max_new_tokens=n, stop_token_ids=NO_EOS)) for q, n in zip(prompts, news)]
        for r in reqs:
            r.result(timeout=600)
        st = sched.stats()
    res = {"requests": len(reqs), "positions_mean": statistics.mean(len(q) + n for q, n in zip(prompts, news)),
           "max_running": peak["running"], "max_blocks_used": peak["blocks_used"], "blocks": engine.num_blocks,
           "preemptions": st["preemptions"], "contiguous_slots": s.contiguous_slots,
           "errors": sorted({r.error for r in reqs if r.error}), "wall_s": time.perf_counter() - t0}
    log.info("same memory as %d slots x %d: %d requests of %.0f positions, at most %d running, %d preemptions",
             s.contiguous_slots, s.context, len(reqs), res["positions_mean"], res["max_running"], res["preemptions"])
    return res


def plain_cell(engines: dict, s: PrefixSettings, floor: dict) -> dict:
    """Each engine in turn, repetition by repetition: decode ms/step at batch 1 and at --streams."""
    from lmopt.engines.check import time_decode

    ts = SimpleNamespace(short_prompt=s.plain_prompt, max_new_tokens=s.plain_new_tokens, repeats=1)
    rows: dict[str, dict[int, list[dict]]] = {n: {1: [], s.streams: []} for n in engines}
    for _ in range(s.repeats):
        for name, eng in engines.items():
            for b in (1, s.streams):
                rows[name][b].append(time_decode(eng, b, ts, floor))
    ms = {n: {b: statistics.median(r["ms_per_step"] for r in v) for b, v in d.items()} for n, d in rows.items()}
    return {"rows": rows, "ms_per_step": ms,
            "tokens_per_s": {n: s.streams * 1e3 / ms[n][s.streams] for n in ms}}


def run_prefix_bench(*, settings: PrefixSettings) -> Path:
    s = replace(settings, **SMOKE) if settings.smoke else settings
    try:
        import torch
    except ImportError:
        raise UserError("torch is not installed — pip install torch") from None
    from lmopt.engines.check import gpu_info
    from lmopt.engines.compiled import CompiledEngine
    from lmopt.models import load_model
    from lmopt.paths import stage_dir

    cuda = s.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError("no CUDA GPU visible to torch — run on a GPU machine, or pass --smoke for the CPU check")
    if s.precision != "fp32" and not cuda:
        raise UserError(f"{s.precision} needs a GPU — pass --smoke (or --device cpu --precision fp32)")
    if min(s.block_size, s.prefix_tokens, s.suffix_tokens, s.new_tokens, s.streams, s.contiguous_slots,
           s.paged_slots, s.mean_positions, s.plain_prompt, s.plain_new_tokens, s.ttft_repeats, s.repeats) < 1:
        raise UserError("every size and count must be >= 1")
    out = Path(s.out) if s.out else stage_dir("artifacts", s.model, "profile", "") / \
        f"prefix-cache-{'cuda' if cuda else 'cpu'}.json"
    t0 = time.perf_counter()
    hf = load_model(s.model, dtype={"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[s.precision],
                    device=s.device)
    bs = s.block_size
    long_len = -(-(s.prefix_tokens + s.suffix_tokens + s.new_tokens) // bs) * bs
    plain_len = -(-(s.plain_prompt + s.plain_new_tokens) // bs) * bs
    max_len = max(long_len, plain_len)
    common = dict(hf_model=hf, num_slots=s.streams, max_len=max_len)
    # a/c: the contiguous engine as it runs today (compiled, captured)
    contiguous = CompiledEngine(s.model, s.precision, s.device, **common)
    # a: paged, pool for every stream's whole request (preemption is not what this cell measures), no torch.compile
    per_stream = -(-long_len // bs)
    paged_a = CompiledEngine(s.model, s.precision, s.device, kv_layout="paged", block_size=bs,
                             num_blocks=s.streams * per_stream + per_stream, compile=False, **common)
    vocab = contiguous.info.vocab_size
    doc = R.envelope("prefix-cache", settings=asdict(s), versions=R.versions("torch", "transformers", "numpy"),
                     gpu=gpu_info() if cuda else None, complete=False, targets=TARGETS, errors={},
                     engines={"max_len": max_len, "block_size": bs, "paged_a_blocks": paged_a.num_blocks})

    def save():  # after every cell (atomically): a run cut short still leaves what it measured
        doc["elapsed_s"] = time.perf_counter() - t0
        R.write_json(out, doc)

    summary: dict = {}
    doc["summary"] = summary

    def cell(name, fn):
        """One cell; a failure is recorded (and logged with its traceback) and the next cell still runs."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (one GPU call must bring back every cell it can)
            log.exception("cell %s failed", name)
            doc["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        save()
        if cuda:
            torch.cuda.empty_cache()

    def cell_a():
        a = doc["shared_prefix"] = shared_prefix_cell(paged_a, contiguous, s, vocab)
        summary["ttft_p50_ms"] = {m: a["ttft_ms"][m]["p50"] for m in a["ttft_ms"]}
        summary["ttft_hit_vs_off"] = a["ttft_ms"]["off"]["p50"] / a["ttft_ms"]["hit"]["p50"]
        summary["tokens_per_s_on_vs_off"] = a["tokens_per_s"]["on"] / a["tokens_per_s"]["off"]

    cell("shared_prefix", cell_a)
    paged_a.close()
    del paged_a

    def cell_b():   # the same memory as the contiguous slots, as blocks; eager
        paged_b = CompiledEngine(s.model, s.precision, s.device, kv_layout="paged", block_size=bs, hf_model=hf,
                                 num_slots=s.paged_slots, max_len=-(-s.context // bs) * bs,
                                 num_blocks=s.contiguous_slots * (s.context // bs), compile=False, cuda_graphs=False)
        try:
            b = doc["same_memory"] = same_memory_cell(paged_b, s, vocab)
        finally:
            paged_b.close()
        summary["streams_vs_slots"] = b["max_running"] / s.contiguous_slots if not b["preemptions"] else None
        summary["max_running_without_preemption"] = b["max_running"] if not b["preemptions"] else None

    cell("same_memory", cell_b)

    def cell_c():   # no shared prefix, paged vs contiguous, both as the engine runs by default
        from lmopt.engines.paged_attention import available

        engines = {"contiguous": contiguous}
        paged_kw = dict(kv_layout="paged", block_size=bs, num_blocks=s.streams * (max_len // bs), **common)
        engines["paged"] = CompiledEngine(s.model, s.precision, s.device, **paged_kw)
        if available(s.device) is None and bs >= 16:   # the paged attention kernel beside the gather
            engines["paged-triton"] = CompiledEngine(s.model, s.precision, s.device, paged_attention="triton",
                                                     **paged_kw)
        else:
            doc["errors"]["no_shared_prefix/paged-triton"] = f"not run: {available(s.device)}"
        probe = R.read_bandwidth_gbs(s.device, nbytes=(1 << 30) if cuda else (64 << 20), reps=10 if cuda else 3)
        wbytes = contiguous.weight_bytes()
        floor = {"weight_bytes": wbytes, "read_gbs": probe["gbs"], "read_bytes_per_ms": probe["gbs"] * 1e6,
                 "floor_ms": wbytes / (probe["gbs"] * 1e6)}
        try:
            c = doc["no_shared_prefix"] = plain_cell(engines, s, floor)
        finally:
            for n, e in engines.items():
                if n != "contiguous":
                    doc["engines"][f"{n}_compile_error"] = e.compile_error
                    e.close()
        for n, key in (("paged", "paged"), ("paged-triton", "triton")):
            if n in c["ms_per_step"]:
                summary[f"{key}_vs_contiguous_tokens_per_s"] = c["tokens_per_s"][n] / c["tokens_per_s"]["contiguous"]
                summary[f"{key}_vs_contiguous_itl_b1"] = c["ms_per_step"][n][1] / c["ms_per_step"]["contiguous"][1]
        summary["itl_b1_ms"] = {n: c["ms_per_step"][n][1] for n in c["ms_per_step"]}

    cell("no_shared_prefix", cell_c)
    met = {"ttft_hit_vs_off": lambda v: v >= TARGETS["ttft_hit_vs_off"],
           "tokens_per_s_on_vs_off": lambda v: v >= TARGETS["tokens_per_s_on_vs_off"],
           "streams_vs_slots": lambda v: v >= TARGETS["streams_vs_slots"],
           "paged_vs_contiguous_tokens_per_s": lambda v: v >= TARGETS["paged_vs_contiguous_tokens_per_s"],
           "paged_vs_contiguous_itl_b1": lambda v: v <= TARGETS["paged_vs_contiguous_itl_b1"],
           "triton_vs_contiguous_tokens_per_s": lambda v: v >= TARGETS["paged_vs_contiguous_tokens_per_s"],
           "triton_vs_contiguous_itl_b1": lambda v: v <= TARGETS["paged_vs_contiguous_itl_b1"]}
    summary["met"] = {k: (f(summary[k]) if summary.get(k) is not None else False) for k, f in met.items()}
    doc["complete"] = not [k for k in doc["errors"] if not doc["errors"][k].startswith("not run")]
    save()
    log.info("summary: %s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()
                             if k != "met"})
    log.info("targets met: %s", summary["met"])
    log.info("Saving results to %s", out)
    contiguous.close()
    if not doc["complete"]:
        raise UserError(f"cells failed ({', '.join(doc['errors'])}); what was measured is in {out}")
    return out


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, PrefixSettings)
    return p


main = cli.main_for(build_parser, PrefixSettings, run_prefix_bench)

if __name__ == "__main__":
    cli.run(main)
