"""profile/benchmark.py, publish_results.py, update_readme.py, summarize_artifacts.py on the built-in model: real
runs, self-describing results, rows that cannot run say why, README sections rendered from result files."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO, assert_one_line_error, load_script, read_json, run_cli
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
    # the floor divides by the read bandwidth of every core, measured in this run; no row beats it
    probe = r["read_bandwidth_probe"]
    assert r["read_bandwidth_gbs"] == probe["gbs"] > 0 and probe["buffer_bytes"] == 16 << 20
    assert probe["threads"] >= 1 and r["copy_bandwidth_gbs"] > 0
    assert r["measurement_errors"] == []
    assert all(m["below_floor"] is False for row in ok.values() for m in row["summary"].values())
    assert "GB/s read bandwidth" in stdout


def test_read_bandwidth_probe_restores_threads():
    import torch

    from lmopt.results import read_bandwidth_gbs

    before = torch.get_num_threads()
    one = read_bandwidth_gbs("cpu", 8 << 20, reps=2, threads=1)
    assert one["gbs"] > 0 and one["threads"] == 1 and one["reps"] == 2
    assert torch.get_num_threads() == before
    assert read_bandwidth_gbs("cpu", 0) is None


def test_rows_faster_than_the_floor_are_measurement_errors(bench_result, tmp_path):
    """Recomputed with a read bandwidth so low that every measured step beats its floor: each row is flagged (unless
    its bytes fit in the last-level cache), the table marks it, and the caption names the read bandwidth; a file
    written before the read probe renders its floor as a copy bandwidth."""
    from lmopt.report.benchmark import render_table

    bench = load_script("profile/benchmark.py")
    r = json.loads(json.dumps(bench_result[0]))
    st, shape = r["settings"], r["model_shape"]
    ok = [x for x in r["rows"] if x["status"] == "ok"]
    args = (st["batch_sizes"], shape, 1e-3, st["short_prompt_tokens"], st["long_prompt_tokens"], st["max_new_tokens"])
    assert bench.summarize_row(ok[0], None, *args, llc=1 << 40)["1"]["below_floor"] is False  # cache-resident
    for x in ok:
        x["summary"] = bench.summarize_row(x, None, *args, llc=0)
    errors = bench.measurement_errors(r["rows"])
    assert len(errors) == len(ok) * len(st["batch_sizes"]) * 3  # each batch: all steps, short and long prompt
    r["measurement_errors"] = errors
    table = render_table(r, markdown=True)
    assert table.count("⚠ below floor") == len(ok) * len(st["batch_sizes"])
    assert "measurement error (faster than the bandwidth floor): torch fp32 batch 1" in table
    from lmopt.report import floor_note

    assert f"floor at {floor_note(r)}" in table and "GB/s read bandwidth" in floor_note(r)
    for k in ("read_bandwidth_gbs", "read_bandwidth_probe", "measurement_errors"):
        del r[k]
    assert "GB/s copy bandwidth (read + write" in render_table(r, markdown=True)


def test_rows_that_cannot_run_say_why(bench_result):
    r, stdout = bench_result
    skipped = {(x["engine"], x["precision"]): x["reason"] for x in r["rows"] if x["status"] != "ok"}
    if ("ort", "fp16") in skipped:
        assert "make export-fp16" in skipped[("ort", "fp16")] or "--engine trt" in skipped[("ort", "fp16")]
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
    shutil.copyfile(REPO / "results" / "README.md", readme)  # the generated tables
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
    proc = run_cli("profile/benchmark.py", "--engines", "cudagraph", "--precisions", "fp16", "--artifacts",
                   str(tmp_path), check=False)
    assert_one_line_error(proc, "nothing to benchmark", "needs an NVIDIA GPU", "--device cuda")
    proc = run_cli("profile/benchmark.py", "--batch-sizes", "1,2", "--long-batch-sizes", "4", "--artifacts",
                   str(tmp_path), check=False)
    assert_one_line_error(proc, "--long-batch-sizes 4 must be a subset")
    import torch

    if not torch.cuda.is_available():
        proc = run_cli("profile/benchmark.py", "--preset", "gpu", "--artifacts", str(tmp_path), check=False)
        assert_one_line_error(proc, "no CUDA device")


def test_gpu_preset_settings():
    """The preset fills what the command line leaves out; flags win; unregistered engines are dropped."""
    import importlib.util

    from lmopt.engines import ENGINES

    spec = importlib.util.spec_from_file_location("bench_preset", REPO / "profile" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is created
    spec.loader.exec_module(bench)
    _, s = bench.settings_from_args(["--preset", "gpu", "--batch-sizes", "1,8"])
    assert s.device == "cuda" and s.batch_sizes == "1,8" and s.short_prompt == 128 and s.long_prompt == 2048
    assert s.long_batch_sizes == "1" and s.precisions == "fp16"
    engines = s.engines.split(",")
    assert engines[:2] == ["torch", "cudagraph"] and "ort" in engines and set(engines) <= set(ENGINES)
    assert ("compiled" in engines) == ("compiled" in ENGINES)
    _, d = bench.settings_from_args([])
    assert d == bench.BenchmarkSettings()


def test_gpu_section_renders_a_cuda_benchmark(bench_result, tmp_path):
    """A benchmark result of device cuda goes to the README's GPU section (rendered by its kind), per prompt length,
    against its floor, and stays out of the CPU before-vs-after section. (The CPU run's numbers stand in for a GPU's:
    this checks the rendering, not a GPU.)"""
    r = json.loads(json.dumps(bench_result[0]))
    r["settings"]["device"] = "cuda"
    r["gpu"] = {"name": "Test GPU", "driver": "1.0", "torch_cuda": "13.0"}
    folder = tmp_path / "results" / "nvidia-test" / "tiny"
    folder.mkdir(parents=True)
    (folder / "benchmark-cuda.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    shutil.copyfile(REPO / "results" / "README.md", readme)  # the generated tables
    run_cli("report/update_readme.py", "--readme", str(readme), "--results", str(tmp_path / "results"))
    text = readme.read_text()
    gpu = text.split("<!-- BEGIN gpu")[1].split("<!-- END gpu -->")[0]
    before = text.split("<!-- BEGIN before-vs-after")[1].split("<!-- END before-vs-after -->")[0]
    assert "Test GPU" in gpu and "Test GPU" not in before
    ort = next(x for x in r["rows"] if x["engine"] == "ort" and x["status"] == "ok")
    e = ort["summary"]["2"]["by_prompt"]["short"]
    line = next(l for l in gpu.splitlines() if l.startswith("| ONNX Runtime CUDA EP (IO binding) | fp32 | 2 | 8 |"))
    assert f"| {e['step_ms']['p50']:.3f} |" in line and f"| {e['bandwidth_floor_ms']:.3f} |" in line
    assert "fastest decode is" in gpu
    for x in r["rows"]:
        if x["status"] != "ok":
            assert x["reason"] in gpu


def test_side_by_side_with_llamacpp(bench_result):
    """A result with llama.cpp rows gets the per-bit-width comparison (here ORT's FP32 row stands in for llama.cpp's,
    so the ratio is 1 by construction: this checks the rendering)."""
    from lmopt.report.benchmark import render_vs_llamacpp

    r = json.loads(json.dumps(bench_result[0]))
    assert render_vs_llamacpp(r) == ""
    ort = next(x for x in r["rows"] if x["engine"] == "ort" and x["precision"] == "fp32")
    r["rows"].append({**json.loads(json.dumps(ort)), "engine": "llamacpp", "variant": "f32"})
    table = render_vs_llamacpp(r)
    line = next(l for l in table.splitlines() if l.startswith("| FP32 / F32 |"))
    assert "| ort fp32 |" in line and "| 1.00 |" in line
    assert "INT8 / Q8_0" not in table  # no llama.cpp row of that width
