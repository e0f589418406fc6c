"""Regenerate the generated sections of README.md (the headline table) and results/README.md (every result table)
from committed files, so no number in either is typed by hand.

    python report/update_readme.py                                  # rewrite README.md in place
    python report/update_readme.py --readme results/README.md       # the result tables
    python report/update_readme.py --readme results/README.md --check   # exit 1 if stale (CI)
    make readme-tables                                              # both

Reads:  every result file under --results (results/<machine-tag>/<model>/*.json), found by its `kind`, and
        models/tiny/training.json.
Writes: --readme, only between `<!-- BEGIN name ... -->` and `<!-- END name -->` markers.

Sections and their renderers (lmopt.report.SECTIONS): headline (README.md: the best benchmark row per machine and
model), tiny-model, before-vs-after (kind benchmark), serving (kinds
serving_batching_comparison, streaming_load, perf_analyzer), gpu (kinds gpu-suite, profile), openai-endpoint (kinds
openai-overhead, aiperf-compare). A section without a
renderer is left as is. Every rendered table states the machine, date and command of its data.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import re
from dataclasses import dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger
from lmopt.report import render_section

log = get_logger("update_readme")
MARKER = re.compile(r"(<!-- BEGIN ([\w-]+)[^>]*-->)(.*?)(<!-- END \2 -->)", re.S)


@dataclass
class ReadmeSettings:
    readme: str = "README.md"           # README to update in place
    results: str = "results"            # committed results folder
    check: bool = False                 # only check: exit 1 if the README is stale


def update(*, settings: ReadmeSettings) -> bool:
    """Rewrite the marked sections; return True when the README changed (or, with check, would change)."""
    s = settings
    readme = Path(s.readme)
    if not readme.is_file():
        raise UserError(f"missing {readme} — pass --readme PATH")
    results = Path(s.results)
    text = readme.read_text()

    def section(m: re.Match) -> str:
        name = m.group(2)
        body = render_section(name, results)
        if body is None:
            log.info("section %s: no renderer in lmopt.report; left as is", name)
            return m.group(0)
        log.info("section %s rendered", name)
        return f"{m.group(1)}\n{body.strip()}\n{m.group(4)}"

    new = MARKER.sub(section, text)
    changed = new != text
    if s.check:
        if changed:
            raise UserError(f"{readme} is stale — run: make readme-tables")
        return False
    if changed:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
        log.info("Saving %s", readme)
    else:
        log.info("%s already up to date", readme)
    return changed


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, ReadmeSettings)
    return p


main = cli.main_for(build_parser, ReadmeSettings, update)


if __name__ == "__main__":
    cli.run(main)
