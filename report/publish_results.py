"""Copy result files of the artifacts tree into the committed results/ tree, one folder per machine.

    python report/publish_results.py                          # every artifacts/*/profile/benchmark-*.json
    python report/publish_results.py --model gpt2-124m        # one model
    python report/publish_results.py --kind serving --model tiny   # the serving benchmark's serving-*.json
    make publish-results [MODEL=gpt2-124m]; make serve-bench-publish [MODEL=...]

Reads:  artifacts/<model>/profile/benchmark-*.json (profile/benchmark.py) or serving-*.json (profile/serve_bench.py)
Writes: results/<machine-tag>/<model>/<same name>, machine-tag from the result's own machine record (e.g.
        cpu-amd-epyc-2c, nvidia-h200), so results from different machines never overwrite each other. Serving files
        are published as a set, under the tag of their batching comparison.
The README tables (make readme-tables) are rendered from results/, never from artifacts/.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.results import machine_tag

log = get_logger("publish")


@dataclass
class PublishSettings:
    artifacts: str = "artifacts"
    results: str = "results"   # committed results folder
    model: str = ""            # empty = every model under --artifacts
    kind: str = "benchmark"    # which results to publish


PATTERNS = {"benchmark": ("benchmark-*.json", "benchmark"), "serving": ("serving-*.json", "serve-bench")}


def _read(f: Path, target: str) -> dict:
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt result file {f} ({e.msg}) — rerun: make {target}") from None


def publish(*, settings: PublishSettings) -> list[Path]:
    s = settings
    if s.kind not in PATTERNS:
        raise UserError(f"unknown --kind '{s.kind}' — use one of {', '.join(PATTERNS)}")
    name, target = PATTERNS[s.kind]
    root = Path(s.artifacts)
    from lmopt.paths import model_slug

    pattern = f"{model_slug(s.model) if s.model else '*'}/profile/{name}"  # a local folder's artifacts key
    found = sorted(root.glob(pattern))
    if not found:
        raise UserError(f"no {s.kind} results under {root / pattern} — run: make {target}"
                        + (f" MODEL={s.model}" if s.model else ""))
    tags: dict[Path, str] = {}
    if s.kind == "serving":  # one set per model, under the machine of its batching comparison
        for folder in sorted({f.parent for f in found}):
            # the comparison that serve_bench.py writes last (--compare batching or scheduler) names the machine
            cmps = [p for p in (folder / "serving-batching.json", folder / "serving-scheduler.json") if p.is_file()]
            if not cmps:
                raise UserError(f"no serving comparison (serving-batching.json or serving-scheduler.json) in {folder} "
                                f"— run: make serve-bench MODEL={folder.parent.name}")
            tags[folder] = machine_tag(_read(cmps[0], target))
    written = []
    for f in found:
        result = _read(f, target)
        tag = tags.get(f.parent) or machine_tag(result)
        dest = Path(s.results) / tag / f.parent.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(f, tmp)
        tmp.replace(dest)
        log.info("Saving %s to %s", f, dest)
        written.append(dest)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, PublishSettings, choices={"kind": tuple(PATTERNS)})
    return p


main = cli.main_for(build_parser, PublishSettings, publish)


if __name__ == "__main__":
    cli.run(main)
