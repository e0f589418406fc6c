"""Offline "Before vs After" benchmark: every engine x precision available here, through one generation loop,
on the CPU or on an NVIDIA GPU, with one result schema.

    python profile/benchmark.py --model tiny                        # CPU rows: torch fp32, ort fp32/int8/fp16
    python profile/benchmark.py --model gpt2-124m --batch-sizes 1 --engines torch,ort --precisions fp32,int8
    python profile/benchmark.py --model llama-1b --preset gpu       # GPU: torch eager, cudagraph, compiled, ort
    make benchmark MODEL=gpt2-124m

--engines takes any name registered in lmopt.engines.ENGINES. The `gpu` preset (--device cuda) measures PyTorch
eager on the Hugging Face model (the baseline, what HF generate runs per token), the static-cache CUDA-graph engine,
the compiled engine where one is registered, and ONNX Runtime's CUDA EP with IO binding (on the FP16 graph of
`convert/export_onnx.py --dtype fp16 --device cuda`) and on the fused GroupQueryAttention graph with a fixed KV buffer
replayed as an ONNX Runtime CUDA graph (`ort-gqa`, from `--attention gqa`), at batch 1/8/32/64 with a 128-token prompt, plus TTFT of a
2048-token prompt at batch 1; flags given on the command line override the preset's values.

Reads:  artifacts/<model>/export/fp32/manifest.json (+ model.onnx), artifacts/<model>/quantize/*/manifest.json
        (INT8/FP16 graphs, found by the precision and target their manifests declare), TensorRT engines through
        lmopt.engines (when TensorRT is installed), the built-in eval text (data/eval.txt) for prompts.
Writes: artifacts/<model>/profile/benchmark-<device>.json (or --out): machine, versions, command, settings, raw
        samples per row/batch/prompt, summary; prints the "Before vs After" table.

What is measured, per row (engine x precision) and batch size, with greedy generation of --new-tokens tokens:
  - TTFT (prefill + first token) of a short and a long prompt;
  - per-token decode latency (each decode step: forward + sampling, host logits) and decode tokens/s
    (batch / step latency), p50/p90/p99 over every step of every measured repetition;
  - peak memory: the process RSS (rows share one process, so the engine's own share is the RSS growth while it
    loaded and ran its warm-up) and, on CUDA, device memory in use;
  - greedy agreement of every row's tokens with the baseline row (torch fp32 on CPU, torch fp16 on CUDA);
  - decode figures per prompt length as well (`by_prompt`), each with its own bandwidth floor.
Rows are interleaved inside each repetition (rep 1: A B C, rep 2: A B C, ...) after --warmup repetitions, so that
load from other processes on a shared machine hits every row alike and the ratios stay meaningful.
The memory-bandwidth floor (weights + KV cache bytes read per decode step / measured copy bandwidth) is the
fastest a memory-bound decode step could be on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmopt.errors import UserError, cli_main  # noqa: E402
from lmopt.log import add_verbosity_args, get_logger, setup_logging, timed  # noqa: E402

log = get_logger("benchmark")
SCHEMA = "lmopt.benchmark/1"


@dataclass
class BenchmarkSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    device: str = "cpu"                      # cpu | cuda
    engines: str = "torch,ort,trt"
    precisions: str = "fp32,int8,fp16"
    batch_sizes: str = "1,4"
    short_prompt: int = 16                   # tokens
    long_prompt: int = 256                   # tokens (capped to the context minus --new-tokens)
    new_tokens: int = 32                     # generated per run (1 prefill token + new_tokens-1 decode steps)
    warmup: int = 1                          # repetitions not recorded
    repeats: int = 5                         # recorded repetitions
    threads: int = 0                         # intra-op threads for torch and ORT (0 = library default)
    bandwidth_mb: int = 256                  # buffer size for the copy-bandwidth probe (0 = skip the floor)
    long_batch_sizes: str = ""               # batch sizes that also run the long prompt (empty = all)
    out: str = ""                            # default artifacts/<model>/profile/benchmark-<device>.json


# Named presets: the values a flag does not set. "gpu" is the side-by-side GPU run (README, GPU section).
PRESETS = {
    "gpu": dict(
        device="cuda",
        engines="torch,cudagraph,compiled,ort,ort-gqa",  # names not registered in lmopt.engines are dropped
        precisions="fp16",
        batch_sizes="1,8,32,64",
        short_prompt=128,                    # decode is measured after this prompt
        long_prompt=2048,                    # TTFT of a long prompt (capped to the context)...
        long_batch_sizes="1",                # ...at batch 1 only: 64 x 2048-token prefills measure nothing new
        new_tokens=64,
        warmup=1,
        repeats=3,
        bandwidth_mb=2048,                   # large enough that the copy is not launch-bound on an H200
    ),
}


# rows in table order; the first one available is the "before" baseline for its device. Engines registered later
# (lmopt.engines.ENGINES) that are not listed here follow in the order --engines names them.
def candidate_rows(device: str, engines: list[str] = (), precisions: list[str] = ()) -> list[tuple[str, str]]:
    if device.startswith("cuda"):
        known = [("torch", "fp16"), ("torch", "bf16"), ("cudagraph", "fp16"), ("cudagraph", "bf16"),
                 ("compiled", "fp16"), ("compiled", "bf16"), ("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"),
                 ("ort-gqa", "fp16"), ("ort", "int8"), ("trt", "fp16"), ("trt", "int8")]
    else:
        known = [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("ort", "fp16"), ("torch", "fp16"),
                 ("trt", "fp16"), ("trt", "int8")]
    return known + [(e, p) for e in engines for p in precisions if (e, p) not in known]


def _csv(s: str, what: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty — give a comma-separated list")
    return items


def check_settings(s: BenchmarkSettings) -> tuple[list[str], list[str], list[int]]:
    from lmopt.engines import ENGINES, PRECISIONS

    engines, precisions = _csv(s.engines, "engines"), _csv(s.precisions, "precisions")
    for e in engines:
        if e not in ENGINES:
            raise UserError(f"unknown engine '{e}' — use one of {', '.join(ENGINES)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision '{p}' — use one of {', '.join(PRECISIONS)}")
    try:
        batches = [int(b) for b in _csv(s.batch_sizes, "batch-sizes")]
        long_batches = [int(b) for b in _csv(s.long_batch_sizes, "long-batch-sizes")] if s.long_batch_sizes \
            else batches
    except ValueError:
        raise UserError(f"--batch-sizes and --long-batch-sizes must be integers like 1,4 (got '{s.batch_sizes}', "
                        f"'{s.long_batch_sizes}')") from None
    if any(b <= 0 for b in batches):
        raise UserError(f"--batch-sizes must be > 0 (got '{s.batch_sizes}')")
    if not set(long_batches) <= set(batches):
        raise UserError(f"--long-batch-sizes {s.long_batch_sizes} must be a subset of --batch-sizes {s.batch_sizes}")
    if s.device not in ("cpu", "cuda") and not s.device.startswith("cuda:"):
        raise UserError(f"unknown device '{s.device}' — use cpu or cuda")
    if s.new_tokens <= 0:
        raise UserError(f"max new tokens must be > 0 (got --new-tokens {s.new_tokens})")
    if s.short_prompt <= 0 or s.long_prompt <= 0:
        raise UserError("--short-prompt and --long-prompt must be > 0 tokens")
    if s.repeats <= 0 or s.warmup < 0:
        raise UserError("--repeats must be > 0 and --warmup >= 0")
    return engines, precisions, batches, long_batches


# ---- memory ------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gpu_used_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
    except Exception:  # no torch / no driver: CPU-only numbers
        pass
    return None


def gpu_info() -> dict:
    """The GPU, its driver and clocks (nvidia-smi when present), for the result's `gpu` field."""
    import subprocess

    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}", "torch_cuda": torch.version.cuda}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["driver"], info["max_sm_clock"], info["max_mem_clock"] = [x.strip() for x in q.split(",")]
    except Exception as e:  # nvidia-smi missing or odd output: keep going, say so
        info["driver"] = f"unknown ({type(e).__name__})"
    return info


