"""What notebooks/latency_analysis.ipynb needs besides plotting: find the result files of one model and machine,
describe where each came from (machine, date, command), and save figures that are checked to hold data.

The notebook reads result files only — never runs a model. Inputs, by kind:
  benchmark  profile/benchmark.py            -> artifacts/<model>/profile/benchmark-<device>.json
  serving    perf_analyzer / load generator  -> artifacts/<model>/profile/serving-*.json
  profile    profile/run_nsys_profile.py     -> a summary JSON under artifacts/<model>/profile/
  accuracy   convert/quantize_model.py, convert/convert_fp16.py -> artifacts/<model>/quantize/*/manifest.json
With MACHINE set, result JSON comes from the committed results/<machine>/<model>/ instead of the artifacts tree.
Benchmark files of other machines (`profile/benchmark.py --preset gpu` on a GPU) and the older GPU suite's committed
files (results/*/<model>/gpu-suite-*.json, kind "gpu-suite") are the "GPU next to CPU" records.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmopt.report import stat_ms

# kind -> make target that produces it (named in the notes shown for missing inputs)
MAKE_TARGET = {"benchmark": "benchmark", "serving": "serve-bench", "profile": "profile", "accuracy": "quantize fp16"}


@dataclass
class Params:
    model: str = "tiny"
    artifacts: str = "artifacts"
    results: str = "results"
    machine: str = ""            # "" = this machine's artifacts tree; else a results/<machine> tag
    report_dir: str = ""         # where figures go; default artifacts/<model>/report

    @classmethod
    def from_env(cls) -> "Params":
        d = cls()
        p = cls(model=os.environ.get("LMOPT_MODEL", d.model), artifacts=os.environ.get("LMOPT_ARTIFACTS", d.artifacts),
                results=os.environ.get("LMOPT_RESULTS", d.results), machine=os.environ.get("LMOPT_MACHINE", d.machine),
                report_dir=os.environ.get("LMOPT_REPORT_DIR", d.report_dir))
        if not p.report_dir:
            p.report_dir = str(Path(p.artifacts) / slug(p.model) / "report")
        return p


def slug(model: str) -> str:
    from lmopt.paths import model_slug

    return model_slug(model)


@dataclass
class Source:
    kind: str
    path: Path
    doc: dict


@dataclass
class Inputs:
    params: Params
    found: dict[str, list[Source]] = field(default_factory=dict)
    other_machines: list[Source] = field(default_factory=list)   # benchmarks of other machines, GPU suites
    searched: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str) -> list[Source]:
        return self.found.get(kind, [])


# result kind (the envelope's `kind`) -> the notebook's group
KIND_GROUPS = {"benchmark": "benchmark", "gpu-suite": "gpu-suite", "serving_batching_comparison": "serving",
               "streaming_load": "serving", "perf_analyzer": "serving", "profile": "profile"}


def classify(path: Path, doc: dict) -> str | None:
    """The notebook's group for a result file, from what the file declares (its kind), never from its name."""
    kind = str(doc.get("kind", ""))
    if kind in KIND_GROUPS:
        return KIND_GROUPS[kind]
    if str(doc.get("schema", "")).startswith("lmopt.benchmark"):
        return "benchmark"
    if "nvtx" in doc or "nvtx_ranges" in doc:
        return "profile"
    if doc.get("stage") == "quantize" and "accuracy" in doc:
        return "accuracy"
    return None


def _load(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"note: skipped unreadable {path} ({e})")
        return None
    return doc if isinstance(doc, dict) else None


