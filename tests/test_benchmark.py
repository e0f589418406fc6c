"""profile/benchmark.py, publish_results.py, update_readme.py, summarize_artifacts.py on the built-in model: real
runs, self-describing results, rows that cannot run say why, README sections rendered from result files."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO, assert_one_line_error, read_json, run_cli
from lmopt.results import SCHEMA_VERSION


@pytest.fixture(scope="module")
def bench_result(tiny_export, artifacts):
    out = artifacts / "tiny" / "profile" / "benchmark-cpu.json"
    proc = run_cli("profile/benchmark.py", "--model", "tiny", "--artifacts", str(artifacts),
                   "--batch-sizes", "1,2", "--short-prompt", "8", "--long-prompt", "32", "--max-new-tokens", "6",
                   "--warmup", "1", "--repeats", "2", "--threads", "2", "--bandwidth-mb", "16")
    return read_json(out), proc.stdout


def test_benchmark_result_file(bench_result):
    r, stdout = bench_result
    assert r["kind"] == "benchmark" and r["schema"] == SCHEMA_VERSION and r["model"] == "tiny"
    assert len(r["load_average"]["start"]) == 3 and "load average" in stdout
    for key in ("machine", "versions", "command", "settings", "rows", "created"):
        assert r[key]
    assert r["baseline"] == {"engine": "torch", "precision": "fp32"}
    ok = {(x["engine"], x["precision"]): x for x in r["rows"] if x["status"] == "ok"}
    assert set(ok) >= {("torch", "fp32"), ("ort", "fp32")}
    for row in ok.values():
        for b in ("1", "2"):
            d = row["samples"][b]
            assert len(d["short"]["ttft_s"]) == 2 and len(d["long"]["ttft_s"]) == 2  # repeats, warm-up dropped
            assert all(len(run) == 5 for run in d["short"]["step_s"])  # new_tokens - 1 decode steps
            m = row["summary"][b]
            assert m["step_ms"]["p50"] <= m["step_ms"]["p90"] <= m["step_ms"]["p99"]
            assert m["step_ms"]["count"] == 2 * 2 * 5  # repeats x prompts x decode steps
            assert m["decode_tokens_per_s"] == pytest.approx(int(b) / (m["step_ms"]["p50"] / 1e3), rel=1e-3)
            assert m["bandwidth_floor_ms"] > 0
        assert row["memory"]["rss_after_load_mb"] > 0
    # ORT FP32 computes the same greedy tokens as the baseline
    assert ok[("ort", "fp32")]["summary"]["1"]["agreement_vs_baseline"] == 1.0
    assert "Before vs After" in stdout


def test_rows_that_cannot_run_say_why(bench_result):
    r, stdout = bench_result
    skipped = {(x["engine"], x["precision"]): x["reason"] for x in r["rows"] if x["status"] != "ok"}
    if ("ort", "fp16") in skipped:
        assert "make fp16" in skipped[("ort", "fp16")] or "--engine trt" in skipped[("ort", "fp16")]
    assert "--device cuda" in skipped[("torch", "fp16")]
    assert "TensorRT" in skipped[("trt", "fp16")]
    for (e, p), reason in skipped.items():
        assert f"{e} {p}: not run — {reason}" in stdout


def test_publish_and_readme_tables(bench_result, artifacts, tmp_path):
    results = tmp_path / "results"
    run_cli("report/publish_results.py", "--artifacts", str(artifacts), "--results", str(results))
    published = list(results.glob("*/tiny/benchmark-cpu.json"))
    assert len(published) == 1 and published[0].parent.parent.name.startswith("cpu-")
    readme = tmp_path / "README.md"
    shutil.copyfile(REPO / "README.md", readme)
    run_cli("report/update_readme.py", "--readme", str(readme), "--results", str(results))
    text = readme.read_text()
    section = text.split("<!-- BEGIN before-vs-after")[1].split("<!-- END before-vs-after -->")[0]
    r = bench_result[0]
    ort = next(x for x in r["rows"] if x["engine"] == "ort" and x["status"] == "ok")
    p50_ms = ort["summary"]["1"]["step_ms"]["p50"]
    assert (f"{p50_ms:.2f}" if p50_ms < 10 else f"{p50_ms:.1f}") in section  # the number comes from the file
    assert r["created"][:10] in section and "benchmark.py" in section and "cores" in section
    tiny = text.split("<!-- BEGIN tiny-model")[1].split("<!-- END tiny-model -->")[0]
    training = json.loads((REPO / "models" / "tiny" / "training.json").read_text())
    assert f"{training['eval_perplexity']:.1f}" in tiny
    # a second run changes nothing, and --check agrees
    run_cli("report/update_readme.py", "--readme", str(readme), "--results", str(results), "--check")


def test_summary_lists_stages(bench_result, artifacts):
    proc = run_cli("report/summarize_artifacts.py", "--artifacts", str(artifacts))
    assert "export:" in proc.stdout and "fp32: [ok]" in proc.stdout
    assert "benchmark-cpu.json" in proc.stdout and "ort fp32" in proc.stdout


def test_benchmark_bad_input(tmp_path):
    proc = run_cli("profile/benchmark.py", "--engines", "torch,tensorflow", "--artifacts", str(tmp_path), check=False)
    assert_one_line_error(proc, "unknown engine 'tensorflow'")
    proc = run_cli("profile/benchmark.py", "--engines", "ort", "--precisions", "int8", "--artifacts", str(tmp_path),
                   check=False)
    assert_one_line_error(proc, "nothing to benchmark", "run: make quantize")
