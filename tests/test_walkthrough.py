"""The README's "Your own model" walkthrough, run as written on a random-weight model folder this test makes; then
what keeps one model's artifacts from another's: keys that differ for folders of the same name, and one-line
refusals of a foreign or stale artifact folder.

The only edits to the README's lines: the model folder's path for /path/to/your-model, a free port for 8080 (Triton's
ports and the artifacts root come through the environment, as `make` reads them)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from lmopt.serving import free_ports

HEADING = "## Your own model"


def walkthrough_commands() -> list[str]:
    """The README's walkthrough block: one shell command per line (continuations joined), comments kept."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(HEADING):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def save_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random-weight Llama folder (save_pretrained output) with the built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmopt.models import resolve

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(resolve("llama-test").config)
    model.save_pretrained(folder)
    resolve("llama-test").tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return {"root": root, "model": save_model(root / "a" / "my-model"), "art": root / "art"}


def _env(art: Path, ports: list[int]) -> dict:
    return dict(os.environ, ART=str(art), OPENAI_PORT=str(ports[0]), HTTP_PORT=str(ports[1]), GRPC_PORT=str(ports[2]),
                METRICS_PORT=str(ports[3]), PYTHONPATH=os.pathsep.join(
                    x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x))


def _sh(cmd: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail\n{cmd}"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def _process_groups(art: Path) -> list[int]:
    return [int(p.read_text()) for p in art.glob("*/serve/run*/*.pid")]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_readme_walkthrough_runs_as_written(own):
    from lmopt.models import model_key

    cmds = walkthrough_commands()
    assert cmds[0] == "M=/path/to/your-model", cmds[0]
    ports = free_ports(4)
    env = _env(own["art"], ports)
    prefix = f"M={own['model']}\n"
    key = model_key(str(own["model"]))
    assert re.fullmatch(r"my-model-[0-9a-f]{8}", key)
    started: list[int] = []
    try:
        for cmd in cmds[1:]:
            line = cmd.replace("8080", str(ports[0]))
            if line.startswith("curl") and shutil.which("curl") is None:
                warnings.warn("curl is not installed here: the README's curl line was not run (the openai client's "
                              "line sends the same request)")
                continue
            proc = _sh(prefix + line, env)
            assert proc.returncode == 0, f"`{cmd}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            if line.startswith("make export quantize"):
                # real file targets under the model's own key; asked again, make has nothing to do
                assert (own["art"] / key / "quantize" / "int8-cpu-u8s8-minmax" / "manifest.json").is_file()
                again = _sh(prefix + line.split("#")[0] + " -q", env)
                assert again.returncode == 0, "make -q: the walkthrough's targets are not up to date after a run"
                rerun = _sh(prefix + line, env)
                assert rerun.returncode == 0 and "convert/" not in rerun.stdout, rerun.stdout
            if line.startswith("make serve-openai"):
                started = _process_groups(own["art"])
                assert len(started) == 2 and all(map(_alive, started)), started
                assert (own["art"] / key / "serve" / "run" / "openai.log").is_file()
            if line.startswith("curl"):
                assert json.loads(proc.stdout)["choices"][0]["finish_reason"] in ("length", "stop"), proc.stdout
            if "OpenAI(" in line:
                assert proc.stdout.strip() != "", "the openai client printed no text"
            if line.startswith("make serve-stop"):
                deadline = time.monotonic() + 30
                while any(map(_alive, started)) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert not any(map(_alive, started)), "make serve-stop left a process behind"
                assert not _process_groups(own["art"])
        assert (own["art"] / key / "profile" / "benchmark-cpu.json").is_file()
        assert (own["art"] / key / "report" / "latency_analysis.html").is_file()
    finally:
        _sh("make serve-stop", env)
        for pgid in started:
            if _alive(pgid):
                os.killpg(pgid, signal.SIGKILL)


def _export(model: Path, art: Path) -> Path:
    from lmopt.models import model_key

    folder = art / model_key(str(model)) / "export" / "fp32"
    if not (folder / "manifest.json").is_file():
        run_cli("convert/export_onnx.py", "--model", str(model), "--artifacts", str(art), "-q")
    return folder


def test_same_folder_name_separate_artifacts(own):
    a = _export(own["model"], own["art"])
    manifest_a = (a / "manifest.json").read_text()
    b_model = save_model(own["root"] / "b" / "my-model", seed=1)
    b = _export(b_model, own["art"])
    assert a != b and a.parent.parent.name.startswith("my-model-") and b.parent.parent.name.startswith("my-model-")
    assert (a / "manifest.json").read_text() == manifest_a  # the second export left the first alone
    assert json.loads((b / "manifest.json").read_text())["model_source"] == str(b_model.resolve())
    assert json.loads(manifest_a)["model_source"] == str(own["model"].resolve())


def test_foreign_artifact_folder_refused(own):
    from lmopt.models import model_key

    a = _export(own["model"], own["art"])
    c_model = save_model(own["root"] / "c" / "my-model")
    other = own["root"] / "art-copied"
    # an artifacts tree copied where another folder's key points (same name, other source)
    shutil.copytree(a.parent.parent, other / model_key(str(c_model)))
    proc = run_cli("convert/quantize_model.py", "--model", str(c_model), "--artifacts", str(other), check=False)
    assert_one_line_error(proc, "was made from", str(own["model"].resolve()), "another --artifacts")


def test_hub_id_offline_one_line_fast(tmp_path):
    """No network (an endpoint nothing listens on) and an empty cache: one line within 5 s that says the hub is
    unreachable and names HF_HUB_OFFLINE=1 and the local-folder route."""
    port = free_ports(1)[0]
    t0 = time.monotonic()
    proc = run_cli("convert/export_onnx.py", "--model", "gpt2", "--artifacts", str(tmp_path / "art"), check=False,
                   env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "HF_HUB_OFFLINE": ""})
    assert time.monotonic() - t0 <= 5.0
    assert proc.stdout.strip() == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_one_line_error(proc, "hub", "unreachable", "HF_HUB_OFFLINE=1", "local model folder")
    assert "not found" not in proc.stderr


