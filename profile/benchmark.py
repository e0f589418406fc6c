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
replayed as an ONNX Runtime CUDA graph (`ort-gqa`, from `--attention gqa`), at batch 1/8/32/64 with a 128-token
prompt, plus TTFT of a 2048-token prompt at batch 1; flags given on the command line override the preset's values.

Reads:  artifacts/<model>/export/fp32/manifest.json (+ model.onnx), artifacts/<model>/quantize/*/manifest.json
        (INT8/FP16 graphs, found by the precision and target their manifests declare), TensorRT engines through
        lmopt.engines (when TensorRT is installed), the built-in eval text (data/eval.txt) for prompts.
Writes: artifacts/<model>/profile/benchmark-<device>.json (or --out): machine, versions, command, settings, raw
        samples per row/batch/prompt, summary; prints the "Before vs After" table.

What is measured, per row (engine x precision) and batch size, with greedy generation of --max-new-tokens tokens:
  - TTFT (prefill + first token) of a short and a long prompt;
  - per-token decode latency (each decode step: forward + sampling, host logits) and decode tokens/s
    (batch / step latency), p50/p90/p99 over every step of every measured repetition;
  - peak memory: the process RSS (rows share one process, so the engine's own share is the RSS growth while it
    loaded and ran its warm-up) and, on CUDA, device memory in use;
  - greedy agreement of every row's tokens with the baseline row (torch fp32 on CPU, torch fp16 on CUDA);
  - decode figures per prompt length as well (`by_prompt`), each with its own bandwidth floor.
Rows are interleaved inside each repetition (rep 1: A B C, rep 2: A B C, ...) after --warmup repetitions, so that
load from other processes on a shared machine hits every row alike and the ratios stay meaningful.
The memory-bandwidth floor (weights + KV cache bytes read per decode step / the machine's read bandwidth, measured
in the same run with every core's thread) is the fastest a memory-bound decode step could be on this machine; a row
whose p50 step beats it (with more bytes than the last-level cache holds) is flagged as a measurement error
(`below_floor`, `measurement_errors`), never reported as a win.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("benchmark")


@dataclass
class BenchmarkSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    device: str = "cpu"                      # cpu or cuda
    preset: str = ""                         # named settings (gpu); flags given on the command line override them
    engines: str = "torch,ort,trt"           # comma-separated engine names (lmopt.engines.ENGINES)
    precisions: str = "fp32,int8,fp16"       # comma-separated subset of fp32,int8,fp16,bf16
    batch_sizes: str = "1,4"                 # comma-separated batch sizes
    short_prompt: int = 16                   # tokens of the short prompt
    long_prompt: int = 256                   # tokens (capped to the context minus --max-new-tokens)
    max_new_tokens: int = 32                    # generated per run (1 prefill token + max_new_tokens-1 decode steps)
    warmup: int = 1                          # repetitions run before measuring
    repeats: int = 5                         # recorded repetitions
    threads: int = 0                         # intra-op threads for torch and ORT (0 = library default)
    bandwidth_mb: int = 256                  # buffer size for the read- and copy-bandwidth probes (0 = skip the floor)
    long_batch_sizes: str = ""               # batch sizes that also run the long prompt (default: all)
    pause_s: float = 0.3                     # idle seconds before each run: the previous row's thread pool stops spinning
    out: str = ""                            # result file (default artifacts/<model>/profile/benchmark-<device>.json)
    int8_variants: str = ""                  # ort int8 rows: comma-separated stage-2 variants (default: the default)


# Named presets: the values of the flags a command line does not give. "gpu" is the side-by-side GPU run
# (results/README.md, GPU).
PRESETS = {
    "gpu": dict(
        device="cuda",
        engines="torch,cudagraph,compiled,ort,ort-gqa",  # names not registered in lmopt.engines are dropped
        precisions="fp16",
        batch_sizes="1,8,32,64",
        short_prompt=128,                    # decode is measured after this prompt
        long_prompt=2048,                    # TTFT of a long prompt (capped to the context)...
        long_batch_sizes="1",                # ...at batch 1 only: 64 x 2048-token prefills measure nothing new
        max_new_tokens=64,
        warmup=1,
        repeats=3,
        bandwidth_mb=2048,                   # large enough that the probes are not launch-bound on an H200
    ),
}


# rows in table order; the first one available is the "before" baseline for its device. Engines registered later
# (lmopt.engines.ENGINES) that are not listed here follow in the order --engines names them.
def candidate_rows(device: str, engines=(), precisions=()) -> list[tuple[str, str]]:
    if device.startswith("cuda"):
        known = [("torch", "fp16"), ("torch", "bf16"), ("cudagraph", "fp16"), ("cudagraph", "bf16"),
                 ("compiled", "fp16"), ("compiled", "bf16"), ("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"),
                 ("ort-gqa", "fp16"), ("ort", "int8"), ("trt", "fp16"), ("trt", "int8")]
    else:
        known = [("torch", "fp32"), ("ort", "fp32"), ("ort-gqa", "fp32"), ("ort", "int8"), ("ort-gqa", "int8"),
                 ("ort", "int4"), ("ort-gqa", "int4"), ("ort", "fp16"), ("torch", "fp16"), ("trt", "fp16"),
                 ("trt", "int8"), ("llamacpp", "fp32"), ("llamacpp", "int8"), ("llamacpp", "int4")]
    return known + [(e, p) for e in engines for p in precisions if (e, p) not in known]


def _csv(s: str, what: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty — give a comma-separated list")
    return items


def check_settings(s: BenchmarkSettings) -> tuple[list[str], list[str], list[int], list[int]]:
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
    if s.max_new_tokens <= 0:
        raise UserError(f"max new tokens must be > 0 (got --max-new-tokens {s.max_new_tokens})")
    if s.short_prompt <= 0 or s.long_prompt <= 0:
        raise UserError("--short-prompt and --long-prompt must be > 0 tokens")
    if s.repeats <= 0 or s.warmup < 0:
        raise UserError("--repeats must be > 0 and --warmup >= 0")
    if s.pause_s < 0:
        raise UserError("--pause-s must be >= 0 seconds")
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
    from lmopt.models import load_config, load_tokenizer, model_shape
    from lmopt.results import copy_bandwidth_gbs, envelope, read_bandwidth_gbs, versions, write_json
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
    long_len = min(s.long_prompt, shape["max_positions"] - s.max_new_tokens)
    short_len = min(s.short_prompt, long_len)
    if short_len <= 0:
        raise UserError(f"--max-new-tokens {s.max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{shape['max_positions']} — lower --max-new-tokens")
    text_ids = tok(builtin_text("eval"))["input_ids"]
    need = max(batches) * long_len
    while len(text_ids) < need:  # the eval text is ~17k tokens; only huge batch x prompt products wrap around
        text_ids = text_ids + text_ids
    prompts = {kind: {b: [text_ids[i * n:(i + 1) * n] for i in range(b)] for b in batches}
               for kind, n in (("short", short_len), ("long", long_len))}
    params = SamplingParams(max_new_tokens=s.max_new_tokens)  # greedy, no stop tokens: every run is full length

    # rows: load what can run, give a reason for what cannot
    rows: list[dict] = []
    live: dict[int, object] = {}
    wanted = [(e, p, None) for e, p in candidate_rows(s.device, engines, precisions)
              if e in engines and p in precisions]
    picks = _csv(s.int8_variants, "int8-variants") if s.int8_variants else []
    if picks:   # one ort int8 row per named graph (e.g. today's INT8 graph and its smoothed twin)
        at = next((i for i, w in enumerate(wanted) if w[:2] == ("ort", "int8")), len(wanted))
        wanted = wanted[:at] + [("ort", "int8", v) for v in picks] + [w for w in wanted[at:] if w[:2] != ("ort", "int8")]
    for e, p, pick in wanted:
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
            kw = {"max_new_tokens": s.max_new_tokens} if e == "cudagraph" else {}
            if pick:
                kw["variant"] = pick
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
    # the read probe runs before and after the rows; the floor takes the faster (a busy moment only lowers it)
    probe_before = read_bandwidth_gbs(s.device, s.bandwidth_mb << 20) if s.bandwidth_mb else None
    runs = [(i, b, k) for i in live for b in batches for k in prompts if k == "short" or b in long_batches]
    total = (s.warmup + s.repeats) * len(runs)
    with tqdm(total=total, desc="benchmark", unit="run", disable=None) as bar:
        for rep in range(s.warmup + s.repeats):
            measured = rep >= s.warmup
            for i, b, k in runs:  # interleaved: every row runs once per repetition
                eng = live[i]
                # ONNX Runtime's and llama.cpp's worker threads spin after a run; without a pause they hold the cores
                # while the next row (another engine) prefills, and bill it tens of ms (docs/ENVIRONMENT.md)
                time.sleep(s.pause_s)
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

    bw, probe, copy_bw = None, None, None
    if s.bandwidth_mb:
        with timed(log, "bandwidth probes"):
            after = read_bandwidth_gbs(s.device, s.bandwidth_mb << 20)
            copy_bw = copy_bandwidth_gbs(s.device, s.bandwidth_mb << 20)
        probe = dict(max(probe_before, after, key=lambda p: p["gbs"]),
                     before_and_after_gbs=[probe_before["gbs"], after["gbs"]])
        bw = probe["gbs"]
        log.info("read bandwidth %.1f GB/s (%s threads), copy %.1f GB/s (read + write)", bw,
                 probe["threads"] or "device", copy_bw)
    baseline = next((r for r in rows if r["status"] == "ok"), None)
    llc = (probe or {}).get("llc_bytes")
    for r in rows:
        if r["status"] == "ok":
            r["summary"] = summarize_row(r, baseline, batches, shape, bw, short_len, long_len, s.max_new_tokens,
                                         llc)
            r["memory"]["engine_rss_mb"] = round(r["memory"].get("rss_after_warmup_mb", r["memory"]["rss_after_load_mb"])
                                                 - r["memory"]["rss_before_load_mb"], 1)
    errors = measurement_errors(rows)
    for e in errors:
        log.warning("measurement error: %s", e)

    result = envelope(
        "benchmark",
        versions=versions("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
                          "tensorrt", "numpy"),
        settings={**asdict(s), "short_prompt_tokens": short_len, "long_prompt_tokens": long_len,
                  "batch_sizes": batches, "long_batch_sizes": long_batches, "sampling": "greedy",
                  "interleaved": "each repetition runs every row x batch x prompt once, in order, "
                                 f"each run after {s.pause_s:g} s idle"},
        **({"gpu": gpu_info()} if s.device.startswith("cuda") else {}),
        model=model_slug(s.model), model_shape=shape,
        baseline={"engine": baseline["engine"], "precision": baseline["precision"]} if baseline else None,
        read_bandwidth_gbs=bw, read_bandwidth_probe=probe,
        copy_bandwidth_gbs=round(copy_bw, 2) if copy_bw else None,
        measurement_errors=errors,
        peak_rss_process_mb=round(peak_rss_mb(), 1),
        load_average={"start": load_start, "end": [round(x, 2) for x in os.getloadavg()],
                      "cpu_count": os.cpu_count()},
        definitions={
            "ttft_ms": "prefill of the whole prompt + sampling the first token (host logits); raw samples in "
                       "seconds (ttft_s)",
            "step_ms": "one decode step: forward with KV cache + sampling (host logits); raw samples in seconds "
                       "(step_s)",
            "decode_tokens_per_s": "batch / p50 step latency",
            "e2e_tokens_per_s": "batch x max_new_tokens / p50 total time of the short-prompt run",
            "agreement_vs_baseline": "greedy tokens equal to the baseline row's up to the first divergence, "
                                     "averaged over rows and prompts",
            "by_prompt": "decode figures of the short- and long-prompt runs apart, each floor at its own mean "
                         "context (prompt + max_new_tokens / 2)",
            "bandwidth_floor_ms": "lmopt.results.step_floor: (engine weight bytes + KV bytes at the mean context) / "
                                  "read bandwidth (read_bandwidth_gbs: a sum over a buffer larger than the "
                                  "last-level cache, every core's thread); weight bytes leave out embedding tables "
                                  "a step only gathers rows from (ONNX: initializers read by Gather nodes only; "
                                  "GGUF: token_embd when the file has a separate output matrix)",
            "below_floor": "the p50 step is faster than its floor while its bytes exceed the last-level cache: a "
                           "measurement error to fix (listed in measurement_errors), not a win",
            "copy_bandwidth_gbs": "bytes read + written per second by a copy (STREAM's convention), for reference",
            "engine_rss_mb": "process RSS growth while this row loaded and ran its warm-up (rows share a process)",
        },
        rows=rows,
    )
    write_json(out_path, result)
    log.info("Saving benchmark results to %s", out_path)
    from lmopt.report.benchmark import render_table

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
    """Bytes per KV-cache element: half precision keeps a half cache, except ORT graphs with FP32 cache I/O."""
    if row["precision"] in ("fp16", "bf16") and (row["engine"] != "ort" or row.get("variant") == "fp16"):
        return 2
    return 4


def measurement_errors(rows: list[dict]) -> list[str]:
    """One line per row x batch (x prompt) whose p50 step beats its bandwidth floor."""
    out = []
    for r in rows:
        for b, m in r.get("summary", {}).items():
            cells = [("", m)] + [(f" {k} prompt", e) for k, e in m.get("by_prompt", {}).items()]
            for where, c in cells:
                if c.get("below_floor"):
                    out.append(f"{r['engine']} {r['precision']} batch {b}{where}: p50 step "
                               f"{c['step_ms']['p50']:.3f} ms < floor {c['bandwidth_floor_ms']:.3f} ms "
                               f"({c['bytes_per_step'] / 1e6:.1f} MB per step)")
    return out


def summarize_row(r: dict, baseline: dict | None, batches: list[int], shape: dict, bw: float | None,
                  short_len: int, long_len: int, new_tokens: int, llc: int | None = None) -> dict:
    from lmopt.results import below_floor, stats, step_floor

    out = {}
    kvb = kv_element_bytes(r)
    for b in batches:
        d = r["samples"][str(b)]
        st = stats([x for k in d for run in d[k]["step_s"] for x in run], scale=1e3)
        if not st["count"]:  # every cell of this batch failed (see the row's "failed")
            out[str(b)] = {"step_ms": st, "ttft_short_ms": stats([]), "ttft_long_ms": stats([]),
                           "decode_tokens_per_s": None, "e2e_tokens_per_s": None, "by_prompt": {}}
            continue
        e2e = stats(d["short"]["total_s"], scale=1e3) if "short" in d else stats([])
        row = {"ttft_short_ms": stats(d["short"]["ttft_s"] if "short" in d else [], scale=1e3),
               "ttft_long_ms": stats(d["long"]["ttft_s"] if "long" in d else [], scale=1e3),
               "step_ms": st,
               "decode_tokens_per_s": round(b / (st["p50"] / 1e3), 2) if st["p50"] else None,
               "e2e_tokens_per_s": round(b * new_tokens / (e2e["p50"] / 1e3), 2) if e2e["p50"] else None}
        if baseline is not None and baseline is not r and baseline.get("tokens"):
            agr = [agreement(x, y) for key in r["tokens"] if key.startswith(f"b{b}-")
                   for x, y in zip(r["tokens"][key], baseline["tokens"].get(key, []))]
            row["agreement_vs_baseline"] = round(sum(agr) / len(agr), 4) if agr else None
            bs = baseline["summary"][str(b)]["step_ms"]["p50"] if "summary" in baseline else None
            row["decode_speedup_vs_baseline"] = round(bs / st["p50"], 3) if bs and st["p50"] else None
        elif baseline is r:
            row["agreement_vs_baseline"] = 1.0
            row["decode_speedup_vs_baseline"] = 1.0
        if bw and r.get("weight_bytes"):
            mean_ctx = (short_len + long_len) / 2 + new_tokens / 2
            fl = step_floor(r["weight_bytes"], shape, b, int(mean_ctx), kvb, bw)
            row["bytes_per_step"] = fl["bytes"]
            row["bandwidth_floor_ms"] = fl["floor_ms"]
            row["below_floor"] = below_floor(st["p50"], fl, llc)
        # the same figures per prompt length: on a GPU the KV cache of a long prompt is a large share of the bytes
        by_prompt = {}
        for k, plen in (("short", short_len), ("long", long_len)):
            ks = stats([x for run in d.get(k, {}).get("step_s", []) for x in run], scale=1e3)
            if not ks["count"]:
                continue
            e = {"prompt_tokens": plen, "step_ms": ks, "decode_tokens_per_s": round(b / (ks["p50"] / 1e3), 2),
                 "ttft_ms": stats(d[k]["ttft_s"], scale=1e3)}
            base_k = (baseline or {}).get("summary", {}).get(str(b), {}).get("by_prompt", {}).get(k)
            if baseline is r:
                e["decode_speedup_vs_baseline"] = 1.0
            elif base_k:
                e["decode_speedup_vs_baseline"] = round(base_k["step_ms"]["p50"] / ks["p50"], 3)
            if bw and r.get("weight_bytes"):
                fl = step_floor(r["weight_bytes"], shape, b, int(plen + new_tokens / 2), kvb, bw)
                e["bytes_per_step"] = fl["bytes"]
                e["bandwidth_floor_ms"] = fl["floor_ms"]
                e["ratio_to_floor"] = round(ks["p50"] / fl["floor_ms"], 3)
                e["below_floor"] = below_floor(ks["p50"], fl, llc)
            by_prompt[k] = e
        row["by_prompt"] = by_prompt
        out[str(b)] = row
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, BenchmarkSettings, choices={"preset": ["", *PRESETS]})
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
    return args, cli.settings_from(BenchmarkSettings, args)


def main(argv=None) -> int:
    args, settings = settings_from_args(argv)
    setup_logging(args)
    benchmark(settings=settings)
    return 0


if __name__ == "__main__":
    cli.run(main)
