"""The README "before-vs-after" section: one table per committed benchmark result (kind "benchmark", written by
profile/benchmark.py). `render_table` also prints the table at the end of a benchmark run."""
from __future__ import annotations

from pathlib import Path

from lmopt.report import floor_note, stat_ms


def _ms(x) -> str:
    return "—" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


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
                         b, _ms(stat_ms(m, "ttft_short")["p50"]), _ms(stat_ms(m, "ttft_long")["p50"]),
                         _ms(stat_ms(m, "step")["p50"]), _ms(stat_ms(m, "step")["p90"]), _ms(stat_ms(m, "step")["p99"]),
                         f"{m['decode_tokens_per_s']:.1f}" if m["decode_tokens_per_s"] else "—",
                         f"{m['decode_speedup_vs_baseline']:.2f}x" if m.get("decode_speedup_vs_baseline") else "—",
                         f"{m['agreement_vs_baseline']:.0%}" if m.get("agreement_vs_baseline") is not None else "—",
                         (f"{m['bandwidth_floor_ms']:.2f}" + (" ⚠ below floor" if m.get("below_floor") else ""))
                         if m.get("bandwidth_floor_ms") else "—",
                         f"{r['memory']['engine_rss_mb']:.0f}"])
    errors = [f"measurement error (faster than the bandwidth floor): {e}"
              for e in result.get("measurement_errors", [])]
    mach = result["machine"]
    where = mach.get("gpu", {}).get("name") if mach.get("gpu") and result["settings"]["device"] != "cpu" \
        else f"{mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpu_count')} cores"
    caption = (f"{result['model']} on {where} — {result['created'][:10]}, "
               f"`{' '.join(result['command'])}`; {s['repeats']} repetitions after {s['warmup']} warm-up, "
               f"{s.get('max_new_tokens', s.get('new_tokens'))} new tokens, greedy; "
               "speedup = baseline p50 step / row p50 step "
               f"(baseline {result['baseline']['engine']} {result['baseline']['precision']})"
               + (f"; floor at {floor_note(result)}" if floor_note(result) else "")
               + (f"; 1-min load average {result['load_average']['start'][0]} at start, "
                  f"{result['load_average']['end'][0]} at end ({result['load_average']['cpu_count']} cores)"
                  if result.get("load_average") else ""))
    if markdown:
        lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
        lines += [""] + [f"- {n}" for n in notes + errors] if notes or errors else []
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if j >= 2 else str(x).ljust(w)  # noqa: E731
                                for j, (x, w) in enumerate(zip(row, widths)))
    lines = ["Before vs After — " + caption, fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body] + notes + errors
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    from lmopt.report import collect

    # GPU results have their own section (lmopt.report.gpu)
    docs = [d for d in collect(results_dir, kinds=["benchmark"]) if d.data["settings"].get("device", "cpu") == "cpu"]
    if not docs:
        return "_No committed benchmark results yet: run `make benchmark publish-results readme-tables`._"
    parts = []
    for d in docs:
        result, tag = d.data, d.path.parent.parent.name
        parts.append(f"#### {result['model']} — {tag} ({result['settings']['device']})\n\n"
                     f"From `{Path(Path(results_dir).name) / d.path.relative_to(results_dir)}`: "
                     + render_table(result, markdown=True))
    return "\n\n".join(parts)