def copy_bandwidth_gbs(device: str, mb: int, reps: int = 5) -> float | None:
    """Best-of-N copy bandwidth, counting bytes read + written (the convention of STREAM's copy and of
    ENVIRONMENT.md's H200 figure)."""
    if mb <= 0:
        return None
    n = mb * 2**20
    if device.startswith("cuda"):
        import torch

        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        b.copy_(a)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        del a, b
    else:
        import numpy as np

        a = np.ones(n, dtype=np.uint8)
        b = np.empty_like(a)
        np.copyto(b, a)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            np.copyto(b, a)
            best = min(best, time.perf_counter() - t0)
        del a, b
    return 2 * n / best / 1e9


def kv_bytes_per_step(shape: dict, batch: int, context: int, bytes_per: int) -> int:
    """KV cache bytes one decode step reads at `context` cached positions."""
    return 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * context * batch * bytes_per


# ---- statistics --------------------------------------------------------------------------------------------------
def pct(xs, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else None


def stats(xs) -> dict:
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),
            "mean": float(sum(xs) / len(xs)) if xs else None}


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy sequences agree, up to the first divergence counted as all-wrong
    after it (a diverged sequence conditions on different text, so later matches are luck)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / n


# ---- the benchmark -----------------------------------------------------------------------------------------------
def benchmark(*, settings: BenchmarkSettings) -> dict:
    from tqdm import tqdm

    from lmopt.data import builtin_text
    from lmopt.engines import create_engine, trt_unavailable_reason
    from lmopt.generate import SamplingParams, generate
    from lmopt.manifest import machine_info, now_iso, package_versions
    from lmopt.models import load_config, load_tokenizer, model_shape
    from lmopt.paths import check_writable, model_slug, stage_dir

    s = settings
    engines, precisions, batches, long_batches = check_settings(s)
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but torch sees no CUDA device — run on a GPU machine or use --device cpu")
    check_writable(s.artifacts)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    cfg = load_config(s.model)
    shape = model_shape(cfg)
    tok = load_tokenizer(s.model)
    dev_tag = "cuda" if s.device.startswith("cuda") else "cpu"
    out_path = Path(s.out) if s.out else stage_dir(s.artifacts, s.model, "profile", f"benchmark-{dev_tag}.json")

    # prompts: consecutive windows of real text, so every row sees the same, in-vocabulary tokens
    long_len = min(s.long_prompt, shape["max_positions"] - s.new_tokens)
    short_len = min(s.short_prompt, long_len)
    if short_len <= 0:
        raise UserError(f"--new-tokens {s.new_tokens} leaves no room for a prompt in the model's context of "
                        f"{shape['max_positions']} — lower --new-tokens")
    text_ids = tok(builtin_text("eval"))["input_ids"]
    need = max(batches) * long_len
    while len(text_ids) < need:  # the eval text is ~17k tokens; only huge batch x prompt products wrap around
        text_ids = text_ids + text_ids
    prompts = {kind: {b: [text_ids[i * n:(i + 1) * n] for i in range(b)] for b in batches}
               for kind, n in (("short", short_len), ("long", long_len))}
    params = SamplingParams(max_new_tokens=s.new_tokens)  # greedy, no stop tokens: every run is full length

    # rows: load what can run, give a reason for what cannot
    rows: list[dict] = []
    live: dict[int, object] = {}
    wanted = [(e, p) for e, p in candidate_rows(s.device, engines, precisions) if e in engines and p in precisions]
    for e, p in wanted:
        row = {"engine": e, "precision": p, "device": s.device, "status": "skipped", "reason": None}
        rows.append(row)
        if e == "trt":
            reason = trt_unavailable_reason(s.device)
            if reason:
                row["reason"] = reason
                continue
        rss0, gpu0 = rss_mb(), gpu_used_mb()
        try:
            t0 = time.perf_counter()
            # static-cache engines size their cache for the prompt plus this many tokens
            kw = {"max_new_tokens": s.new_tokens} if e == "cudagraph" else {}
            eng = create_engine(e, s.model, precision=p, device=s.device, artifacts=s.artifacts,
                                threads=s.threads or None, **kw)
            row["load_s"] = round(time.perf_counter() - t0, 3)
        except UserError as err:
            row["reason"] = str(err)
            log.info("skip %s %s: %s", e, p, err)
            continue
        info = eng.info
        row.update(status="ok", variant=info.variant, source=info.source, weight_bytes=eng.weight_bytes(),
                   memory={"rss_before_load_mb": round(rss0, 1), "rss_after_load_mb": round(rss_mb(), 1)})
        if gpu0 is not None:
            row["memory"]["gpu_used_before_load_mb"] = round(gpu0, 1)
        log.info("loaded %s %s (%s) in %.2f s", e, p, info.variant, row["load_s"])
        live[len(rows) - 1] = eng
    if not live:
        reasons = "; ".join(f"{r['engine']} {r['precision']}: {r['reason']}" for r in rows) or "no rows selected"
        raise UserError(f"nothing to benchmark ({reasons})")

    # raw samples[row][batch][kind] = {"ttft_s": [...], "step_s": [[...], ...], "total_s": [...], "tokens": [...]}
    for i in live:
        rows[i]["samples"] = {str(b): {k: {"ttft_s": [], "step_s": [], "total_s": []} for k in prompts
                                       if k == "short" or b in long_batches}
                              for b in batches}
        rows[i]["tokens"] = {}
    # other processes' load is the main source of noise on a shared machine: record it next to the numbers
    import os

    load_start = [round(x, 2) for x in os.getloadavg()]
    runs = [(i, b, k) for i in live for b in batches for k in prompts if k == "short" or b in long_batches]
    total = (s.warmup + s.repeats) * len(runs)
    with tqdm(total=total, desc="benchmark", unit="run", disable=None) as bar:
        for rep in range(s.warmup + s.repeats):
            measured = rep >= s.warmup
            for i, b, k in runs:  # interleaved: every row runs once per repetition
                eng = live[i]
                try:
                    out = generate(eng, prompts[k][b], params)
                    eng.synchronize()
                except UserError:
                    raise
                except Exception as err:  # e.g. CUDA out of memory at the largest batch: the other cells go on
                    _record_failure(rows[i], b, k, err)
                    bar.update()
                    continue
                if not measured and rep == s.warmup - 1 or (s.warmup == 0 and rep == 0):
                    mem = rows[i]["memory"]
                    mem["rss_after_warmup_mb"] = max(mem.get("rss_after_warmup_mb", 0), round(rss_mb(), 1))
                    g = gpu_used_mb()
                    if g is not None:
                        mem["gpu_used_after_warmup_mb"] = max(mem.get("gpu_used_after_warmup_mb", 0), round(g, 1))
                if measured:
                    d = rows[i]["samples"][str(b)][k]
                    d["ttft_s"].append(round(out.ttft_s, 7))
                    d["step_s"].append([round(x, 7) for x in out.step_s])
                    d["total_s"].append(round(out.total_s, 7))
                    rows[i]["tokens"].setdefault(f"b{b}-{k}", out.tokens)
                bar.update()
    for eng in live.values():
        eng.close()
    if s.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

    bw = None
    if s.bandwidth_mb:
        with timed(log, "copy-bandwidth probe"):
            bw = copy_bandwidth_gbs(s.device, s.bandwidth_mb)
    baseline = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["summary"] = summarize_row(r, baseline, batches, shape, bw, short_len, long_len, s.new_tokens,
                                         s.device)
            r["memory"]["engine_rss_mb"] = round(r["memory"].get("rss_after_warmup_mb", r["memory"]["rss_after_load_mb"])
                                                 - r["memory"]["rss_before_load_mb"], 1)

    result = {
        "schema": SCHEMA,
        "kind": "benchmark",
        "created": now_iso(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": machine_info(),
        **({"gpu": gpu_info()} if s.device.startswith("cuda") else {}),
        "versions": package_versions("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                                     "onnxruntime-gpu", "tensorrt", "numpy"),
        "model": model_slug(s.model), "model_shape": shape,
        "settings": {**asdict(s), "short_prompt_tokens": short_len, "long_prompt_tokens": long_len,
                     "batch_sizes": batches, "long_batch_sizes": long_batches, "sampling": "greedy",
                     "interleaved": "each repetition runs every row x batch x prompt once, in order"},
        "baseline": {"engine": baseline["engine"], "precision": baseline["precision"]} if baseline else None,
        "copy_bandwidth_gbs": round(bw, 2) if bw else None,
        "peak_rss_process_mb": round(peak_rss_mb(), 1),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()],
                         "cpu_count": os.cpu_count()},
        "definitions": {
            "ttft_s": "prefill of the whole prompt + sampling the first token (host logits)",
            "step_s": "one decode step: forward with KV cache + sampling (host logits)",
            "decode_tokens_per_s": "batch / p50 step latency",
            "e2e_tokens_per_s": "batch x new_tokens / p50 total time of the short-prompt run",
            "agreement_vs_baseline": "greedy tokens equal to the baseline row's up to the first divergence, "
                                     "averaged over rows and prompts",
            "by_prompt": "decode figures of the short- and long-prompt runs apart, each floor at its own mean "
                         "context (prompt + new_tokens / 2)",
            "bandwidth_floor_ms": "(weight bytes + KV bytes at the mean context) / copy bandwidth; weight bytes are "
                                  "the parameters (torch) or the ONNX file (ort), which stores a tied embedding twice, "
                                  "so the ort floor of a tied model is an upper bound",
            "engine_rss_mb": "process RSS growth while this row loaded and ran its warm-up (rows share a process)",
        },
        "rows": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_path)
    log.info("Saving benchmark results to %s", out_path)
    print(render_table(result))
    return result


