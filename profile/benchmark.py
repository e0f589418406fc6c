"""Offline "Before vs After" benchmark: every engine x precision available here, through one generation loop.

    python profile/benchmark.py --model tiny                        # CPU rows: torch fp32, ort fp32/int8/fp16
    python profile/benchmark.py --model gpt2-124m --batch-sizes 1 --engines torch,ort --precisions fp32,int8
    python profile/benchmark.py --model llama-1b --device cuda      # GPU rows: torch fp16, ort cuda, trt fp16/int8
    make benchmark MODEL=gpt2-124m

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
  - greedy agreement of every row's tokens with the baseline row (torch fp32 on CPU, torch fp16 on CUDA).
Rows are interleaved inside each repetition (rep 1: A B C, rep 2: A B C, ...) after --warmup repetitions, so that
load from other processes on a shared machine hits every row alike and the ratios stay meaningful.
The memory-bandwidth floor (weights + KV cache bytes read per decode step / measured copy bandwidth) is the
fastest a memory-bound decode step could be on this machine.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, timed

log = get_logger("benchmark")


@dataclass
class BenchmarkSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    device: str = "cpu"                      # cpu or cuda
    engines: str = "torch,ort,trt"           # comma-separated subset of torch,ort,trt
    precisions: str = "fp32,int8,fp16"       # comma-separated subset of fp32,int8,fp16
    batch_sizes: str = "1,4"                 # comma-separated batch sizes
    short_prompt: int = 16                   # tokens of the short prompt
    long_prompt: int = 256                   # tokens (capped to the context minus --max-new-tokens)
    max_new_tokens: int = 32                    # generated per run (1 prefill token + max_new_tokens-1 decode steps)
    warmup: int = 1                          # repetitions run before measuring
    repeats: int = 5                         # recorded repetitions
    threads: int = 0                         # intra-op threads for torch and ORT (0 = library default)
    bandwidth_mb: int = 256                  # buffer size for the copy-bandwidth probe (0 = skip the floor)
    out: str = ""                            # result file (default artifacts/<model>/profile/benchmark-<device>.json)


# rows in table order; the first one available is the "before" baseline for its device
def candidate_rows(device: str) -> list[tuple[str, str]]:
    if device.startswith("cuda"):
        return [("torch", "fp16"), ("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8"),
                ("trt", "fp16"), ("trt", "int8")]
    return [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("ort", "fp16"), ("torch", "fp16"),
            ("trt", "fp16"), ("trt", "int8")]


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
    except ValueError:
        raise UserError(f"--batch-sizes must be integers like 1,4 (got '{s.batch_sizes}')") from None
    if any(b <= 0 for b in batches):
        raise UserError(f"--batch-sizes must be > 0 (got '{s.batch_sizes}')")
    if s.device not in ("cpu", "cuda") and not s.device.startswith("cuda:"):
        raise UserError(f"unknown device '{s.device}' — use cpu or cuda")
    if s.max_new_tokens <= 0:
        raise UserError(f"max new tokens must be > 0 (got --max-new-tokens {s.max_new_tokens})")
    if s.short_prompt <= 0 or s.long_prompt <= 0:
        raise UserError("--short-prompt and --long-prompt must be > 0 tokens")
    if s.repeats <= 0 or s.warmup < 0:
        raise UserError("--repeats must be > 0 and --warmup >= 0")
    return engines, precisions, batches


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
    from lmopt.results import copy_bandwidth_gbs, envelope, versions, write_json
    from lmopt.paths import check_writable, model_slug, stage_dir

    s = settings
    engines, precisions, batches = check_settings(s)
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
    wanted = [(e, p) for e, p in candidate_rows(s.device) if e in engines and p in precisions]
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
            eng = create_engine(e, s.model, precision=p, device=s.device, artifacts=s.artifacts,
                                threads=s.threads or None)
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
        rows[i]["samples"] = {str(b): {k: {"ttft_s": [], "step_s": [], "total_s": []} for k in prompts}
                              for b in batches}
        rows[i]["tokens"] = {}
    # other processes' load is the main source of noise on a shared machine: record it next to the numbers
    import os

    load_start = [round(x, 2) for x in os.getloadavg()]
    runs = [(i, b, k) for i in live for b in batches for k in prompts]
    total = (s.warmup + s.repeats) * len(runs)
    with tqdm(total=total, desc="benchmark", unit="run", disable=None) as bar:
        for rep in range(s.warmup + s.repeats):
            measured = rep >= s.warmup
            for i, b, k in runs:  # interleaved: every row runs once per repetition
                eng = live[i]
                out = generate(eng, prompts[k][b], params)
                eng.synchronize()
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

    bw = None
    if s.bandwidth_mb:
        with timed(log, "copy-bandwidth probe"):
            bw = copy_bandwidth_gbs(s.device, s.bandwidth_mb << 20)
    baseline = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["summary"] = summarize_row(r, baseline, batches, shape, bw, short_len, long_len, s.max_new_tokens)
            r["memory"]["engine_rss_mb"] = round(r["memory"].get("rss_after_warmup_mb", r["memory"]["rss_after_load_mb"])
                                                 - r["memory"]["rss_before_load_mb"], 1)

    result = envelope(
        "benchmark",
        versions=versions("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"),
        settings={**asdict(s), "short_prompt_tokens": short_len, "long_prompt_tokens": long_len,
                  "batch_sizes": batches, "sampling": "greedy",
                  "interleaved": "each repetition runs every row x batch x prompt once, in order"},
        model=model_slug(s.model), model_shape=shape,
        baseline={"engine": baseline["engine"], "precision": baseline["precision"]} if baseline else None,
        copy_bandwidth_gbs=round(bw, 2) if bw else None,
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
            "bandwidth_floor_ms": "lmopt.results.step_floor: (engine weight bytes + KV bytes at the mean context) / "
                                  "copy bandwidth; ort's weight bytes are the ONNX file, which stores a tied "
                                  "embedding twice, so the ort floor of a tied model is an upper bound",
            "engine_rss_mb": "process RSS growth while this row loaded and ran its warm-up (rows share a process)",
        },
        rows=rows,
    )
    write_json(out_path, result)
    log.info("Saving benchmark results to %s", out_path)
    from lmopt.report.benchmark import render_table

    print(render_table(result))
    return result


def summarize_row(r: dict, baseline: dict | None, batches: list[int], shape: dict, bw: float | None,
                  short_len: int, long_len: int, new_tokens: int) -> dict:
    from lmopt.results import stats, step_floor

    out = {}
    for b in batches:
        d = r["samples"][str(b)]
        st = stats([x for k in d for run in d[k]["step_s"] for x in run], scale=1e3)
        e2e = stats(d["short"]["total_s"], scale=1e3)
        row = {"ttft_short_ms": stats(d["short"]["ttft_s"], scale=1e3),
               "ttft_long_ms": stats(d["long"]["ttft_s"], scale=1e3),
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
            kv_bytes = 2 if r["precision"] == "fp16" and r["engine"] != "ort" else 4
            mean_ctx = (short_len + long_len) / 2 + new_tokens / 2
            fl = step_floor(r["weight_bytes"], shape, b, int(mean_ctx), kv_bytes, bw)
            row["bytes_per_step"] = fl["bytes"]
            row["bandwidth_floor_ms"] = fl["floor_ms"]
        out[str(b)] = row
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, BenchmarkSettings)
    return p


main = cli.main_for(build_parser, BenchmarkSettings, benchmark)


if __name__ == "__main__":
    cli.run(main)
