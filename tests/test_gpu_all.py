"""profile/gpu_all.sh --dry-run: the GPU parts cannot run in CI, so their commands are checked here instead — every
script they call exists and its parser takes the flags they pass, every shell script exists, and the time guard splits
the parts into device calls of at most GPU_BUDGET_S seconds (docs/gpu_runbook.md)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

ALL = "suite,profile,triton,quant,inflight,openai,gilab,scaleout,load,decode"


def _dry(tmp_path, parts: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "profile" / "gpu_all.sh"), "--dry-run", str(tmp_path / "out"), parts],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_every_part_checks_out_and_is_planned_into_calls(tmp_path):
    p = _dry(tmp_path, ALL)
    assert p.returncode == 0 and "FAIL" not in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.stdout.count("   ok: ") >= 20      # each Python command's flags went through its parser
    plan = p.stdout.strip().splitlines()[-1]
    assert plan.endswith("call 1: suite; call 2: profile; call 3: triton; call 4: quant; call 5: inflight; "
                         "call 6: openai; call 6: gilab; call 7: scaleout; call 8: load; call 9: decode"), plan
    assert not (tmp_path / "out" / "gpu-results.tar.gz").exists()      # nothing ran


def test_the_next_sessions_two_calls_and_what_a_typo_gives(tmp_path):
    p = _dry(tmp_path, "load,decode")
    assert p.returncode == 0, p.stdout[-3000:]
    assert "device calls of at most 560 s: call 1: load; call 2: decode" in p.stdout
    assert "a device call carries the tracked tree" in p.stdout
    assert (tmp_path / "out" / "skipped.txt").read_text().split() == ["decode"]
    bad = _dry(tmp_path, "decode nonsense", DECODE_ARGS="--baseline-lonng")
    assert bad.returncode == 1
    assert "FAIL: profile/decode_kernels_gpu.py rejects its arguments" in bad.stdout and "--baseline-lonng" in bad.stdout
    assert "FAIL: unknown part nonsense" in bad.stdout
    # a larger budget puts both parts into one call
    one = _dry(tmp_path, "load,decode", GPU_BUDGET_S="900")
    assert one.returncode == 0 and "call 1: load; call 1: decode" in one.stdout
