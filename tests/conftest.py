"""Shared fixtures: run the real CLIs in subprocesses against artifacts in temporary folders."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import re

import pytest

REPO = Path(__file__).resolve().parent.parent
# lmopt from this checkout (also when the venv's editable install names another checkout); scripts run by run_cli
# get the same through PYTHONPATH. The one sys.path edit in the repository.
sys.path.insert(0, str(REPO))


def load_script(script: str):
    """Import a stage script (e.g. "optimize/build_trt_engine.py") as a module, to call its functions in-process.

    Scripts import only lmopt, never each other, so no search-path edit is needed; the module is registered in
    sys.modules because dataclasses look their module up by name."""
    path = REPO / script
    name = "script_" + re.sub(r"\W", "_", script.removesuffix(".py"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # scripts do nothing at import
    return mod


def run_cli(script: str, *args: str, check: bool = True, timeout: float = 900, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo root; return the completed process (text output)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
             PYTHONPATH=os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x))
    if env:
        e.update(env)
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=e, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, one `error:` line that contains the needles."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def no_partial(folder: Path) -> bool:
    """True when a folder holds no temporary/half-written stage output."""
    if not folder.exists():
        return True
    return not any(".tmp-" in p.name or p.name.endswith(".tmp") for p in folder.rglob("*"))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts root for the session: stages that later tests read are built once."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_export(artifacts) -> Path:
    """The built-in model exported once per test session."""
    run_cli("convert/export_onnx.py", "--model", "tiny", "--artifacts", str(artifacts))
    return artifacts / "tiny" / "export" / "fp32"


@pytest.fixture(scope="session")
def gpt2_test_export(artifacts) -> Path:
    run_cli("convert/export_onnx.py", "--model", "gpt2-test", "--artifacts", str(artifacts))
    return artifacts / "gpt2-test" / "export" / "fp32"
