"""The "gpu" section of results/README.md, from result files under results/ by their `kind`:
`render(results_dir) -> str`.

  benchmark   (settings.device cuda) written by `profile/benchmark.py --preset gpu`: one table per file
  gpu-suite   the older GPU suite's files (its script was folded into profile/benchmark.py; its committed H200
              figures still render as they were measured)
  profile     (device cuda) the PyTorch-profiler summaries of GPU decode loops
"""
from __future__ import annotations

from pathlib import Path

ENGINE_NAMES = {"torch-generate": "PyTorch eager (HF generate)", "torch-cudagraph": "PyTorch static KV + CUDA graph",
                "ort-cuda": "ONNX Runtime CUDA EP (IO binding)",
                # engine names of lmopt.engines, as profile/benchmark.py records them
                "torch": "PyTorch eager (HF model)", "cudagraph": "PyTorch static KV + CUDA graph",
                "compiled": "compiled decoder (KV slots, CUDA graphs)", "ort": "ONNX Runtime CUDA EP (IO binding)",
                "ort-gqa": "ONNX Runtime CUDA EP, GQA graph, fixed KV buffer + CUDA graph", "trt": "TensorRT"}


def is_gpu_result(d: dict) -> bool:
    return d.get("kind") == "gpu-suite" or (d.get("kind") == "benchmark"
                                           and str(d.get("settings", {}).get("device", "cpu")).startswith("cuda"))


def load(results_dir: str | Path) -> list[dict]:
    from lmopt.report import collect

    return [dict(d.data, _path=str(d.path)) for d in collect(results_dir, kinds=["gpu-suite", "benchmark"])
            if is_gpu_result(d.data)]


def render(results_dir: str | Path) -> str:
    docs = load(results_dir)
    if not docs:
        return ("_No GPU results committed yet — run `python profile/benchmark.py --preset gpu` on a GPU and copy the "
                "JSON to results/._\n")
    out = []
    for d in docs:
        if d["kind"] == "benchmark":
            out.append(render_benchmark(d))
            continue
        g = d["gpu"]
        out.append(f"**{d['model']}** — {g['name']}, driver {g.get('driver')}, CUDA {g.get('torch_cuda')}, "
                   f"torch {d['versions'].get('torch')}, onnxruntime-gpu {d['versions'].get('onnxruntime-gpu')}; "
                   f"{d['created'][:10]}; copy bandwidth {d['copy_bandwidth_gbs']:.0f} GB/s (read+write); "
                   f"`{' '.join(d['command'])}`; data: `{d['_path']}`\n")
        out.append("| engine (FP16) | batch | prompt | TTFT ms | decode ms/token | tokens/s | floor ms/token | × floor "
                   "| vs HF generate | greedy agreement |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = {(r["batch"], r["prompt_len"]): r["decode_ms_per_token"] for r in d["rows"]
                if r["engine"] == "torch-generate"}
        for r in d["rows"]:
            b = base.get((r["batch"], r["prompt_len"]))
            speed = f"{b / r['decode_ms_per_token']:.2f}x" if b else "–"
            agree = r.get("greedy_agreement_vs_torch")
            out.append(f"| {ENGINE_NAMES.get(r['engine'], r['engine'])} | {r['batch']} | {r['prompt_len']} | "
                       f"{r['ttft_ms']:.2f} | {r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
                       f"{r['floor_ms']:.3f} | {r['ratio_to_floor']:.1f} | {speed} | "
                       f"{'–' if agree is None else f'{agree:.0%}'} |")
        b1 = [r for r in d["rows"] if r["batch"] == 1 and r["prompt_len"] == d["settings"]["prompt_len"]]
        base1 = base.get((1, d["settings"]["prompt_len"]))
        if b1 and base1:
            best = min(b1, key=lambda r: r["decode_ms_per_token"])
            out.append(f"\nBatch 1, prompt {best['prompt_len']}: fastest decode is "
                       f"{ENGINE_NAMES.get(best['engine'], best['engine'])} at {best['decode_ms_per_token']:.3f} ms/token "
                       f"= {base1 / best['decode_ms_per_token']:.1f}x HF generate and {best['ratio_to_floor']:.1f}x the "
                       f"bandwidth floor ({best['floor']['bytes'] / 1e9:.2f} GB read per token / "
                       f"{d['copy_bandwidth_gbs']:.0f} GB/s = {best['floor_ms']:.3f} ms).")
        for k, v in d.get("skipped", {}).items():
            out.append(f"\n- not measured: `{k}` — {v}")
        out.append("")
    return "\n".join(out) + "\n" + render_profiles(results_dir)