def _record_failure(row: dict, batch: int, kind: str, err: Exception) -> None:
    """A cell that raised (not a user error): the row keeps its other cells and says what failed where."""
    msg = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    row.setdefault("failed", {})[f"b{batch}-{kind}"] = msg
    log.warning("%s %s batch %d %s prompt failed: %s", row["engine"], row["precision"], batch, kind, msg)
    if "out of memory" in msg.lower():
        import torch

        torch.cuda.empty_cache()


def kv_element_bytes(row: dict) -> int:
    """Bytes per KV-cache element: half precision keeps a half cache, except in ORT graphs that keep FP32 I/O."""
    if row["precision"] in ("fp16", "bf16") and (row["engine"] != "ort" or row.get("variant") == "fp16"):
        return 2
    return 4


def summarize_row(r: dict, baseline: dict | None, batches: list[int], shape: dict, bw: float | None,
                  short_len: int, long_len: int, new_tokens: int, device: str = "cpu") -> dict:
    out = {}
    for b in batches:
        d = r["samples"][str(b)]
        steps = [x for k in d for run in d[k]["step_s"] for x in run]
        if not steps:  # every cell of this batch failed (see the row's "failed")
            out[str(b)] = {"step_s": stats([]), "decode_tokens_per_s": None, "ttft_short_s": stats([]),
                           "ttft_long_s": stats([]), "e2e_tokens_per_s": None}
            continue
        st = stats(steps)
        e2e = stats(d["short"]["total_s"]) if "short" in d else stats([])
        row = {"ttft_short_s": stats(d["short"]["ttft_s"] if "short" in d else []),
               "ttft_long_s": stats(d["long"]["ttft_s"] if "long" in d else []),
               "step_s": st,
               "decode_tokens_per_s": b / st["p50"] if st["p50"] else None,
               "e2e_tokens_per_s": b * new_tokens / e2e["p50"] if e2e["p50"] else None}
        if baseline is not None and baseline is not r and baseline.get("tokens"):
            agr = [agreement(x, y) for key in r["tokens"] if key.startswith(f"b{b}-")
                   for x, y in zip(r["tokens"][key], baseline["tokens"].get(key, []))]
            row["agreement_vs_baseline"] = round(sum(agr) / len(agr), 4) if agr else None
            bs = baseline["summary"][str(b)]["step_s"]["p50"] if "summary" in baseline else None
            row["decode_speedup_vs_baseline"] = round(bs / st["p50"], 3) if bs and st["p50"] else None
        elif baseline is r:
            row["agreement_vs_baseline"] = 1.0
            row["decode_speedup_vs_baseline"] = 1.0
        kvb = kv_element_bytes(r)
        if bw and r.get("weight_bytes"):
            mean_ctx = (short_len + long_len) / 2 + new_tokens / 2
            step_bytes = r["weight_bytes"] + kv_bytes_per_step(shape, b, int(mean_ctx), kvb)
            row["bytes_per_step"] = step_bytes
            row["bandwidth_floor_ms"] = round(step_bytes / (bw * 1e9) * 1e3, 4)
        # the same figures per prompt length: on a GPU the KV cache of a long prompt is a large share of the bytes
        by_prompt = {}
        for k, plen in (("short", short_len), ("long", long_len)):
            runs = d.get(k, {}).get("step_s", [])
            ks = stats([x for run in runs for x in run])
            if not ks["n"]:
                continue
            e = {"prompt_tokens": plen, "step_s": ks, "decode_tokens_per_s": b / ks["p50"],
                 "ttft_s": stats(d[k]["ttft_s"])}
            base_k = (baseline or {}).get("summary", {}).get(str(b), {}).get("by_prompt", {}).get(k)
            if baseline is r:
                e["decode_speedup_vs_baseline"] = 1.0
            elif base_k:
                e["decode_speedup_vs_baseline"] = round(base_k["step_s"]["p50"] / ks["p50"], 3)
            if bw and r.get("weight_bytes"):
                kb = r["weight_bytes"] + kv_bytes_per_step(shape, b, int(plen + new_tokens / 2), kvb)
                e["bytes_per_step"] = kb
                e["bandwidth_floor_ms"] = round(kb / (bw * 1e9) * 1e3, 4)
                e["ratio_to_floor"] = round(ks["p50"] * 1e3 / e["bandwidth_floor_ms"], 3)
            by_prompt[k] = e
        row["by_prompt"] = by_prompt
        out[str(b)] = row
    return out


