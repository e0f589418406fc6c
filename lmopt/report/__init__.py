"""Reporting: the generated sections of README.md and results/README.md, the artifact summary and the notebook's
helpers, all rendered from result files.

Result files are found by what they say they are — the envelope's `kind` (see lmopt.results) — never by file name:

    from lmopt.report import collect, render_section
    docs = collect("results")                  # every result JSON under the folder, with its path
    render_section("serving", "results")       # markdown for one README section

`SECTIONS` maps a README section (`<!-- BEGIN name -->` ... `<!-- END name -->`) to its renderer; a section whose
name is not here is left as it is. report/update_readme.py is the CLI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


@dataclass
class Doc:
    path: Path
    kind: str
    data: dict

    @property
    def label(self) -> str:
        return str(self.data.get("settings", {}).get("label", ""))


def collect(results_dir: str | Path, kinds: Iterable[str] | None = None) -> list[Doc]:
    """Every result file (a JSON object with a `kind`) under `results_dir`, sorted by path; optionally only `kinds`."""
    root = Path(results_dir)
    want = set(kinds) if kinds is not None else None
    docs = []
    for p in sorted(root.rglob("*.json")) if root.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and isinstance(d.get("kind"), str) and (want is None or d["kind"] in want):
            docs.append(Doc(p, d["kind"], d))
    return docs


def stat_ms(summary: dict, name: str) -> dict:
    """Latency statistics `name` of a summary, in milliseconds: `<name>_ms` (current files), or `<name>_s` of files
    written before statistics moved to milliseconds, scaled. E.g. stat_ms(m, "step")["p50"]."""
    if f"{name}_ms" in summary:
        return summary[f"{name}_ms"]
    old = summary[f"{name}_s"]
    return {k: (v * 1e3 if isinstance(v, (int, float)) and k not in ("n", "count") else v) for k, v in old.items()}


def floor_note(result: dict) -> str:
    """What a benchmark result's bandwidth floor divides by, e.g. "36 GB/s read bandwidth (2 threads)"; files from
    before the read probe say that their floor is a copy bandwidth. Empty when no floor was measured."""
    from lmopt.results import floor_bandwidth

    gbs, how = floor_bandwidth(result)
    if gbs is None:
        return ""
    gbs = f"{gbs:.0f}" if gbs >= 100 else f"{gbs:.1f}"
    if how == "copy":
        return f"{gbs} GB/s copy bandwidth (read + write; measured before the read probe existed)"
    threads = (result.get("read_bandwidth_probe") or {}).get("threads")
    return f"{gbs} GB/s read bandwidth" + (f" ({threads} threads)" if threads else "")


def _sections() -> dict[str, Callable[[Path], str]]:
    from lmopt.report import benchmark, gpu, headline, openai, scaleout, serving, tiny

    return {"headline": headline.render, "tiny-model": tiny.render, "before-vs-after": benchmark.render, "serving": serving.render,
            "gpu": gpu.render, "openai-endpoint": openai.render, "scale-out": scaleout.render}


SECTION_NAMES = ("headline", "tiny-model", "before-vs-after", "serving", "gpu", "openai-endpoint", "scale-out")


def render_section(name: str, results_dir: str | Path) -> str | None:
    """Markdown for one README section (no markers), or None when no renderer has that name."""
    fn = _sections().get(name)
    return None if fn is None else fn(Path(results_dir))
