"""The README "headline" section: per machine and model, the fastest batch-1 decode among the committed benchmark
results (kind "benchmark", profile/benchmark.py), with its speedup over that run's baseline and a link to the file.
Every other table is in results/README.md."""
from __future__ import annotations

from pathlib import Path

from lmopt.report import collect, stat_ms


def render(results_dir: Path) -> str:
    best: dict[tuple[str, str], tuple] = {}
    for doc in collect(results_dir, ["benchmark"]):
        d = doc.data
        tag = doc.path.relative_to(results_dir).parts[0]
        for r in d.get("rows", []):
            m = r.get("summary", {}).get("1") if r.get("status") == "ok" else None
            if not m or not m.get("decode_tokens_per_s") or (m.get("agreement_vs_baseline") or 0) < 0.5:
                continue  # a row whose tokens disagree with the baseline is no headline
            key = (tag, d["model"])
            if key not in best or m["decode_tokens_per_s"] > best[key][1]["decode_tokens_per_s"]:
                best[key] = (r, m, d, doc.path)
    lines = ["| machine | model | fastest engine (precision) | decode ms/token p50 | tokens/s | vs baseline | "
             "date | result |", "|---|---|---|---|---|---|---|---|"]
    for (tag, model), (r, m, d, path) in sorted(best.items()):
        mach = d["machine"]
        where = (mach["gpu"]["name"] if mach.get("gpu") and d["settings"].get("device") != "cpu"
                 else f"{mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpu_count')} cores")
        base = d.get("baseline", {})
        speed = (f"{m['decode_speedup_vs_baseline']:.2f}x {base.get('engine')} {base.get('precision')}"
                 if m.get("decode_speedup_vs_baseline") else "—")
        rel = path.relative_to(results_dir.parent) if results_dir.parent != Path("") else path
        lines.append(f"| {where} | {model} | {r['engine']} ({r['precision']}) | {stat_ms(m, 'step')['p50']:.2f} | "
                     f"{m['decode_tokens_per_s']:.0f} | {speed} | {d['created'][:10]} | [{path.name}]({rel}) |")
    return "\n".join(lines)
