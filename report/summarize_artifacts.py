"""Print what the pipeline produced for a model: every stage's variants, validation pass/fail, key figures.

    python report/summarize_artifacts.py               # the built-in model
    python report/summarize_artifacts.py --model gpt2-124m --artifacts /tmp/art
    make summary

Reads:  artifacts/<model>/<stage>/<variant>/manifest.json (every finished stage output) and
        artifacts/<model>/profile/*.json (benchmark and profile results).
Writes: nothing (prints to stdout).
A stage folder without a manifest never finished; it is listed as such, with the make target that builds it.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.report import stat_ms

log = get_logger("summary")
STAGE_ORDER = ("export", "quantize", "engine", "serve", "profile")


@dataclass
class SummarySettings:
    model: str = "tiny"
    artifacts: str = "artifacts"


def _size(folder: Path) -> str:
    n = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{n / 2**20:.1f} MB"


def _figures(man: dict) -> str:
    """A few numbers worth seeing at a glance, whichever stage wrote the manifest."""
    out = []
    for c in man.get("validation", {}).get("checks", []):
        if c.get("value") is not None and len(out) < 4:
            v = c["value"]
            out.append(f"{c['name']}: {v:.3g}" if isinstance(v, float) else f"{c['name']}: {v}")
    t = man.get("timings_s", {})
    if t:
        out.append("time " + f"{sum(v for v in t.values() if isinstance(v, (int, float))):.1f} s")
    return "; ".join(out)


def summarize(*, settings: SummarySettings) -> list[str]:
    from lmopt.manifest import MANIFEST
    from lmopt.paths import STAGE_TARGETS, model_slug

    s = settings
    root = Path(s.artifacts) / model_slug(s.model)
    if not root.is_dir():
        model_arg = "" if s.model == "tiny" else f" MODEL={s.model}"
        raise UserError(f"nothing under {root} — run: make demo{model_arg}")
    lines = [f"artifacts of {s.model} under {root}"]
    stages = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                    key=lambda d: (STAGE_ORDER.index(d.name) if d.name in STAGE_ORDER else 99, d.name))
    for stage in stages:
        lines.append(f"{stage.name}:")
        for v in sorted(p for p in stage.iterdir() if not p.name.startswith(".")):
            if v.is_file() and v.suffix == ".json":
                lines.append(f"  {v.name}: " + _result_line(v))
                continue
            if not v.is_dir():
                continue
            if not (v / MANIFEST).is_file():
                sub = sorted(v.glob("*.json"))
                if sub:  # a results folder (e.g. profile/quantize/), not a stage output
                    lines += [f"  {v.name}/{f.name}: " + _result_line(f) for f in sub]
                else:
                    lines.append(f"  {v.name}: unfinished (no manifest) — run: make "
                                 f"{STAGE_TARGETS.get(stage.name, stage.name)}")
                continue
            man = json.loads((v / MANIFEST).read_text())
            val = man.get("validation")
            status = "no validation" if val is None else ("[ok]" if val.get("passed") else "[FAIL] " + ", ".join(
                c["name"] for c in val.get("checks", []) if not c.get("passed")))
            lines.append(f"  {v.name}: {status}; {_size(v)}; {_figures(man)}".rstrip("; "))
    for line in lines:
        print(line)
    return lines


def _result_line(path: Path) -> str:
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return "unreadable"
    if not isinstance(r, dict):  # e.g. the notebook's figures.json: a list of figure records
        return f"{len(r)} entries" if isinstance(r, list) else type(r).__name__
    if r.get("kind") == "benchmark":
        parts = []
        for row in r["rows"]:
            if row["status"] != "ok":
                parts.append(f"{row['engine']} {row['precision']}: skipped")
                continue
            b1 = row["summary"].get("1") or next(iter(row["summary"].values()))
            parts.append(f"{row['engine']} {row['precision']}: {stat_ms(b1, 'step')['p50']:.2f} ms/token"
                         + (f" ({b1['decode_speedup_vs_baseline']:.2f}x)" if b1.get("decode_speedup_vs_baseline")
                            else ""))
        return f"{r['created'][:16]} — " + "; ".join(parts)
    return f"{r.get('created', '')[:16]} {', '.join(list(r)[:6])}"


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, SummarySettings)
    return p


main = cli.main_for(build_parser, SummarySettings, summarize)


if __name__ == "__main__":
    cli.run(main)