def discover(params: Params) -> Inputs:
    inp = Inputs(params)
    m = slug(params.model)
    if params.machine:
        roots = [Path(params.results) / params.machine / m]
    else:
        roots = [Path(params.artifacts) / m / "profile"]
    for root in roots:
        for kind in MAKE_TARGET:
            inp.searched.setdefault(kind, str(root))
        for p in sorted(root.rglob("*.json")) if root.is_dir() else []:
            if p.name.startswith(".") or "manifest.json" == p.name:
                continue
            doc = _load(p)
            kind = classify(p, doc) if doc else None
            if kind:
                inp.found.setdefault(kind, []).append(Source(kind, p, doc))
    # accuracy tables live in the quantize manifests (artifacts), or in a published copy under results/
    qroot = Path(params.artifacts) / m / "quantize"
    inp.searched["accuracy"] = str(qroot / "*" / "manifest.json")
    if not inp.get("accuracy") and qroot.is_dir():
        for p in sorted(qroot.glob("*/manifest.json")):
            doc = _load(p)
            if doc and doc.get("accuracy"):
                inp.found.setdefault("accuracy", []).append(Source("accuracy", p, doc))
    # the same model's benchmarks from other machines (typically the lead's GPU runs), committed under results/
    res = Path(params.results)
    if res.is_dir():
        for p in sorted([*res.glob(f"*/{m}/benchmark-*.json"), *res.glob(f"*/{m}/gpu-suite-*.json")]):
            doc = _load(p)
            kind = classify(p, doc) if doc else None
            if kind == "gpu-suite" or (kind == "benchmark" and p.parent.parent.name != params.machine):
                inp.other_machines.append(Source(kind, p, doc))
    return inp


def missing_note(inp: Inputs, kind: str) -> str:
    """Markdown naming what is missing and the make target that produces it."""
    model = inp.params.model
    arg = "" if model == "tiny" else f" MODEL={model}"
    targets = " ".join(f"`make {t}{arg}`" for t in MAKE_TARGET[kind].split())
    return (f"**No {kind} results** for `{model}` under `{inp.searched.get(kind, '?')}` — run {targets} "
            f"(or pick a machine with committed results: `make notebook MACHINE=<tag>`), then rerun `make notebook`.")


# ---- provenance ----------------------------------------------------------------------------------------------------
def machine_label(doc: dict, device: str | None = None) -> str:
    m = doc.get("machine") or {}
    dev = device or (doc.get("settings") or {}).get("device", "cpu")
    gpu = m.get("gpu") or doc.get("gpu")
    if gpu and str(dev).startswith("cuda"):
        return f"{gpu.get('name', 'GPU')}"
    cpu = m.get("cpu_model") or m.get("processor") or "CPU"
    return f"{cpu}, {m.get('cpu_count', '?')} cores" if m.get("cpu_count") else cpu


def command_str(doc: dict, limit: int = 110) -> str:
    cmd = doc.get("command") or []
    s = " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def provenance(doc: dict, path: Path | None = None, device: str | None = None) -> str:
    """One line for a figure: machine, date and command of its data (and the file)."""
    date = str(doc.get("created", "?"))[:16].replace("T", " ")
    where = f" [{Path(path).name}]" if path else ""
    return f"{machine_label(doc, device)} · {date} UTC · {command_str(doc)}{where}"


# ---- figures -------------------------------------------------------------------------------------------------------
SAVED: list[dict] = []


def _has_data(ax) -> bool:
    return bool(ax.lines or ax.patches or ax.collections or ax.images or ax.containers)


