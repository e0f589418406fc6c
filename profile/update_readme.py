"""Regenerate the README's result sections from committed files, so no number in the README is typed by hand.

    python profile/update_readme.py                 # rewrite README.md in place
    python profile/update_readme.py --check         # exit 1 if README.md is stale (CI)
    make readme-tables

Reads:  results/<machine-tag>/<model>/benchmark-*.json (copied from artifacts by `make publish-results`),
        models/tiny/training.json, and whatever other developers' renderers read.
Writes: README.md, only between `<!-- BEGIN name ... -->` and `<!-- END name -->` markers.

Sections and who renders them:
  tiny-model       render_tiny_model(repo_root)       here, from models/tiny/training.json
  before-vs-after  render_before_after(results_dir)   here, from results/*/*/benchmark-*.json
  <name>           profile/<name>_report.py's `render(results_dir) -> str`, imported if that module exists
                   (e.g. `serving` -> profile/serving_report.py, `gpu` -> profile/gpu_report.py). A module adds a
                   section by existing; no edit here is needed. A section whose renderer is absent is left as is.
Every rendered table states the machine, date and command of its data.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmopt.errors import UserError, cli_main  # noqa: E402
from lmopt.log import add_verbosity_args, get_logger, setup_logging  # noqa: E402
from lmopt.paths import REPO_ROOT  # noqa: E402

log = get_logger("update_readme")
PROFILE_DIR = Path(__file__).resolve().parent
MARKER = re.compile(r"(<!-- BEGIN ([\w-]+)[^>]*-->)(.*?)(<!-- END \2 -->)", re.S)


@dataclass
class ReadmeSettings:
    readme: str = "README.md"
    results: str = "results"
    check: bool = False


def _load_profile_module(name: str):
    path = PROFILE_DIR / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"lmopt_profile_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def render_tiny_model(repo_root: Path = REPO_ROOT) -> str:
    path = repo_root / "models" / "tiny" / "training.json"
    if not path.is_file():
        raise UserError(f"missing {path} — run: python models/train_tiny.py --out models/tiny")
    t = json.loads(path.read_text())
    s = t.get("settings", {})
    try:
        date = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=repo_root, text=True,
                              capture_output=True, timeout=30).stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        date = "unknown"
    rows = [("parameters", f"{t['parameters'] / 1e6:.2f}M"),
            ("layers / hidden / heads (KV heads)",
             f"{s.get('num_layers')} / {s.get('hidden_size')} / {s.get('num_heads')} ({s.get('num_kv_heads')})"),
            ("vocabulary / context", f"{s.get('vocab_size')} / {s.get('max_positions')}"),
            ("training tokens / steps", f"{t['train_tokens']} / {s.get('steps')}"),
            ("final training loss", f"{t['final_train_loss']:.3f}"),
            ("held-out perplexity (uniform baseline)", f"{t['eval_perplexity']:.1f} ({t['uniform_perplexity']})"),
            ("training time", f"{t['train_seconds']:.0f} s on {s.get('threads', '?')} CPU threads")]
    lines = [f"Built-in model `tiny` — from `models/tiny/training.json` (committed {date}; machine: CPU, "
             f"{s.get('threads', '?')} threads, torch {t.get('torch')}, Python {t.get('python')}; "
             f"command `{t.get('command', '').strip()}`):", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def render_before_after(results_dir: Path) -> str:
    bench = _load_profile_module("benchmark")
    files = sorted(Path(results_dir).glob("*/*/benchmark-*.json"))
    if not files:
        return "_No committed benchmark results yet: run `make benchmark publish-results readme-tables`._"
    parts = []
    for f in files:
        result = json.loads(f.read_text())
        if result["settings"]["device"] != "cpu":  # GPU results have their own section (profile/gpu_report.py)
            continue
        tag = f.parent.parent.name
        parts.append(f"#### {result['model']} — {tag} ({result['settings']['device']})\n\n"
                     f"From `{Path(results_dir.name) / f.relative_to(results_dir)}`: "
                     + bench.render_table(result, markdown=True))
    return "\n\n".join(parts)


def renderers(results_dir: Path) -> dict:
    return {"tiny-model": lambda: render_tiny_model(),
            "before-vs-after": lambda: render_before_after(results_dir)}


def update(*, settings: ReadmeSettings) -> bool:
    """Rewrite the marked sections; return True when the README changed (or, with check, would change)."""
    s = settings
    readme = Path(s.readme)
    if not readme.is_file():
        raise UserError(f"missing {readme} — pass --readme PATH")
    results = Path(s.results)
    text = readme.read_text()
    own = renderers(results)

    def section(m: re.Match) -> str:
        name = m.group(2)
        if name in own:
            body = own[name]()
        else:
            mod = _load_profile_module(f"{name}_report")
            if mod is None or not hasattr(mod, "render"):
                log.info("section %s: no profile/%s_report.py with render(); left as is", name, name)
                return m.group(0)
            body = mod.render(results)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ReadmeSettings()
    p.add_argument("--readme", default=d.readme, help="README to update in place")
    p.add_argument("--results", default=d.results, help="committed results folder")
    p.add_argument("--check", action="store_true", help="only check: exit 1 if the README is stale")
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    update(settings=ReadmeSettings(**{f.name: getattr(args, f.name) for f in fields(ReadmeSettings)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