def test_hub_id_unknown_to_a_reachable_hub_says_not_found(tmp_path):
    """A hub that answers 404 (here a local HTTP server standing in for it): one line that says 'not found', not
    'unreachable'."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_cli("convert/export_onnx.py", "--model", "no-org/no-such-model", "--artifacts",
                       str(tmp_path / "art"), check=False,
                       env={"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                            "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": ""})
    finally:
        server.shutdown()
    assert_one_line_error(proc, "'no-org/no-such-model' was not found on the Hugging Face hub", "HTTP 404")
    assert "unreachable" not in proc.stderr


def test_hub_id_in_a_written_cache_loads_offline(tmp_path):
    """The same unreachable hub, with the model in a Hugging Face cache laid out by this test: it loads."""
    snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / "0123abc"
    save_model(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    code = ("from lmopt.models import load_model, resolve; m = resolve('gpt2'); load_model(m); "
            "print(m.kind, m.key, m.config.model_type, m.context_length, len(m.tokenizer))")
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{free_ports(1)[0]}", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_HUB_OFFLINE="", PYTHONPATH=str(REPO))
    import sys

    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:4] == ["hub", "gpt2", "llama", "256"], proc.stdout


def test_stale_artifact_folder_refused(own):
    """The model folder re-saved with another config after its export: the next stage refuses the export as stale.
    (Last in this file: it changes the shared model folder.)"""
    _export(own["model"], own["art"])
    cfg = json.loads((own["model"] / "config.json").read_text())
    (own["model"] / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    proc = run_cli("convert/quantize_model.py", "--model", str(own["model"]), "--artifacts", str(own["art"]),
                   check=False)
    assert_one_line_error(proc, "is stale", "make export MODEL=")


STAGE_SCRIPTS = sorted(str(p.relative_to(REPO)) for d in ("convert", "optimize", "serve", "profile", "report",
                                                          "notebooks", "diagrams", "models")
                       for p in (REPO / d).rglob("*.py") if "__main__" in p.read_text() and "templates" not in p.parts)


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_without_the_project_one_line(script, tmp_path):
    """Run by a Python that lacks the project (here: no site-packages, no PYTHONPATH): one line naming `make setup`
    and .venv/bin/python, instead of a ModuleNotFoundError traceback."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", str(REPO / script), "--help"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "make setup" in lines[0] and ".venv/bin/python" in lines[0], proc.stderr


def test_missing_dependency_one_line(capsys):
    """lmopt importable but a pinned package missing (another Python than .venv's): the same advice, one line."""
    from lmopt.errors import cli_main

    def main(argv):
        import lmopt_no_such_dependency  # noqa: F401

    assert cli_main(main) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lmopt_no_such_dependency" in err[0] and "make setup" in err[0], err
