"""The "before-vs-after" section of results/README.md: one table per committed benchmark result (kind "benchmark",
written by profile/benchmark.py). `render_table` also prints the table at the end of a benchmark run."""
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


BITS = (("fp32", "FP32 / F32"), ("int8", "INT8 / Q8_0"), ("int4", "INT4 / Q4_0"))


def render_vs_llamacpp(result: dict, batch: str = "1") -> str:
    """Our fastest row per bit width side by side with llama.cpp's, from one (interleaved) result: decode ms/token
    p50, the ratio, each against PyTorch FP32, prefill, and the bandwidth floors. Empty without llama.cpp rows."""
    ok = [r for r in result["rows"] if r["status"] == "ok" and batch in r.get("summary", {})]
    if not any(r["engine"] == "llamacpp" for r in ok):
        return ""
    step = lambda r: stat_ms(r["summary"][batch], "step")["p50"]  # noqa: E731
    same = result["settings"]["long_prompt_tokens"] == result["settings"]["short_prompt_tokens"]

    def ttft(r):  # p50 over every prefill of the prompt length (both prompt kinds when they are the same length)
        from lmopt.results import stats

        d = r.get("samples", {}).get(batch, {})
        xs = [x for k in (("short", "long") if same else ("short",)) for x in d.get(k, {}).get("ttft_s", [])]
        return stats(xs, scale=1e3)["p50"] if xs else stat_ms(r["summary"][batch], "ttft_short")["p50"]

    base = next((r for r in ok if r["engine"] == "torch" and r["precision"] == "fp32"), None)
    plen = result["settings"]["short_prompt_tokens"]
    misses = []
    lines = [f"Side by side with llama.cpp (same run, batch {batch}, prompt {plen}; ours = our fastest row of the bit "
             "width; ratio = our ms/token ÷ llama.cpp's, below 1 means ours is faster):", "",
             "| bits (ours / llama.cpp) | ours | ours ms/token | llama.cpp ms/token | ratio | ours × PyTorch FP32 | "
             f"llama.cpp × PyTorch FP32 | ours TTFT {plen} tok ms | llama.cpp TTFT ms | floor ms (ours / llama.cpp) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p, label in BITS:
        ours = [r for r in ok if r["precision"] == p and r["engine"] not in ("llamacpp", "torch")]
        peer = next((r for r in ok if r["precision"] == p and r["engine"] == "llamacpp"), None)
        if not ours or peer is None:
            continue
        best = min(ours, key=step)
        x = lambda r: f"{step(base) / step(r):.2f}x" if base else "—"  # noqa: E731
        fl = lambda r: _ms(r["summary"][batch].get("bandwidth_floor_ms"))  # noqa: E731
        lines.append(f"| {label} | {best['engine']} {best['variant']} | {_ms(step(best))} | {_ms(step(peer))} | "
                     f"{step(best) / step(peer):.2f} | {x(best)} | {x(peer)} | {_ms(ttft(best))} | "
                     f"{_ms(ttft(peer))} | {fl(best)} / {fl(peer)} |")
        if step(best) > 1.1 * step(peer):
            misses.append(f"{label}: ours is {step(best) / step(peer):.2f}x llama.cpp's ms/token "
                          f"({_ms(step(best))} vs {_ms(step(peer))})")
    if misses:
        lines += ["", "Outside 1.1x of llama.cpp: " + "; ".join(misses) + "."]
    return "\n".join(lines)


def render_decode_ops(doc: dict, top: int = 4) -> str:
    """A decode-ops result (profile/decode_ops.py): per row, ms/step, nodes/step and the operator types that take
    the most kernel time."""
    st = doc["settings"]
    lines = [f"Per-operator decode profile (`profile/decode_ops.py`, ONNX Runtime's profiler, {st['threads']} "
             f"threads, prompt {st['prompt']}; profiling slows every node, so compare shares):", "",
             "| engine | precision | decode ms/step | ORT kernels ms/step | nodes/step | top operators (share of kernel "
             "time) |", "|---|---|---:|---:|---:|---|"]
    for r in doc["rows"]:
        ops = ", ".join(f"{op} {v['share']:.0%} ({v['nodes_per_step']:.0f})"
                        for op, v in list(r["ops"].items())[:top])
        lines.append(f"| {r['engine']} | {r['precision']} ({r['variant']}) | {_ms(r['decode_ms_per_step'])} | "
                     f"{_ms(r['kernel_ms_per_step'])} | {r['nodes_per_step']:.0f} | {ops} |")
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    from lmopt.report import collect

    # GPU results have their own section (lmopt.report.gpu)
    docs = [d for d in collect(results_dir, kinds=["benchmark"]) if d.data["settings"].get("device", "cpu") == "cpu"]
    if not docs:
        return "_No committed benchmark results yet: run `make benchmark publish-results readme-tables`._"
    ops = {(d.path.parent.parent.name, d.path.parent.name): d.data for d in collect(results_dir, kinds=["decode-ops"])}
    parts = []
    for d in docs:
        result, tag = d.data, d.path.parent.parent.name
        side = render_vs_llamacpp(result)
        parts.append(f"#### {result['model']} — {tag} ({result['settings']['device']})\n\n"
                     + (side + "\n\n" if side else "")
                     + f"From `{Path(Path(results_dir).name) / d.path.relative_to(results_dir)}`: "
                     + render_table(result, markdown=True))
        prof = ops.pop((tag, d.path.parent.name), None)
        if prof is not None:
            parts.append(render_decode_ops(prof))
    for (tag, model), prof in sorted(ops.items()):  # profiles of models without a benchmark file
        parts.append(f"#### {prof['model']} — {tag}, decode profile\n\n" + render_decode_ops(prof))
    return "\n\n".join(parts)
