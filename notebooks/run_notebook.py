"""Execute notebooks/latency_analysis.ipynb headless into an HTML report and one PNG per figure.

    python notebooks/run_notebook.py --model tiny                      # = make notebook
    python notebooks/run_notebook.py --model tiny --machine h100-sxm   # committed results/<machine>/tiny/*.json

Reads:  result files only — artifacts/<model>/profile/{benchmark-*,serving-*}.json, the profile summary JSON,
        artifacts/<model>/quantize/*/manifest.json; with --machine, results/<machine>/<model>/*.json instead of the
        profile folder; results/*/<model>/benchmark-*.json of other machines for the GPU-next-to-CPU figure.
Writes: artifacts/<model>/report/{latency_analysis.html, latency_analysis.ipynb (executed), *.png, figures.json,
        manifest.json}   (or --out DIR)

The notebook gets its parameters through environment variables (LMOPT_MODEL, LMOPT_ARTIFACTS, LMOPT_RESULTS,
LMOPT_MACHINE, LMOPT_REPORT_DIR). A missing input is a note in the report naming the make target; a cell that raises
(a bug, or a figure with an empty or unlabelled axes) fails the command and nothing is published.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("notebook")
REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "latency_analysis.ipynb"


@dataclass
class NotebookSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    results: str = "results"          # committed results root (results/<machine>/<model>/)
    machine: str = ""                 # read results/<machine>/<model>/ instead of this machine's artifacts
    out: str = ""                     # report folder (default artifacts/<model>/report)
    notebook: str = str(NOTEBOOK)
    cell_timeout: int = 300           # seconds per cell


def run_notebook(*, settings: NotebookSettings) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    from lmopt.manifest import package_versions, write_manifest
    from lmopt.paths import REPO_ROOT, check_writable, model_slug, staging_dir

    s = settings
    nb_path = Path(s.notebook)
    if not nb_path.is_file():
        raise UserError(f"missing notebook {nb_path} — pass --notebook FILE")
    if s.machine and not (Path(s.results) / s.machine).is_dir():
        have = sorted(p.name for p in Path(s.results).iterdir() if p.is_dir()) if Path(s.results).is_dir() else []
        raise UserError(f"no results for machine '{s.machine}' under {s.results}/ — use one of: "
                        f"{', '.join(have) or 'none committed yet'}, or leave --machine empty for this machine")
    final = Path(s.out) if s.out else Path(s.artifacts) / model_slug(s.model) / "report"
    check_writable(final.parent)
    nb = nbformat.read(nb_path, as_version=4)
    timings: dict[str, float] = {}
    with staging_dir(final) as tmp:
        # PYTHONPATH: the kernel imports lmopt from this checkout, whichever one the venv's editable install names
        env = {"PYTHONPATH": os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x),
               "LMOPT_MODEL": s.model, "LMOPT_ARTIFACTS": str(Path(s.artifacts).resolve()),
               "LMOPT_RESULTS": str(Path(s.results).resolve()), "LMOPT_MACHINE": s.machine,
               "LMOPT_REPORT_DIR": str(tmp.resolve()), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            client = NotebookClient(nb, timeout=s.cell_timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(REPO)}})
            with timed(log, f"executing {nb_path.name}", timings, "execute_s"):
                try:
                    client.execute()
                except CellExecutionError as e:
                    # keep what ran for the reader, next to (not in place of) the last good report
                    failed = final.parent / f"{final.name}-failed.ipynb"
                    nbformat.write(nb, failed)
                    first = next((l for l in str(e).splitlines() if "Error" in l), str(e).splitlines()[-1])
                    raise RuntimeError(f"a notebook cell failed ({first.strip()}); executed notebook with the "
                                       f"traceback: {failed}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        nbformat.write(nb, tmp / "latency_analysis.ipynb")
        html, _ = HTMLExporter(exclude_input=False).from_notebook_node(nb)
        (tmp / "latency_analysis.html").write_text(html)
        pngs = sorted(p.name for p in tmp.glob("*.png"))
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        if errors:  # allow_errors is off, so this is only a guard against a changed nbclient default
            raise RuntimeError(f"{len(errors)} cell(s) raised while executing {nb_path}")
        notes = [c for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "text/markdown" in o.get("data", {}) and "— run" in o["data"]["text/markdown"]]
        manifest = {"stage": "report", "variant": final.name, "model": model_slug(s.model),
                    "model_spec": s.model, "settings": asdict(s),
                    "outputs": {"html": "latency_analysis.html", "notebook": "latency_analysis.ipynb",
                                "figures": pngs},
                    "missing_inputs_notes": len(notes),
                    "versions": package_versions("matplotlib", "nbclient", "nbconvert", "numpy"),
                    "timings_s": timings}
        write_manifest(tmp, manifest)
    for p in pngs:
        log.info("Saving figure %s", final / p)
    log.info("Saving report to %s (%d figures, %d notes about missing inputs)", final / "latency_analysis.html",
             len(pngs), len(notes))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    d = NotebookSettings()
    cli.add_settings(p, NotebookSettings, skip=("notebook",))
    p.add_argument("--notebook", default=d.notebook, help="notebook to execute")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = cli.settings_from(NotebookSettings, args)
    t0 = time.time()
    run_notebook(settings=settings)
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