def render_benchmark(d: dict) -> str:
    """One GPU benchmark file: a row per engine x batch x prompt length, against the bandwidth floor."""
    from lmopt.report import floor_note
    from lmopt.results import floor_bandwidth

    g, v, st = d.get("gpu", {}), d["versions"], d["settings"]
    gbs = floor_bandwidth(d)[0] or 0
    out = [f"**{d['model']}** — {g.get('name', '?')}, driver {g.get('driver')}, CUDA {g.get('torch_cuda')}, "
           f"torch {v.get('torch')}, onnxruntime-gpu {v.get('onnxruntime-gpu')}; {d['created'][:10]}; floor at "
           f"{floor_note(d) or 'no bandwidth measured'}; {st['repeats']} repetitions after {st['warmup']} "
           f"warm-up, {st.get('max_new_tokens')} new tokens, greedy; `{' '.join(d['command'])}`; data: "
           f"`{d['_path']}`\n",
           "| engine | precision | batch | prompt | TTFT ms | decode ms/token | tokens/s | floor ms/token | × floor "
           "| vs baseline | greedy agreement |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best, notes = None, []
    for r in d["rows"]:
        name = ENGINE_NAMES.get(r["engine"], r["engine"])
        if r["status"] != "ok":
            notes.append(f"- not measured: {name} {r['precision']} — {r['reason']}")
            continue
        notes += [f"- failed: {name} {r['precision']} `{cell}` — {why}" for cell, why in r.get("failed", {}).items()]
        for b, m in r["summary"].items():
            for k, e in m.get("by_prompt", {}).items():
                step = e["step_ms"]["p50"]
                floor = e.get("bandwidth_floor_ms")
                speed = e.get("decode_speedup_vs_baseline")
                agree = m.get("agreement_vs_baseline")
                out.append(f"| {name} | {r['precision']} | {b} | {e['prompt_tokens']} | {e['ttft_ms']['p50']:.2f} | "
                           f"{step:.3f} | {e['decode_tokens_per_s']:.0f} | "
                           f"{'–' if floor is None else f'{floor:.3f}'} | "
                           f"{'–' if floor is None else f'{step / floor:.1f}'}"
                           f"{' ⚠ below floor' if e.get('below_floor') else ''} | "
                           f"{'–' if speed is None else f'{speed:.2f}x'} | {'–' if agree is None else f'{agree:.0%}'} |")
                if b == "1" and k == "short" and (best is None or step < best[0]):
                    best = (step, name, e)
    base = next((r for r in d["rows"] if r["status"] == "ok"), None)
    b1 = base and base["summary"].get("1", {}).get("by_prompt", {}).get("short")
    if best and b1 and best[2].get("bandwidth_floor_ms"):
        step, name, e = best
        out.append(f"\nBatch 1, prompt {e['prompt_tokens']}: fastest decode is {name} at {step:.3f} ms/token = "
                   f"{b1['step_ms']['p50'] / step:.1f}x {ENGINE_NAMES.get(base['engine'], base['engine'])} and "
                   f"{step / e['bandwidth_floor_ms']:.1f}x the bandwidth floor ({e['bytes_per_step'] / 1e9:.2f} GB "
                   f"read per token / {gbs:.0f} GB/s = {e['bandwidth_floor_ms']:.3f} ms).")
    notes += [f"- measurement error (faster than the bandwidth floor): {x}" for x in d.get("measurement_errors", [])]
    if notes:
        out += [""] + notes
    out.append("")
    return "\n".join(out)


def render_profiles(results_dir: str | Path) -> str:
    """Where the time goes: the PyTorch-profiler summaries of GPU decode loops (profile/run_nsys_profile.py)."""
    out = []
    from lmopt.report import collect

    for doc in collect(results_dir, kinds=["profile"]):
        p, d = doc.path, doc.data
        if d.get("profiler") != "torch" or not str(d.get("settings", {}).get("device", "")).startswith("cuda"):
            continue
        s, f, st = d["summary"], d["figures"], d["settings"]
        steps = s["nvtx"]["ranges"].get("decode_step", {}).get("count") or 1
        k = s["cuda_kernels"]
        kernel_ms_per_step = k["total_ms"] / (steps + s["nvtx"]["ranges"].get("prefill", {}).get("count", 0))
        batch = st.get("batch_size", st.get("batch"))
        out.append(f"**Where the time goes — {st['model']}, {st['engine']} {st['precision']}, batch {batch}, "
                   f"eager decode** ({d['machine'].get('gpu', {}).get('name', '?')}, {d['created'][:10]}, "
                   f"`{' '.join(d['command'])}`; data: `{p}`)\n")
        out.append(f"- decode step: {f['decode_step_mean_ms']:.2f} ms mean wall, of which GPU kernels "
                   f"{kernel_ms_per_step:.2f} ms ({k['kernels'] / steps:.0f} kernels per step, launch → start "
                   f"{s['launch_to_start']['p50_us']:.1f} µs median): the GPU is idle "
                   f"{1 - kernel_ms_per_step / f['decode_step_mean_ms']:.0%} of the step, waiting for Python and "
                   f"kernel launches — the overhead a CUDA graph removes.")
        d2h = s["memcpy"].get("DtoH")
        if d2h:
            out.append(f"- device → host: {d2h['count']} copies, {d2h['bytes'] / 1e6:.1f} MB (the logits read back "
                       f"for host-side sampling), {d2h['total_ms']:.1f} ms of copy time in total.")
        pvp = d.get("pinned_vs_pageable", {})
        if pvp.get("status") == "measured":
            out.append("\n| host → device copy | bytes | pageable GPU ms | pinned GPU ms | pinned speed-up |")
            out.append("|---|---:|---:|---:|---:|")
            for name, c in pvp["cases"].items():
                out.append(f"| {name} | {c['bytes']:,} | {c['pageable']['gpu_ms_median']:.3f} | "
                           f"{c['pinned']['gpu_ms_median']:.3f} | "
                           f"{c['pageable']['gpu_ms_median'] / c['pinned']['gpu_ms_median']:.2f}x |")
        out.append("")
    return "\n".join(out) + ("\n" if out else "")