def save(fig, name: str, sources: list[Path], params: Params) -> Path:
    """Save a figure as PNG after checking that every visible axes holds data and is labelled: an empty figure is
    a bug in the notebook, so it raises (the test and `make notebook` then fail)."""
    axes = [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    if not axes:
        raise ValueError(f"figure {name} has no axes")
    for ax in axes:
        if not _has_data(ax):
            raise ValueError(f"figure {name}: axes '{ax.get_title()}' is empty")
        if not ax.get_ylabel() or not ax.get_xlabel():
            raise ValueError(f"figure {name}: axes '{ax.get_title()}' lacks an axis label")
    out = Path(params.report_dir) / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    SAVED.append({"figure": out.name, "sources": [str(s) for s in sources]})
    (Path(params.report_dir) / "figures.json").write_text(json.dumps(SAVED, indent=1) + "\n")
    return out


def stamp(fig, lines: list[str]) -> None:
    """Put provenance lines under a figure (machine, date, command of its data), and print them so the HTML report
    carries them as text too."""
    print("data: " + "\n      ".join(lines))
    fig.text(0.01, -0.01, "data: " + "\n      ".join(lines), fontsize=7.5, va="top", ha="left", color="#444444",
             family="DejaVu Sans Mono")


# ---- benchmark helpers ---------------------------------------------------------------------------------------------
def ok_rows(doc: dict) -> list[dict]:
    return [r for r in doc.get("rows", []) if r.get("status") == "ok"]


def row_label(r: dict) -> str:
    v = r.get("variant")
    extra = f"\n{v}" if v and v not in ("hf", r.get("precision"), "fp32") else ""
    return f"{r['engine']} {r['precision']}{extra}"


def skipped_rows(doc: dict) -> list[str]:
    return [f"{r['engine']} {r['precision']}: {r.get('reason')}" for r in doc.get("rows", [])
            if r.get("status") != "ok"]


# ---- plots whose code would drown the notebook's text (each saves its figure and returns what it showed) ---------
def _plt():
    import matplotlib.pyplot as plt

    return plt


def MaxNLocator(**kw):
    from matplotlib.ticker import MaxNLocator as _M

    return _M(**kw)


def _label_of(doc: dict) -> str:
    return str((doc.get("settings") or {}).get("label") or "default")


def _is_overhead(doc: dict) -> bool:
    """The serving-overhead runs (concurrency 1, Triton vs in-process) are not points of a concurrency sweep."""
    return bool(doc.get("overhead")) or _label_of(doc).startswith("overhead")


def plot_serving_throughput(sources: list[Source], params: Params) -> bool:
    """Throughput and p95 latency vs concurrency, one line per server config (label: batching-on/off), one row of
    panels per tool (perf_analyzer: non-streaming requests; streaming load generator: decoupled model)."""
    plt = _plt()
    tools = [("perf_analyzer", "perf_analyzer (non-streaming model)", "throughput_rps", "latency_ms_p95",
              "requests/s"),
             ("streaming_load", "streaming load generator (decoupled model)", "requests_per_s", None, "requests/s")]
    present = [t for t in tools if any(s.doc.get("kind") == t[0] for s in sources)]
    if not present:
        print("no perf_analyzer or streaming result among: " + ", ".join(str(s.path) for s in sources))
        return False
    fig, axes = plt.subplots(len(present), 2, figsize=(12, 4.3 * len(present)), squeeze=False)
    stamps, used = [], []
    for (kind, title, tput_key, p95_key, unit), (ax_t, ax_l) in zip(present, axes):
        for src in [s for s in sources if s.doc.get("kind") == kind and not _is_overhead(s.doc)]:
            allrows = [r for r in src.doc.get("summary", []) if r.get("mode", "concurrency") == "concurrency"]
            # perf_analyzer marks levels where it found no stable window: no number to plot there
            rows = [r for r in allrows if not r.get("unstable") and r.get(tput_key) is not None]
            bad = [f"{r.get('level', r.get('concurrency')):g}" for r in allrows if r not in rows]
            if bad:
                print(f"{src.path.name}: no stable measurement at concurrency {', '.join(bad)} (not plotted)")
            if not rows:
                continue
            lvl = [r.get("level", r.get("concurrency")) for r in rows]
            tput = [r.get(tput_key) for r in rows]
            p95 = [r.get(p95_key) if p95_key else (r.get("e2e_ms") or {}).get("p95") for r in rows]
            lab = _label_of(src.doc)
            ax_t.plot(lvl, tput, "o-", label=lab)
            ax_l.plot(lvl, p95, "o-", label=lab)
            stamps.append(f"{lab}: {provenance(src.doc, src.path)}")
            used.append(src.path)
        ax_t.set_title(f"{title}: throughput")
        ax_t.set_xlabel("concurrency (requests in flight)")
        ax_t.set_ylabel(f"throughput ({unit})")
        ax_l.set_title(f"{title}: p95 request latency")
        ax_l.set_xlabel("concurrency (requests in flight)")
        ax_l.set_ylabel("p95 end-to-end latency (ms)")
        for ax in (ax_t, ax_l):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(title="server config", fontsize=8)
            ax.set_ylim(bottom=0)
    first = sources[0].doc
    fig.suptitle(f"{params.model}: served throughput vs concurrency, dynamic batching on vs off — "
                 f"{machine_label(first)}", y=1.01)
    stamp(fig, stamps)
    fig.tight_layout()
    save(fig, "serving_throughput", used, params)
    plt.show()
    _print_batching_ratio(sources)
    return True


def _print_batching_ratio(sources: list[Source]) -> None:
    """The seed claimed +40 % throughput from dynamic batching: print the measured ratio at the highest shared level."""
    for kind, key, p95 in (("perf_analyzer", "throughput_rps", "latency_ms_p95"),
                           ("streaming_load", "requests_per_s", None)):
        by = {}
        for s in sources:
            if s.doc.get("kind") == kind and not _is_overhead(s.doc):
                by[_label_of(s.doc)] = {r.get("level", r.get("concurrency")): r for r in s.doc.get("summary", [])
                                        if r.get("mode", "concurrency") == "concurrency" and not r.get("unstable")
                                        and r.get(key) is not None}
        on = next((v for k, v in by.items() if "on" in k.split("-")[-1]), None)
        off = next((v for k, v in by.items() if "off" in k.split("-")[-1]), None)
        if not on or not off:
            continue
        for c in sorted(set(on) & set(off)):
            a, b = on[c], off[c]
            pa = a.get(p95) if p95 else (a.get("e2e_ms") or {}).get("p95")
            pb = b.get(p95) if p95 else (b.get("e2e_ms") or {}).get("p95")
            print(f"{kind}: concurrency {c:g}: batching on / off throughput {a[key]:.2f} / {b[key]:.2f} = "
                  f"{a[key] / b[key]:.2f}x; p95 {pa:.1f} vs {pb:.1f} ms")
    for s in sources:
        claim = (s.doc.get("summary") or {}).get("claim_40pct") if isinstance(s.doc.get("summary"), dict) else None
        if claim:
            print(f"verdict ({s.path.name}): '{claim.get('claim')}' — "
                  f"{'confirmed' if claim.get('confirmed') else 'refuted'} (best: concurrency "
                  f"{claim.get('best_concurrency')}, {claim.get('throughput_ratio', float('nan')):.2f}x, p95 "
                  f"{claim.get('p95_ms_on')} vs {claim.get('p95_ms_off')} ms)")


def plot_streaming(sources: list[Source], params: Params) -> bool:
    """TTFT and inter-token latency (p50 solid, p99 dashed) vs concurrency per server config."""
    plt = _plt()
    import numpy as np

    stream = [s for s in sources if s.doc.get("kind") == "streaming_load" and not _is_overhead(s.doc)]
    over = [s for s in sources if s.doc.get("kind") == "streaming_load" and (s.doc.get("overhead") or {}).get("served")]
    if not stream:
        print("no streaming load-generator result (serving-stream-*.json) — run: make serve-bench")
        return False
    fig, axes = plt.subplots(1, 4 if over else 3, figsize=(21 if over else 16, 4.4))
    stamps = []
    for i, src in enumerate(stream):
        rows = src.doc.get("summary", [])
        lab = _label_of(src.doc)
        c = [r["concurrency"] for r in rows]
        color = f"C{i}"
        for ax, key in ((axes[0], "ttft_ms"), (axes[1], "itl_ms")):
            ax.plot(c, [r[key]["p50"] for r in rows], "o-", color=color, label=f"{lab} p50")
            ax.plot(c, [r[key]["p99"] for r in rows], "s--", color=color, label=f"{lab} p99")
        axes[2].plot(c, [r["output_tok_per_s"] for r in rows], "o-", color=color, label=lab)
        stamps.append(f"{lab}: {provenance(src.doc, src.path)}")
    if over:
        ax = axes[3]
        x = np.arange(2)
        w = 0.8 / (len(over) + 1)
        o0 = over[0].doc["overhead"]
        inproc = [o0["in_process"]["ttft_ms"]["p50"], o0["in_process"]["itl_ms"]["p50"]]
        bars = [ax.bar(x - 0.4 + w / 2, inproc, w, color="gray", label=f"in-process {o0.get('engine', '')} "
                                                                     f"{o0.get('precision', '')}")]
        for i, src in enumerate(over):
            o = src.doc["overhead"]
            vals = [o["served"]["ttft_ms"]["p50"], o["served"]["itl_ms"]["p50"]]
            bars.append(ax.bar(x - 0.4 + w * (i + 1.5), vals, w, color=f"C{i}",
                               label=f"Triton [{_label_of(src.doc).replace('overhead-', '')}]"))
            stamps.append(f"{_label_of(src.doc)}: {provenance(src.doc, src.path)}")
        for bs in bars:
            for bar in bs:
                ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, ["TTFT p50", "ITL p50"])
        ax.set_xlabel("metric at concurrency 1")
        ax.set_title(f"serving overhead: Triton vs in-process ({o0.get('requests', '?')} requests)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_ylabel("latency (ms)")
    for ax, t, y in ((axes[0], "time to first token", "TTFT (ms)"),
                     (axes[1], "inter-token latency", "ITL (ms)"),
                     (axes[2], "output tokens per second (all streams)", "output throughput (tokens/s)")):
        ax.set_title(t)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("concurrency (streams in flight)")
        ax.set_ylabel(y)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    s0 = stream[0].doc.get("settings", {})
    fig.suptitle(f"{params.model}: streaming through Triton, prompt {s0.get('prompt_tokens', '?')} tokens, "
                 f"{s0.get('max_new_tokens', s0.get('max_tokens', '?'))} output tokens — {machine_label(stream[0].doc)}", y=1.02)
    stamp(fig, stamps)
    fig.tight_layout()
    save(fig, "streaming_ttft_itl", [s.path for s in stream + over], params)
    plt.show()
    for src in over:
        o = src.doc.get("overhead")
        if o and o.get("overhead_ms"):
            om = o["overhead_ms"]
            print(f"serving overhead [{_label_of(src.doc)}] at concurrency 1 (Triton - in-process, p50): "
                  f"TTFT {om.get('ttft_p50', float('nan')):+.2f} ms, ITL {om.get('itl_p50', float('nan')):+.3f} ms")
    return True


def accuracy_rows(sources: list[Source]) -> list[tuple[str, dict, Source]]:
    """(variant, accuracy row, source) for every quantize manifest; an accuracy table may be one row or a dict of
    rows keyed by graph name (then the row of the written graph is the one named like the variant, else the last)."""
    out = []
    for s in sources:
        a = s.doc.get("accuracy") or {}
        variant = s.doc.get("variant", s.path.parent.name)
        if "ppl" in a:
            out.append((variant, a, s))
        else:
            rows = {k: v for k, v in a.items() if isinstance(v, dict) and "ppl" in v}
            if rows:
                key = variant if variant in rows else ("final" if "final" in rows else list(rows)[-1])
                out.append((variant, rows[key], s))
    return out


def plot_accuracy(sources: list[Source], params: Params) -> bool:
    plt = _plt()
    import numpy as np

    rows = accuracy_rows(sources)
    if not rows:
        print("the quantize manifests hold no accuracy table with a 'ppl' entry: "
              + ", ".join(str(s.path) for s in sources))
        return False
    names = ["fp32"] + [v for v, _, _ in rows]
    ppl = [rows[0][1]["ppl_fp32"]] + [r["ppl"] for _, r, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    bars = axes[0].bar(range(len(names)), ppl, color=["#888888"] + [f"C{i}" for i in range(len(rows))])
    for bar, (_, r, _) in zip(bars[1:], rows):
        axes[0].annotate(f"{r['ppl']:.2f}\n({r.get('ppl_increase_pct', 0):+.2f} %)",
                         (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes[0].annotate(f"{ppl[0]:.2f}", (bars[0].get_x() + bars[0].get_width() / 2, ppl[0]), ha="center", va="bottom",
                     fontsize=8)
    axes[0].set_xticks(range(len(names)), names, fontsize=8)
    axes[0].set_ylabel("perplexity on held-out text (lower is better)")
    axes[0].set_xlabel("graph (quantize variant)")
    axes[0].set_title("perplexity: FP32 vs each variant (Δ vs FP32 in brackets)")
    axes[0].margins(y=0.18)
    w = 0.38
    x = np.arange(len(rows))
    t1 = [r.get("top1_agreement", np.nan) * 100 for _, r, _ in rows]
    gr = [r.get("greedy_agreement", np.nan) * 100 for _, r, _ in rows]
    b1 = axes[1].bar(x - w / 2, t1, w, label="top-1 next-token agreement")
    b2 = axes[1].bar(x + w / 2, gr, w, label="greedy-token agreement")
    for bar in list(b1) + list(b2):
        axes[1].annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    axes[1].set_xticks(x, [v for v, _, _ in rows], fontsize=8)
    axes[1].set_ylim(0, 110)
    axes[1].set_ylabel("agreement with FP32 (%)")
    axes[1].set_xlabel("graph (quantize variant)")
    axes[1].set_title("agreement with FP32")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{params.model}: accuracy vs precision ({rows[0][1].get('eval_tokens', '?')} held-out tokens) — "
                 f"{machine_label(rows[0][2].doc)}", y=1.02)
    stamp(fig, [f"{v}: {provenance(s.doc, s.path)}" for v, _, s in rows])
    fig.tight_layout()
    save(fig, "accuracy_vs_precision", [s.path for _, _, s in rows], params)
    plt.show()
    for v, r, s in rows:
        print(f"{v:28s} ppl {r['ppl']:.3f} (fp32 {r['ppl_fp32']:.3f}, {r.get('ppl_increase_pct', 0):+.3f} %), "
              f"top-1 {r.get('top1_agreement')}, greedy {r.get('greedy_agreement')}, "
              f"max |Δlogits| {r.get('max_abs_dlogits')}")
    return True


def plot_nvtx(sources: list[Source], params: Params) -> bool:
    """Total time per NVTX range and its share of the measured wall time; CUDA kernels by time when traced."""
    plt = _plt()
    import numpy as np
    shown = False
    for src in sources:
        summ = src.doc.get("summary") or {}
        nv = summ.get("nvtx") or {}
        ranges = nv.get("ranges") or {}
        root = nv.get("root")
        # the capture root and the per-round wrapper hold everything else: plotting them would hide the work
        rounds = {n for n, st in ranges.items() if root in (st.get("parents") or [])}
        items = [(n, st) for n, st in ranges.items() if n != root and n not in rounds]
        if not items:
            print(f"{src.path}: no NVTX ranges below the capture root")
            continue
        items.sort(key=lambda kv: kv[1]["total_ms"])
        wall = nv.get("measured_wall_ms") or (src.doc.get("figures") or {}).get("wall_s", 0) * 1e3
        kern = (summ.get("kernels") or {}).get("by_name") or []
        ncols = 3 if kern else 2
        fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 0.45 * len(items) + 2.4))
        # a range nested in another work range (d2h inside decode_step) is already counted in its parent's time
        work = set(nv.get("work_ranges") or [])
        nested = {n: [p for p in (st.get("parents") or []) if p in work] for n, st in items}
        names = [n if n in work or not nested[n] else f"{n}\n(inside {', '.join(nested[n])})" for n, _ in items]
        tot = [st["total_ms"] for _, st in items]
        bars = axes[0].barh(names, tot, color=["tab:blue" if n in work else "tab:gray" for n, _ in items])
        for bar, t in zip(bars, tot):
            share = f" ({t / wall:.0%} of wall)" if wall else ""
            axes[0].annotate(f"{t:.1f} ms{share}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                             va="center", fontsize=8)
        axes[0].set_xlabel("total time in range (ms)")
        axes[0].set_ylabel("NVTX range")
        axes[0].set_title(f"time per range; wall {wall:.0f} ms, work ranges cover "
                          f"{nv.get('work_ranges_share_of_wall', float('nan')):.0%}", fontsize=10)
        axes[0].margins(x=0.35)
        mean = [st.get("mean_ms", 0) for _, st in items]
        p90 = [st.get("p90_ms", 0) for _, st in items]
        y = np.arange(len(items))
        axes[1].barh(y - 0.2, mean, 0.4, label="mean")
        axes[1].barh(y + 0.2, p90, 0.4, label="p90")
        axes[1].set_yticks(y, [f"{n} (x{st['count']})" for n, st in items], fontsize=9)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("time per call (ms, log scale)")
        axes[1].set_ylabel("NVTX range (calls)")
        axes[1].set_title("per call: mean and p90")
        axes[1].legend(fontsize=8)
        if kern:
            top = kern[:12][::-1]
            axes[2].barh([k["name"][:40] for k in top], [k["total_ms"] for k in top], color="tab:green")
            axes[2].set_xlabel("total kernel time (ms)")
            axes[2].set_ylabel("CUDA kernel")
            axes[2].set_title("GPU kernels by total time")
        st = src.doc.get("settings") or {}
        eng = src.doc.get("engine", st.get("engine", "?"))
        if isinstance(eng, dict):
            eng = f"{eng.get('engine', '?')} {eng.get('precision', '')}"
        fig.suptitle(f"{params.model}: where the time goes ({src.doc.get('profiler', '?')} profile of {eng} on "
                     f"{machine_label(src.doc, st.get('device'))})", y=1.02)
        nt = src.doc.get("not_traced")
        lines = [provenance(src.doc, src.path, st.get("device"))]
        if nt:
            lines.append("not traced: " + (nt if isinstance(nt, str) else "; ".join(map(str, nt)))[:150])
        stamp(fig, lines)
        fig.tight_layout()
        save(fig, f"nvtx_breakdown_{src.path.parent.name}", [src.path], params)
        plt.show()
        shown = True
    return shown


def plot_devices(sources: list[Source], params: Params) -> bool:
    """Decode ms/token p50 at batch 1 per (machine, device, engine, precision), bandwidth floor as a tick."""
    plt = _plt()
    bars = []
    for src in sources:
        if src.kind == "gpu-suite":
            plen = (src.doc.get("settings") or {}).get("prompt_len")
            for r in src.doc.get("rows", []):
                if r.get("batch") == 1 and r.get("prompt_len") == plen:
                    bars.append((f"{machine_label(src.doc, 'cuda')[:28]}\n{r['engine']} {r['precision']}",
                                 r["decode_ms_per_token"], r.get("floor_ms"), "cuda", src))
            continue
        for r in ok_rows(src.doc):
            m = r["summary"].get("1") or next(iter(r["summary"].values()))
            dev = src.doc["settings"]["device"]
            bars.append((f"{machine_label(src.doc, dev)[:28]}\n{r['engine']} {r['precision']}",
                         stat_ms(m, "step")["p50"], m.get("bandwidth_floor_ms"), dev, src))
    if not bars:
        print("no benchmark row ran in: " + ", ".join(str(s.path) for s in sources))
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(bars)), 4.8))
    colors = ["tab:green" if d.startswith("cuda") else "tab:blue" for _, _, _, d, _ in bars]
    b = ax.bar(range(len(bars)), [v for _, v, _, _, _ in bars], color=colors)
    for i, (bar, (_, v, floor, _, _)) in enumerate(zip(b, bars)):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        if floor:
            ax.plot([i - 0.4, i + 0.4], [floor, floor], color="k", lw=2)
    ax.set_xticks(range(len(bars)), [n for n, *_ in bars], fontsize=7.5)
    ax.set_yscale("log")
    ax.set_ylabel("decode latency per token, p50 (ms, log scale)")
    ax.set_xlabel("machine / engine / precision (blue: CPU, green: GPU; black tick: bandwidth floor)")
    ax.set_title(f"{params.model}: decode latency at batch 1 on every machine with results")
    uniq = {}
    for *_, src in bars:
        uniq[str(src.path)] = src
    stamp(fig, [provenance(s.doc, s.path) for s in uniq.values()])
    fig.tight_layout()
    save(fig, "devices_decode_latency", [s.path for s in uniq.values()], params)
    plt.show()
    return True
