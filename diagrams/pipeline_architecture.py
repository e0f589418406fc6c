"""Draw the pipeline architecture diagram from its text source with matplotlib (no Graphviz needed).

    python diagrams/pipeline_architecture.py                  # = make diagram
    python diagrams/pipeline_architecture.py --out /tmp/x.png

Reads:  diagrams/pipeline_architecture.txt (nodes, edges, lanes; the format is described at its top)
Writes: diagrams/pipeline_architecture.png (committed; the README shows it)
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("diagram")
HERE = Path(__file__).resolve().parent

# Colours per kind: a reader tells scripts from the folders they write at a glance.
KIND_STYLE = {
    "input":    dict(fc="#eeeeee", ec="#555555"),
    "stage":    dict(fc="#dbe9f6", ec="#1f5f99"),
    "artifact": dict(fc="#fff2cc", ec="#a67c00"),
    "runtime":  dict(fc="#e2f0d9", ec="#38761d"),
    "result":   dict(fc="#f4e1f5", ec="#7b3f8c"),
}
EDGE_STYLE = {
    "data":  dict(color="#333333", ls="-", lw=1.3),
    "serve": dict(color="#38761d", ls="-", lw=2.0),
    "prof":  dict(color="#c0392b", ls="--", lw=1.5),
}
LEGEND = [("stage", "script you run"), ("artifact", "folder + manifest.json"), ("runtime", "library / server"),
          ("result", "result JSON"), ("input", "the model you bring")]


@dataclass
class DiagramSettings:
    source: str = str(HERE / "pipeline_architecture.txt")
    out: str = str(HERE / "pipeline_architecture.png")
    dpi: int = 110


@dataclass
class Node:
    id: str
    x: float
    y: float
    kind: str
    lines: list[str]
    w: float = 0.0
    h: float = 0.0


@dataclass
class Diagram:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    lanes: list[tuple[float, float, str]] = field(default_factory=list)


def parse(text: str, name: str = "source") -> Diagram:
    """Parse the text source; a malformed line is a user error naming the line."""
    d = Diagram()
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, tail = line.partition("|")
        parts = [p.strip() for p in tail.split("|")] if tail else []
        words = shlex.split(head)
        try:
            if words[0] == "node":
                _, nid, x, y, kind = words
                if kind not in KIND_STYLE:
                    raise ValueError(f"unknown kind '{kind}' (use {', '.join(KIND_STYLE)})")
                d.nodes[nid] = Node(nid, float(x), float(y), kind, [p for p in parts if p])
            elif words[0] == "edge":
                _, a, b, style, *opts = words
                rad = float(opts[0].split("=", 1)[1]) if opts and opts[0].startswith("rad=") else 0.0
                if style not in EDGE_STYLE:
                    raise ValueError(f"unknown edge style '{style}' (use {', '.join(EDGE_STYLE)})")
                d.edges.append((a, b, style, parts[0] if parts else "", rad))
            elif words[0] == "lane":
                _, y0, y1 = words
                d.lanes.append((float(y0), float(y1), parts[0] if parts else ""))
            else:
                raise ValueError(f"unknown statement '{words[0]}'")
        except (ValueError, IndexError) as e:
            raise UserError(f"{name}:{no}: cannot parse '{line}' ({e}) — see the format at the top of {name}") from None
    for a, b, *_ in d.edges:
        for n in (a, b):
            if n not in d.nodes:
                raise UserError(f"{name}: edge names node '{n}', which is not defined — add a 'node {n} ...' line")
    return d


def _border_point(n: Node, tx: float, ty: float) -> tuple[float, float]:
    """Where the segment from n's centre towards (tx, ty) leaves n's box."""
    dx, dy = tx - n.x, ty - n.y
    if dx == 0 and dy == 0:
        return n.x, n.y
    sx = (n.w / 2) / abs(dx) if dx else float("inf")
    sy = (n.h / 2) / abs(dy) if dy else float("inf")
    s = min(sx, sy)
    return n.x + dx * s, n.y + dy * s


def draw(*, settings: DiagramSettings) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.lines import Line2D

    src = Path(settings.source)
    if not src.is_file():
        raise UserError(f"missing diagram source {src} — pass --source FILE")
    d = parse(src.read_text(), src.name)

    W, H = 100.0, 60.0
    fig = plt.figure(figsize=(20, 12))
    ax = fig.add_axes([0, 0, 1, 0.95])
    ax.set_xlim(0, W)
    ax.set_ylim(0, H)
    ax.axis("off")
    fig.suptitle("hf-llm-inference-pipeline: stages, artifacts, serving path and where profiling attaches",
                 fontsize=17, fontweight="bold", y=0.985)

    for y0, y1, title in d.lanes:
        ax.add_patch(FancyBboxPatch((0.5, y0), W - 1, y1 - y0, boxstyle="round,pad=0,rounding_size=1",
                                    fc="#fafafa", ec="#cccccc", lw=1, zorder=0))
        ax.text(1.2, y1 - 0.9, title, fontsize=10.5, style="italic", color="#555555", va="top", zorder=1)

    # box sizes from the text: one canvas unit is 0.2 in wide (20 in / 100) and 0.2 in tall (12 in / 60)
    fs = 9.5
    char_w, line_h = fs * 0.60 / 72 / 0.2, fs * 1.45 / 72 / 0.2
    for n in d.nodes.values():
        n.w = max(len(s) for s in n.lines) * char_w + 1.6
        n.h = len(n.lines) * line_h + 1.2
        st = KIND_STYLE[n.kind]
        ax.add_patch(FancyBboxPatch((n.x - n.w / 2, n.y - n.h / 2), n.w, n.h, boxstyle="round,pad=0,rounding_size=0.8",
                                    fc=st["fc"], ec=st["ec"], lw=1.6, zorder=3))
        first, rest = n.lines[0], n.lines[1:]
        text = first + ("\n" + "\n".join(rest) if rest else "")
        t = ax.text(n.x, n.y, text, ha="center", va="center", fontsize=fs, zorder=4, linespacing=1.25,
                    family="DejaVu Sans")
        # bold first line: draw it again on top, aligned to the block's first line
        if rest:
            t.set_text("\n".join([" "] + rest))
            ax.text(n.x, n.y, first + "\n" * len(rest), ha="center", va="center", fontsize=fs, zorder=4,
                    fontweight="bold", linespacing=1.25)
        else:
            t.set_fontweight("bold")

    for a, b, style, label, rad in d.edges:
        na, nb = d.nodes[a], d.nodes[b]
        p0 = _border_point(na, nb.x, nb.y)
        p1 = _border_point(nb, na.x, na.y)
        es = EDGE_STYLE[style]
        ax.add_patch(FancyArrowPatch(p0, p1, arrowstyle="-|>", mutation_scale=16, color=es["color"], lw=es["lw"],
                                     ls=es["ls"], shrinkA=2, shrinkB=2, zorder=2,
                                     connectionstyle=f"arc3,rad={rad}"))
        if label:
            # midpoint of arc3's quadratic Bezier: half the control point's offset from the chord's middle
            dx, dy = p1[0] - p0[0], p1[1] - p0[1]
            mx, my = (p0[0] + p1[0]) / 2 + rad * dy / 2, (p0[1] + p1[1]) / 2 - rad * dx / 2
            ax.text(mx, my, label, fontsize=8.5, ha="center", va="center", color=es["color"], zorder=5,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9))

    handles = [Patch(fc=KIND_STYLE[k]["fc"], ec=KIND_STYLE[k]["ec"], label=f"{k}: {desc}") for k, desc in LEGEND]
    handles += [Line2D([], [], color=EDGE_STYLE[s]["color"], ls=EDGE_STYLE[s]["ls"], lw=EDGE_STYLE[s]["lw"],
                       label=lab) for s, lab in (("data", "artifact hand-off (read via manifest)"),
                                                 ("serve", "request path"), ("prof", "profiling attaches (NVTX)"))]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=8, fontsize=9, frameon=False)

    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=settings.dpi, facecolor="white")
    plt.close(fig)
    tmp.replace(out)
    log.info("Saving diagram to %s (%d nodes, %d edges)", out, len(d.nodes), len(d.edges))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    d = DiagramSettings()
    cli.add_settings(p, DiagramSettings, skip=("source", "out"))
    p.add_argument("--source", default=d.source, help="text source of the diagram")
    p.add_argument("--out", default=d.out, help="PNG to write")
    return p


main = cli.main_for(build_parser, DiagramSettings, draw)


if __name__ == "__main__":
    cli.run(main)