# ---- the table (also used by profile/update_readme.py) -----------------------------------------------------------
def _ms(x) -> str:
    return "—" if x is None else (f"{x * 1e3:.1f}" if x * 1e3 >= 10 else f"{x * 1e3:.2f}")


def render_table(result: dict, markdown: bool = False) -> str:
    """The "Before vs After" table of one result file: a row per engine x precision x batch that ran, a line per
    row that could not run saying why."""
    s = result["settings"]
    head = ["engine", "precision", "batch", f"TTFT {s['short_prompt_tokens']} tok ms",
            f"TTFT {s['long_prompt_tokens']} tok ms", "decode ms/token p50", "p90", "p99", "decode tok/s",
            "speedup", "agreement", "floor ms", "RSS MB"]
    body, notes = [], []
    for r in result["rows"]:
        if r["status"] != "ok":
            notes.append(f"{r['engine']} {r['precision']}: not run — {r['reason']}")
            continue
        for cell, why in r.get("failed", {}).items():
            notes.append(f"{r['engine']} {r['precision']} {cell}: failed — {why}")
        for b, m in r["summary"].items():
            body.append([r["engine"], f"{r['precision']}" + (f" ({r['variant']})" if r["variant"] not in ("hf", r["precision"]) else ""),
                         b, _ms(m["ttft_short_s"]["p50"]), _ms(m["ttft_long_s"]["p50"]), _ms(m["step_s"]["p50"]),
                         _ms(m["step_s"]["p90"]), _ms(m["step_s"]["p99"]),
                         f"{m['decode_tokens_per_s']:.1f}" if m["decode_tokens_per_s"] else "—",
                         f"{m['decode_speedup_vs_baseline']:.2f}x" if m.get("decode_speedup_vs_baseline") else "—",
                         f"{m['agreement_vs_baseline']:.0%}" if m.get("agreement_vs_baseline") is not None else "—",
                         f"{m['bandwidth_floor_ms']:.2f}" if m.get("bandwidth_floor_ms") else "—",
                         f"{r['memory']['engine_rss_mb']:.0f}"])
    mach = result["machine"]
    where = mach.get("gpu", {}).get("name") if mach.get("gpu") and result["settings"]["device"] != "cpu" \
        else f"{mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpu_count')} cores"
    caption = (f"{result['model']} on {where} — {result['created'][:10]}, "
               f"`{' '.join(result['command'])}`; {s['repeats']} repetitions after {s['warmup']} warm-up, "
               f"{s['new_tokens']} new tokens, greedy; speedup = baseline p50 step / row p50 step "
               f"(baseline {result['baseline']['engine']} {result['baseline']['precision']})"
               + (f"; floor at {result['copy_bandwidth_gbs']} GB/s copy bandwidth" if result.get("copy_bandwidth_gbs")
                  else "")
               + (f"; 1-min load average {result['load_average']['start'][0]} at start, "
                  f"{result['load_average']['end'][0]} at end ({result['load_average']['cpu_count']} cores)"
                  if result.get("load_average") else ""))
    if markdown:
        lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
        lines += [""] + [f"- {n}" for n in notes] if notes else []
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if j >= 2 else str(x).ljust(w)  # noqa: E731
                                for j, (x, w) in enumerate(zip(row, widths)))
    lines = ["Before vs After — " + caption, fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body] + notes
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchmarkSettings()
    p.add_argument("--model", default=d.model, help="tiny (built-in), a preset, a local HF folder or a hub id")
    p.add_argument("--artifacts", default=d.artifacts, help="artifacts root folder")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings (flags given here override them): "
                   + "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items()))
    p.add_argument("--engines", default=d.engines, help="comma-separated engine names (lmopt.engines.ENGINES)")
    p.add_argument("--precisions", default=d.precisions, help="comma-separated subset of fp32,int8,fp16,bf16")
    p.add_argument("--batch-sizes", default=d.batch_sizes, help="comma-separated batch sizes")
    p.add_argument("--long-batch-sizes", default=d.long_batch_sizes,
                   help="batch sizes that also run the long prompt (default: all of --batch-sizes)")
    p.add_argument("--short-prompt", type=int, default=d.short_prompt, help="tokens of the short prompt")
    p.add_argument("--long-prompt", type=int, default=d.long_prompt, help="tokens of the long prompt")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per run")
    p.add_argument("--warmup", type=int, default=d.warmup, help="repetitions run before measuring")
    p.add_argument("--repeats", type=int, default=d.repeats, help="measured repetitions")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads (0 = library default)")
    p.add_argument("--bandwidth-mb", type=int, default=d.bandwidth_mb,
                   help="MB copied by the bandwidth probe for the floor (0 = skip)")
    p.add_argument("--out", default=d.out, help="result file (default artifacts/<model>/profile/benchmark-<device>.json)")
    add_verbosity_args(p)
    return p


def settings_from_args(argv=None) -> tuple[argparse.Namespace, BenchmarkSettings]:
    """Parse the command line; a --preset supplies the values of the flags not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if "engines" in preset:  # only the engines this checkout has
            from lmopt.engines import ENGINES

            preset["engines"] = ",".join(e for e in preset["engines"].split(",") if e in ENGINES)
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args, BenchmarkSettings(**{f.name: getattr(args, f.name) for f in fields(BenchmarkSettings)})


def main(argv=None) -> int:
    args, settings = settings_from_args(argv)
    setup_logging(args)
    benchmark(settings=settings)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
