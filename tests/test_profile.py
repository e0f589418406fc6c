"""Stage 7 (profile/run_nsys_profile.py, profile/nsys_*.py, lmopt/nvtx_ranges.py): a real Nsight Systems capture of the
built-in model, the PyTorch profiler backend, the summary's GPU figures on a known trace, the NVTX overhead
measurement, and one-line errors."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest

from conftest import assert_one_line_error, no_partial, read_json, run_cli


NSYS = shutil.which("nsys")
needs_nsys = pytest.mark.skipif(NSYS is None, reason="nsys not installed — run: make setup-nsys (Debian 12, as root); "
                                "NSYS=0 declined it")
WORK = {"tokenize", "prefill", "sample", "decode_step", "detokenize"}


@needs_nsys
def test_nsys_profile_builtin_model(tiny_export, artifacts):
    rounds, new = 2, 6
    run_cli("profile/run_nsys_profile.py", "--model", "tiny", "--artifacts", str(artifacts), "--profiler", "nsys",
            "--repeats", str(rounds), "--warmup", "1", "--max-new-tokens", str(new), "--nsys-timeout", "180")
    out = artifacts / "tiny" / "profile" / "nsys-ort-fp32-cpu"
    r = read_json(out / "summary.json")
    assert (out / "run.nsys-rep").stat().st_size > 10_000 and (out / "manifest.json").is_file()
    assert not (out / "run.sqlite").exists() and no_partial(out.parent)
    assert r["profiler"] == "nsys" and {"nvtx", "osrt"} <= set(r["summary"]["traced"])
    ranges = r["summary"]["nvtx"]["ranges"]
    assert WORK | {"generate", "d2h"} <= set(ranges)
    # capture range = steady state only: warm-up rounds are not in the report
    assert ranges["generate"]["count"] == rounds and ranges["prefill"]["count"] == rounds
    assert ranges["decode_step"]["count"] == rounds * (new - 1) == sum(r["raw"]["decode_steps"])
    assert ranges["sample"]["count"] == rounds * new
    for st in ranges.values():
        assert st["total_ms"] > 0 and st["p90_ms"] >= st["min_ms"]
    n = r["summary"]["nvtx"]
    assert set(n["work_ranges"]) == WORK
    assert n["adds_up_within_10pct"], n
    assert r["summary"]["cuda_kernels"] is None and any("no GPU" in x for x in r["not_traced"])
    assert r["pinned_vs_pageable"]["status"].startswith("skipped: needs a GPU")


def test_torch_profiler_backend_on_cpu(tmp_path):
    out = tmp_path / "prof"
    run_cli("profile/run_nsys_profile.py", "--model", "llama-test", "--engine", "torch", "--profiler", "torch",
            "--artifacts", str(tmp_path), "--repeats", "1", "--warmup", "1", "--max-new-tokens", "4", "--out", str(out))
    r = read_json(out / "summary.json")
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    assert any(e.get("cat") == "user_annotation" and e.get("name") == "decode_step" for e in trace["traceEvents"])
    ranges = r["summary"]["nvtx"]["ranges"]
    assert ranges["decode_step"]["count"] == 3 and ranges["h2d"]["count"] == 4 and ranges["d2h"]["count"] == 4
    ops = r["summary"]["cpu_ops"]["by_self_time"]
    assert ops and any(o["name"].startswith("aten::") for o in ops)
    assert any("osrt" in x for x in r["not_traced"]) and any("no GPU" in x for x in r["not_traced"])


def test_summary_gpu_figures_from_known_trace(tmp_path):
    """Kernel, memcpy, launch-gap and overlap figures from a hand-made Kineto-format trace with known answers."""
    from lmopt.profiling.nsys_summary import events_from_chrome_trace, summarize

    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "profile", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "generate", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "decode_step", "ts": 0, "dur": 95, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 2, "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5, "dur": 2, "args": {"correlation": 8}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 11, "dur": 20, "args": {"stream": 7, "correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 31, "dur": 20, "args": {"stream": 7, "correlation": 8}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 41, "dur": 20,
         "args": {"stream": 9, "bytes": 4000}},
    ]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": ev}))
    s = summarize(events_from_chrome_trace(tmp_path / "t.json"), "profile", wall_s=100e-6)
    assert s["cuda_kernels"]["kernels"] == 2 and s["cuda_kernels"]["by_name"][0]["total_ms"] == pytest.approx(0.04)
    assert s["memcpy"]["HtoD"]["bytes"] == 4000 and s["memcpy"]["HtoD"]["memory_kinds"] == {"pageable->device": 1}
    assert s["memcpy"]["HtoD"]["GB_per_s"] == pytest.approx(0.2)
    assert s["launch_to_start"]["count"] == 2 and s["launch_to_start"]["mean_us"] == pytest.approx(18.0)
    # busy 11..61 = 50 us; two streams busy 41..51 = 10 us
    assert s["stream_overlap"]["multi_stream_share"] == pytest.approx(0.2)
    assert s["nvtx"]["work_ranges_share_of_wall"] == pytest.approx(0.95)


def test_nvtx_ranges_switch_and_hook():
    from lmopt import nvtx_ranges as nr

    seen = []

    class Rec:
        def __init__(self, name):
            seen.append(name)

        def __enter__(self):
            pass

        def __exit__(self, *a):
            return False

    prev = nr.set_enabled(False)
    try:
        with nr.nvtx_range("a"):
            pass
        nr.set_range_hook(Rec)
        with nr.nvtx_range("b"):
            pass
        nr.set_enabled(True)
        with nr.nvtx_range("c"):   # NVTX on + hook: both entered, no profiler needed
            pass
    finally:
        nr.set_range_hook(None)
        nr.set_enabled(prev)
    assert seen == ["b", "c"]


def test_nvtx_overhead_cli(tmp_path):
    out = tmp_path / "ovh"
    run_cli("profile/nsys_nvtx_overhead.py", "--model", "llama-test", "--engine", "torch", "--artifacts",
            str(tmp_path), "--repeats", "2", "--warmup", "1", "--max-new-tokens", "4", "--out", str(out))
    r = read_json(out / "result.json")
    assert len(r["raw"]["annotated_round_s"]) == len(r["raw"]["bare_round_s"]) == 2
    # tokenize, prefill, detokenize once; sample/h2d/d2h per token; decode_step per token after the first
    assert r["raw"]["ranges_per_round"] == {"tokenize": 1, "prefill": 1, "h2d": 4, "d2h": 4, "sample": 4,
                                            "decode_step": 3, "detokenize": 1}
    assert 0 < r["summary"]["range_cost_us_annotated"] < 100 and "overhead_measured" in r["summary"]


def test_nsys_missing_is_one_line(tmp_path):
    proc = run_cli("profile/run_nsys_profile.py", "--profiler", "nsys", "--artifacts", str(tmp_path), check=False,
                   env={"PATH": str(tmp_path)})
    assert_one_line_error(proc, "nsys is not on PATH", "make setup-nsys")


def test_missing_export_is_one_line(tmp_path):
    proc = run_cli("profile/run_nsys_profile.py", "--profiler", "torch", "--artifacts", str(tmp_path / "a"),
                   check=False)
    assert_one_line_error(proc, "make export")
    assert no_partial(tmp_path / "a")


def test_help_works():
    for script in ("profile/run_nsys_profile.py", "profile/nsys_nvtx_overhead.py"):
        proc = run_cli(script, "--help")
        assert "--model" in proc.stdout and "--artifacts" in proc.stdout
