"""The README's commands cannot drift from the code: every command in its bash blocks names a real make target or
script, every Python stage command's flags parse with that script's own parser, and the generated sections (the
README's headline table, every table of results/README.md) equal what report/update_readme.py renders from the
committed result files. The README stays short (12 KB), and its commands are the two of the quick start plus the
"Your own model" walkthrough, which tests/test_walkthrough.py runs as written."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import REPO, load_script, run_cli

BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _commands(path=REPO / "README.md") -> list[list[str]]:
    cmds = []
    text = path.read_text()
    for block in BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(shlex.split(line))
    return cmds


COMMANDS = _commands()
# the reference pages the README links to hold the commands it used to: they are checked the same way
DOC_COMMANDS = [c for p in sorted((REPO / "docs").glob("*.md")) for c in _commands(p)]


def test_readme_has_commands():
    heads = {c[0] for c in COMMANDS}
    assert {"make", ".venv/bin/python", "curl"} <= heads
    assert ["make", "demo"] in COMMANDS and ["make", "test"] in COMMANDS


def test_readme_is_short():
    assert len((REPO / "README.md").read_bytes()) <= 12 * 1024, "README.md is over 12 KB — move reference to docs/"


def test_every_readme_command_runs_in_a_test():
    """The quick start's two commands (`make test` is what CI runs; `make demo` chains targets the tests run one by
    one) and the walkthrough, which tests/test_walkthrough.py runs line by line; nothing else, unless a later block
    says on each line that it needs a GPU."""
    from test_walkthrough import walkthrough_commands

    walk = {" ".join(shlex.split(re.sub(r"\\\n\s*", " ", c).split("  #")[0])) for c in walkthrough_commands()}
    others = [" ".join(c) for c in COMMANDS if " ".join(c) not in walk]
    assert sorted(others) == ["make demo", "make test"], others


@pytest.mark.parametrize("cmd", [c for c in COMMANDS + DOC_COMMANDS if c[0] == "make"], ids=lambda c: " ".join(c))
def test_make_targets_exist(cmd):
    targets = [w for w in cmd[1:] if "=" not in w and not w.startswith("-")]
    for t in targets:
        # -n: print, do not run; -q would be fooled by phony targets
        proc = subprocess.run(["make", "-n", "--no-print-directory", t], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert "No rule to make target" not in proc.stderr, f"README names `make {t}`, the Makefile has no such target"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS + DOC_COMMANDS if c[0] in (".venv/bin/python", "python")
                                 and c[1].endswith(".py")], ids=lambda c: " ".join(c[:2]))
def test_python_commands_parse(cmd):
    script = REPO / cmd[1]
    assert script.is_file(), f"README runs {cmd[1]}, which does not exist"
    mod = load_script(cmd[1])
    try:
        mod.build_parser().parse_args(cmd[2:])
    except SystemExit as e:
        raise AssertionError(f"README's `{' '.join(cmd)}`: its flags no longer parse (exit {e.code})") from None


@pytest.mark.parametrize("cmd", [c for c in COMMANDS + DOC_COMMANDS if c[0] == "bash"], ids=lambda c: " ".join(c[:2]))
def test_bash_scripts_exist(cmd):
    assert (REPO / cmd[1]).is_file(), f"README runs {cmd[1]}, which does not exist"


@pytest.mark.parametrize("readme", ["README.md", "results/README.md"])
def test_result_sections_are_current(readme):
    proc = run_cli("report/update_readme.py", "--readme", readme, "--check", check=False, timeout=300)
    assert proc.returncode == 0, f"{readme}'s generated sections are stale — run: make readme-tables\n" + \
        proc.stderr[-2000:]


def test_make_help_lists_every_target():
    """`make help`: one line per target the Makefile defines (a target without a `## ...` description fails)."""
    makefile = (REPO / "Makefile").read_text()
    targets = sorted(set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", makefile, re.M)))
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
    listed = re.findall(r"^  make (\S+)\s", out, re.M)
    assert sorted(listed) == targets and len(listed) == len(set(listed)), set(targets) ^ set(listed)
