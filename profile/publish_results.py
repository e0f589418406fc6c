"""Copy the benchmark result files of the artifacts tree into the committed results/ tree, one folder per machine.

    python profile/publish_results.py                      # every artifacts/*/profile/benchmark-*.json
    python profile/publish_results.py --model gpt2-124m    # one model
    make publish-results [MODEL=gpt2-124m]

Reads:  artifacts/<model>/profile/benchmark-*.json (written by profile/benchmark.py)
Writes: results/<machine-tag>/<model>/benchmark-<device>.json, machine-tag from the file's own machine record
        (e.g. cpu-amd-epyc-2c, nvidia-h200), so results from different machines never overwrite each other.
The README tables (make readme-tables) are rendered from results/, never from artifacts/.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmopt.errors import UserError, cli_main  # noqa: E402
from lmopt.log import add_verbosity_args, get_logger, setup_logging  # noqa: E402

log = get_logger("publish")


@dataclass
class PublishSettings:
    artifacts: str = "artifacts"
    results: str = "results"
    model: str = ""            # empty = every model under --artifacts


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def machine_tag(result: dict) -> str:
    """A short, stable folder name for the machine a result came from."""
    m = result.get("machine", {})
    if m.get("gpu") and str(result.get("settings", {}).get("device", "cpu")).startswith("cuda"):
        return _slug(m["gpu"]["name"])
    cpu = m.get("cpu_model") or m.get("processor") or "cpu"
    words = [w for w in _slug(re.sub(r"\(.*?\)|processor|\d+-core", "", cpu, flags=re.I)).split("-") if w][:2]
    return "cpu-" + "-".join(words) + f"-{m.get('cpu_count', '?')}c"


def publish(*, settings: PublishSettings) -> list[Path]:
    s = settings
    root = Path(s.artifacts)
    pattern = f"{s.model}/profile/benchmark-*.json" if s.model else "*/profile/benchmark-*.json"
    found = sorted(root.glob(pattern))
    if not found:
        raise UserError(f"no benchmark results under {root / pattern} — run: make benchmark"
                        + (f" MODEL={s.model}" if s.model else ""))
    written = []
    for f in found:
        try:
            result = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"corrupt result file {f} ({e.msg}) — rerun: make benchmark") from None
        dest = Path(s.results) / machine_tag(result) / result["model"] / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        log.info("Saving %s to %s", f, dest)
        written.append(dest)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PublishSettings()
    p.add_argument("--artifacts", default=d.artifacts, help="artifacts root folder")
    p.add_argument("--results", default=d.results, help="committed results folder")
    p.add_argument("--model", default=d.model, help="only this model (default: all)")
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    publish(settings=PublishSettings(**{f.name: getattr(args, f.name) for f in fields(PublishSettings)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
