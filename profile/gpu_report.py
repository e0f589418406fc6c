"""Render the README's GPU section from committed gpu-suite result files (results/<machine>/<model>/gpu-suite-*.json,
written by profile/gpu_suite.py). Imported by profile/update_readme.py: `render(results_dir) -> str`."""
from __future__ import annotations

import json
from pathlib import Path

ENGINE_NAMES = {"torch-generate": "PyTorch eager (HF generate)", "torch-cudagraph": "PyTorch static KV + CUDA graph",
                "ort-cuda": "ONNX Runtime CUDA EP (IO binding)"}


def load(results_dir: str | Path) -> list[dict]:
    docs = []
    for p in sorted(Path(results_dir).glob("*/*/gpu-suite-*.json")):
        d = json.loads(p.read_text())
        d["_path"] = str(p)
        docs.append(d)
    return docs


def render(results_dir: str | Path) -> str:
    docs = load(results_dir)
    if not docs:
        return "_No GPU results committed yet — run `python profile/gpu_suite.py` on a GPU and copy the JSON to results/._\n"
    out = []
    for d in docs:
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
        for k, v in d.get("skipped", {}).items():
            out.append(f"\n- not measured: `{k}` — {v}")
        out.append("")
    return "\n".join(out) + "\n"
