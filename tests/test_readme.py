"""The README's commands cannot drift from the code: every command in its bash blocks names a real make target or
script, every Python stage command's flags parse with that script's own parser, and the generated result sections
equal what report/update_readme.py renders from the committed result files. (The commands themselves run for real
in the stage tests and in `make demo`.)"""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import REPO, load_script, run_cli

BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _commands() -> list[list[str]]:
    cmds = []
    text = (REPO / "README.md").read_text()
    for block in BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(shlex.split(line))
    return cmds


COMMANDS = _commands()


def test_readme_has_commands():
    heads = {c[0] for c in COMMANDS}
    assert {"make", ".venv/bin/python", "bash"} <= heads
    assert ["make", "demo"] in COMMANDS and ["make", "test"] in COMMANDS


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0] == "make"], ids=lambda c: " ".join(c))
def test_make_targets_exist(cmd):
    targets = [w for w in cmd[1:] if "=" not in w and not w.startswith("-")]
    for t in targets:
        # -n: print, do not run; -q would be fooled by phony targets
        proc = subprocess.run(["make", "-n", "--no-print-directory", t], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert "No rule to make target" not in proc.stderr, f"README names `make {t}`, the Makefile has no such target"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0] in (".venv/bin/python", "python")
                                 and c[1].endswith(".py")], ids=lambda c: " ".join(c[:2]))
def test_python_commands_parse(cmd):
    script = REPO / cmd[1]
    assert script.is_file(), f"README runs {cmd[1]}, which does not exist"
    mod = load_script(cmd[1])
    try:
        mod.build_parser().parse_args(cmd[2:])
    except SystemExit as e:
        raise AssertionError(f"README's `{' '.join(cmd)}`: its flags no longer parse (exit {e.code})") from None


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0] == "bash"], ids=lambda c: " ".join(c[:2]))
def test_bash_scripts_exist(cmd):
    assert (REPO / cmd[1]).is_file(), f"README runs {cmd[1]}, which does not exist"


def test_result_sections_are_current():
    proc = run_cli("report/update_readme.py", "--check", check=False, timeout=300)
    assert proc.returncode == 0, "README result sections are stale — run: make readme-tables\n" + proc.stderr[-2000:]
