"""Check and time the compiled engine on one model: logits and greedy tokens against the Hugging Face model, decode
speed at several batch sizes, time to first token for a long prompt, each against the memory-bandwidth floor.

    python profile/compiled_engine_gpu.py --model llama-1b --profile-steps 20      # on a GPU (fp16)
    python profile/compiled_engine_gpu.py --model llama-test --device cpu --precision fp32   # CPU smoke run
    python profile/compiled_engine_gpu.py --model llama-1b --precision bf16 --weights int4  # weight-only INT4

Reads:  the model (built-in weights, a preset made with seeded random weights, or a local HF folder)
Writes: --out (default artifacts/<model>/profile/compiled-engine-<precision>-<device>.json): machine, GPU, versions,
        command, settings, validation, raw step times, summary rows

Figures: the HF model's last-token logits vs the engine's after a prompt of --short-prompt (max |diff| against a
tolerance scaled by the logits' range; a miss fails the run after the JSON is written), greedy agreement over
--parity-tokens tokens; decode ms per step and tokens/s at each batch (prompt --short-prompt, --max-new-tokens - 1
steps, host sync every step as a streaming server does), after the batch's CUDA graph is captured; TTFT (prefill +
first token on the host) for one --long-prompt prompt; with --profile-steps, kernels per batch-1 step and the GPU's
idle share. Floor (`floor_ms`, `ratio_to_floor`) = weight bytes one step reads / device read bandwidth measured in
the same run (lmopt.results.read_bandwidth_gbs: a read-only reduction over a large buffer); `floor_step` beside it
is lmopt.results' common floor (weights + KV cache at the mean context / the same read bandwidth).
With --weights int8|int8mm|int4 (weight-only quantization, lmopt.engines.weight_quant) the logits are not held to
the floating-point tolerance; the accuracy cell says what quantizing costs instead: teacher-forced over
--eval-windows windows of --eval-len tokens of data/eval.txt, the engine's decode logits against the HF model's
(same precision): perplexity of both, top-1 agreement per position, greedy agreement over --parity-tokens.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt import results as R
from lmopt.errors import UserError
from lmopt.engines.check import (DTYPES, accuracy, batch_list, busy_us, cuda_device, gpu_info,  # noqa: F401
                                 make_prompts, profile_synced_steps, time_decode, time_ttft, validate)
from lmopt.engines.weight_quant import SCHEMES
from lmopt.log import get_logger

log = get_logger("compiled_engine_gpu")


@dataclass
class CheckSettings:
    model: str = "llama-1b"
    device: str = "cuda"
    precision: str = "fp16"                 # fp16 | bf16 on a GPU, fp32 on the CPU
    batch_sizes: str = "1,8,32,64"
    short_prompt: int = 128                 # prompt tokens of the decode cells and the validation
    long_prompt: int = 2048                 # prompt tokens of the TTFT cell (skipped when over the context)
    max_new_tokens: int = 64                # decode steps per cell + 1
    repeats: int = 3
    num_slots: int = 64                     # KV-cache slots (the largest decode batch)
    max_len: int = 0                        # positions per slot (0: long prompt + new tokens, capped at the context)
    compile: str = "auto"                   # auto (on for CUDA) | on | off
    cuda_graphs: str = "auto"               # auto (on for CUDA) | on | off
    decode_attention: str = "sdpa"          # sdpa (one fused kernel) | matmul (scores, softmax, sum)
    parity_tokens: int = 32                 # greedy tokens compared with the HF model
    profile_steps: int = 0                  # > 0: profile this many batch-1 decode steps (kernels, GPU idle share)
    out: str = ""                           # result file (default artifacts/<model>/profile/compiled-engine-<precision>[-<weights>]-<device>.json)
    weights: str = ""                       # weight-only quantization: int8 | int8mm | int4 (empty: none)
    group_size: int = 128                   # INT4 group size along the input dimension
    eval_windows: int = 8                   # accuracy cell: windows of data/eval.txt (0 = skip)
    eval_len: int = 128                     # accuracy cell: tokens per window


def profile_decode(engine, s: CheckSettings, step_ms: float | None) -> dict:
    """Kernels per batch-1 decode step and the share of the step the GPU is idle, from the PyTorch profiler
    (CUPTI; it sees the kernels a replayed CUDA graph launches)."""
    dev, kernels, wall = profile_synced_steps(engine, s.short_prompt, s.profile_steps)
    busy = busy_us(kernels)
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        per_name.setdefault(e.name[:120], []).append(e.time_range.end - e.time_range.start)
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    n = s.profile_steps
    busy_ms = busy / 1e3 / n
    ref = step_ms or wall * 1e3
    res = {"steps": n, "kernels_per_step": len(kernels) / n, "memcpy_per_step": (len(dev) - len(kernels)) / n,
           "gpu_busy_ms_per_step": busy_ms, "step_ms_unprofiled": step_ms, "step_ms_profiled": wall * 1e3,
           "gpu_idle_share": max(0.0, 1 - busy_ms / ref) if kernels else None,
           "top_kernels": [{"name": k, "calls_per_step": len(v) / n, "ms_per_step": sum(v) / 1e3 / n}
                           for k, v in top]}
    log.info("profile: %.0f kernels per step, GPU busy %.3f ms of a %.3f ms step (idle %.0f%%)",
             res["kernels_per_step"], busy_ms, ref, 100 * (res["gpu_idle_share"] or 0))
    return res


def run_check(*, settings: CheckSettings) -> Path:
    s = settings
    cuda = cuda_device(s.device, s.precision)
    import torch

    from lmopt.engines.compiled import CompiledEngine
    from lmopt.models import load_model
    from lmopt.paths import stage_dir

    if s.decode_attention not in ("sdpa", "matmul"):
        raise UserError(f"--decode-attention {s.decode_attention} is unknown — use sdpa or matmul")
    if s.compile not in ("auto", "on", "off") or s.cuda_graphs not in ("auto", "on", "off"):
        raise UserError("--compile and --cuda-graphs take auto, on or off")
    batches = batch_list(s.batch_sizes)
    if not batches or min(batches) < 1 or max(batches) > s.num_slots:
        raise UserError(f"--batch-sizes {s.batch_sizes} need 1..{s.num_slots} rows each — raise --num-slots")
    if s.weights and s.weights not in SCHEMES:
        raise UserError(f"--weights {s.weights} is unknown — use one of {', '.join(SCHEMES)} (or leave it empty)")
    out = Path(s.out) if s.out else stage_dir("artifacts", s.model, "profile", "") / \
        f"compiled-engine-{s.precision}{'-' + s.weights if s.weights else ''}-{'cuda' if cuda else 'cpu'}.json"
    flag = {"auto": None, "on": True, "off": False}
    t0 = time.perf_counter()
    hf = load_model(s.model, dtype=DTYPES[s.precision], device=s.device)
    ctx = hf.config.max_position_embeddings if hasattr(hf.config, "max_position_embeddings") else hf.config.n_positions
    max_len = s.max_len or min(ctx, max(s.long_prompt, s.short_prompt, s.eval_len) + max(s.max_new_tokens, s.parity_tokens))
    engine = CompiledEngine(s.model, s.precision, s.device, num_slots=s.num_slots, max_len=max_len,
                            compile=flag[s.compile], cuda_graphs=flag[s.cuda_graphs],
                            decode_attention=s.decode_attention, hf_model=hf, weight_quant=s.weights or None,
                            group_size=s.group_size)
    load_s = time.perf_counter() - t0
    probe = R.read_bandwidth_gbs(s.device, nbytes=(1 << 30) if cuda else (256 << 20), reps=20 if cuda else 5)
    bw = {"read_gbs": probe["gbs"], "buffer_bytes": probe["buffer_bytes"], "reps": probe["reps"],
          "threads": probe["threads"]}
    bw["copy_gbs"] = R.copy_bandwidth_gbs(s.device, nbytes=(1 << 30) if cuda else (256 << 20))
    wbytes = engine.weight_bytes()
    floor = {"weight_bytes": wbytes, "read_gbs": bw["read_gbs"], "read_bytes_per_ms": bw["read_gbs"] * 1e6,
             "floor_ms": wbytes / (bw["read_gbs"] * 1e6), "copy_gbs": bw["copy_gbs"]}
    log.info("weights read per step %.1f MB; read bandwidth %.0f GB/s (copy %.0f GB/s); floor %.3f ms/step",
             wbytes / 1e6, bw["read_gbs"], bw["copy_gbs"], floor["floor_ms"])
    doc: dict = R.envelope("compiled-engine-check", settings=asdict(s),
                           versions=R.versions("torch", "transformers", "numpy", "safetensors", "triton"),
                           gpu=gpu_info() if cuda else None, engine={"compile": engine.use_compile, "cuda_graphs": engine.use_graphs,
                                                    "decode_attention": s.decode_attention,
                                                    "num_slots": engine.num_slots, "max_len": engine.max_len,
                                                    "batch_buckets": engine.batch_buckets,
                                                    "kv_buckets": engine.kv_buckets},
                           complete=False, load_s=load_s, bandwidth=bw, floor=floor, errors={})

    def save():  # after every cell (atomically): a run cut short still leaves what it measured, complete=false
        doc["elapsed_s"] = time.perf_counter() - t0
        R.write_json(out, doc)

    doc["validation"] = validate(engine, hf, s)
    if s.weights:  # quantized logits are judged by the accuracy cell, not the floating-point tolerance
        doc["validation"]["ok"] = None
    save()
    if s.eval_windows > 0:
        doc["accuracy"] = accuracy(engine, hf, s)
        save()
    del hf
    if cuda:
        torch.cuda.empty_cache()
    doc["decode"] = []
    for b in batches:
        try:
            doc["decode"].append(time_decode(engine, b, s, floor))
        except torch.cuda.OutOfMemoryError as e:
            doc["errors"][f"decode/b{b}"] = f"out of memory: {str(e)[:200]}"
            torch.cuda.empty_cache()
        doc["engine"]["compile"], doc["engine"]["compile_error"] = engine.use_compile, engine.compile_error
        save()
    if s.long_prompt <= 0:
        doc["ttft"] = None
    elif s.long_prompt <= engine.max_len:
        doc["ttft"] = time_ttft(engine, s.long_prompt, s)
    else:
        doc["ttft"] = None
        doc["errors"]["ttft"] = f"prompt {s.long_prompt} exceeds the engine's {engine.max_len} positions"
    doc["ttft_short"] = time_ttft(engine, s.short_prompt, s)
    if s.profile_steps > 0:
        b1 = next((r["ms_per_step"] for r in doc["decode"] if r["batch"] == 1), None)
        doc["profile"] = profile_decode(engine, s, b1)
    doc["engine"]["compile"], doc["engine"]["compile_error"] = engine.use_compile, engine.compile_error
    doc["complete"] = True
    save()
    log.info("Saving results to %s", out)
    engine.close()
    if doc["validation"]["ok"] is False:
        v = doc["validation"]
        raise UserError(f"engine logits differ from the HF model by {v['max_abs_logit_diff']:.3g} (tolerance "
                        f"{v['tolerance']:.3g}); the measurements are in {out} — this is a bug to report")
    return out


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, CheckSettings, choices={"compile": ("auto", "on", "off"), "cuda_graphs": ("auto", "on", "off"),
                                                "decode_attention": ("sdpa", "matmul")})
    return p


main = cli.main_for(build_parser, CheckSettings, run_check)

if __name__ == "__main__":
    cli.run(main)
