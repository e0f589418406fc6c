"""Serving benchmarks (profile/serve_bench.py, perf_analyzer_sweep.py, load_generator.py) and their README section
(lmopt/report/serving.py): one brief real run against two real Triton servers (dynamic batching on / off), result
files checked for schema and consistency; one-line errors for bad input."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, load_script, read_json, run_cli
from lmopt.results import SCHEMA_VERSION



@pytest.fixture(scope="module")
def serve_repo(tiny_export, artifacts):
    """The built-in model's fp32 model repository (made by the serve stage's own script)."""
    folder = artifacts / "tiny" / "serve" / "ort-fp32-cpu"
    if not (folder / "manifest.json").is_file():
        run_cli("serve/make_model_repository.py", "--model", "tiny", "--artifacts", str(artifacts), "--precision",
                "fp32")
    return folder


@pytest.fixture(scope="module")
def bench(serve_repo, artifacts):
    """A brief serve_bench run: seconds per level, both tools, both server configs, the overhead comparison.

    perf_analyzer's stability check is relaxed: this checks the plumbing and the files, not the machine's quiet."""
    proc = run_cli("profile/serve_bench.py", "--model", "tiny", "--artifacts", str(artifacts), "--serve-variant",
                   serve_repo.name, "--concurrency", "1,2", "--max-new-tokens", "8", "--prompt-tokens", "16",
                   "--measurement-requests", "6", "--stability-percentage", "1000", "--requests", "6", "--duration-s", "20",
                   "--overhead-requests", "3", timeout=600)
    return artifacts / "tiny" / "profile", proc


def _envelope(doc: dict, kind: str):
    assert doc["kind"] == kind and doc["schema"] == SCHEMA_VERSION
    for key in ("machine", "versions", "command", "settings", "summary", "samples", "created"):
        assert key in doc, key
    assert doc["versions"]["tritonclient"] == "2.51.0"


def test_perf_analyzer_results(bench):
    prof, _ = bench
    for cfg in ("on", "off"):
        doc = read_json(prof / f"serving-pa-batching-{cfg}.json")
        _envelope(doc, "perf_analyzer")
        assert [r["level"] for r in doc["summary"]] == [1, 2]
        for r in doc["summary"]:
            st = r["server_stats"]
            # perf_analyzer really sent these requests to this server, and Triton counted them
            assert st["inference_count"] >= doc["settings"]["measurement_requests"]
            if r.get("unstable"):
                continue
            assert r["throughput_rps"] > 0
            assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"] <= r["latency_ms_p99"]
            if cfg == "off":  # without the dynamic batcher every execution is one request
                assert st["requests_per_execution"] == 1.0
            else:
                assert st["requests_per_execution"] >= 1.0
        assert (prof / "serving-pa-batching-on" / "input_data.json").is_file()
        data = json.loads((prof / "serving-pa-batching-on" / "input_data.json").read_text())["data"]
        assert len(data) == doc["settings"]["num_prompts"] and all(d["text_input"]["content"][0] for d in data)


def test_streaming_results_consistent(bench):
    prof, _ = bench
    for cfg in ("on", "off"):
        doc = read_json(prof / f"serving-stream-batching-{cfg}.json")
        _envelope(doc, "streaming_load")
        s = doc["settings"]
        assert doc["preflight"]["tokens"] and doc["preflight"]["error"] is None
        for row in doc["summary"]:
            recs = [r for r in doc["samples"][str(row["concurrency"])] if not r["warmup"]]
            assert row["failed"] == 0 and row["completed"] == len(recs) <= s["requests"]
            # tokens counted = tokens received, none lost or invented; a response carries one token or, when tokens
            # came faster than one send, several
            assert row["output_tokens"] == sum(len(r["tokens"]) for r in recs)
            assert row["completed"] <= row["token_responses"] <= row["output_tokens"]
            for r in recs:
                assert 0 < len(r["tokens"]) <= s["max_new_tokens"]
                assert len(r["token_times_s"]) == len(r["tokens"])
                assert 0 < r["token_times_s"][0] <= r["token_times_s"][-1] <= r["end_s"]
            assert row["ttft_ms"]["p50"] > 0 and row["itl_ms"]["mean"] > 0 and row["e2e_ms"]["p50"] >= row["ttft_ms"]["p50"]
            assert row["output_tok_per_s"] > 0 and row["requests_per_s"] > 0
            assert row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"]


def test_batching_comparison_and_overhead(bench):
    prof, proc = bench
    doc = read_json(prof / "serving-batching.json")
    _envelope(doc, "serving_batching_comparison")
    rows = doc["summary"]["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        if "pa_throughput_ratio" in r:
            assert r["pa_throughput_ratio"] == pytest.approx(r["pa_rps_on"] / r["pa_rps_off"])
        assert r["stream_throughput_ratio"] > 0
    for cfg in ("batching-on", "batching-off"):
        o = doc["summary"]["overhead_c1"][cfg]
        assert o["requests"] == 3 and o["same_tokens"] == "3/3"  # greedy: served tokens = in-process tokens
        assert o["served"]["ttft_ms"]["p50"] > 0 and o["in_process"]["ttft_ms"]["p50"] > 0
        q = o["in_process_scheduler"]   # the same engine behind the scheduler in-process: the same greedy tokens
        assert q["ttft_ms"]["p50"] > 0 and q["same_tokens"] == f"{o['requests']}/{o['requests']}"
        assert o["overhead_ms"]["ttft_p50"] == pytest.approx(o["served"]["ttft_ms"]["p50"]
                                                             - o["in_process"]["ttft_ms"]["p50"])
    off_cfg = (prof / "serving-repos" / "ort-fp32-cpu-batching-off" / "model_repository" / "lm" / "config.pbtxt")
    assert "dynamic_batching {" not in off_cfg.read_text() and "max_batch_size" in off_cfg.read_text()
    assert "dynamic-batching +40% claim" in proc.stdout
    # both servers stopped: their pid files are gone
    assert not list(prof.glob(".triton-*.pid"))


def test_report_renders_published_results(bench, tmp_path):
    prof, _ = bench
    art = prof.parent.parent
    run_cli("report/publish_results.py", "--kind", "serving", "--model", "tiny", "--artifacts", str(art),
            "--results", str(tmp_path / "results"))
    published = list((tmp_path / "results").glob("*/tiny/serving-batching.json"))
    assert len(published) == 1
    from lmopt.report import serving as serving_report

    text = serving_report.render(tmp_path / "results")
    assert "| concurrency |" in text and "Serving overhead" in text and "perf_analyzer" in text
    assert "<!--" not in text  # report/update_readme.py owns the markers
    doc = read_json(published[0])
    first = doc["summary"]["rows"][0]
    if "pa_rps_on" in first:
        assert f"{first['pa_rps_on']:.1f}" in text  # the table's numbers are the file's numbers
    assert "No serving results" in serving_report.render(tmp_path / "empty")


def test_comparison_repositories_from_an_in_flight_repository(serve_repo, tmp_path):
    """--compare scheduler serves a static-batching copy (batching=static, a dynamic_batching block in both models);
    the batching-off copy of an in-flight repository drops lm's block (lm_stream has none to drop)."""
    sb = load_script("profile/serve_bench.py")
    src = serve_repo / "model_repository"
    assert "dynamic_batching {" not in (src / "lm_stream" / "config.pbtxt").read_text()
    static = sb.static_repository(src, tmp_path / "static", 1500)
    off = sb.batching_off_repository(src, tmp_path / "off")
    for m in ("lm", "lm_stream"):
        text = (static / m / "config.pbtxt").read_text()
        assert 'key: "batching" value: { string_value: "static" }' in text and "inflight" not in text
        assert text.count("dynamic_batching {") == 1 and "max_batch_size" in text
        assert "dynamic_batching {" not in (off / m / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 1500" in (static / "lm_stream" / "config.pbtxt").read_text()
    with pytest.raises(Exception, match="not an in-flight batching repository"):
        sb.static_repository(static, tmp_path / "again", 1500)


def test_bad_input_one_line_errors(tmp_path):
    proc = run_cli("profile/serve_bench.py", "--artifacts", str(tmp_path), check=False)
    assert_one_line_error(proc, "make serve-repo")
    proc = run_cli("profile/load_generator.py", "--concurrency", "0", "--artifacts", str(tmp_path), check=False)
    assert_one_line_error(proc, "--concurrency")
    # (each CLI start costs seconds: lmopt.log imports transformers, so the error cases are kept few)
    for script in ("profile/serve_bench.py", "profile/load_generator.py", "profile/perf_analyzer_sweep.py",
                   "report/publish_results.py"):
        assert "--artifacts" in run_cli(script, "--help").stdout


def test_inflight_vs_static_section_comes_from_the_file(tmp_path):
    """The README's in-flight vs static table: found by kind (any file name), every number from the file."""
    from lmopt.report import serving as serving_report

    folder = tmp_path / "results" / "cpu-x-2c" / "tiny"
    folder.mkdir(parents=True)
    row = {"concurrency": 4, "stream_tok_s_on": 1249.3, "stream_tok_s_off": 795.1, "stream_throughput_ratio": 1.571,
           "stream_ttft_p50_ms_on": 12.4, "stream_ttft_p50_ms_off": 28.4, "stream_ttft_p95_ms_on": 30.2,
           "stream_ttft_p95_ms_off": 61.7, "pa_rps_on": 88.8, "pa_rps_off": 55.5}
    base = {"schema": SCHEMA_VERSION, "created": "2026-12-01T00:00:00+00:00", "command": ["serve_bench.py"],
            "machine": {"cpu_model": "Test CPU", "cpu_count": 2}, "versions": {}}
    doc = {**base, "kind": "serving_scheduler_comparison", "serve_variant": "ort-fp32-cpu",
           "settings": {"model": "tiny", "prompt_tokens": 32, "max_new_tokens": 16},
           "summary": {"rows": [row], "overhead_c1": {}}}
    (folder / "anything.json").write_text(json.dumps(doc))
    # the section needs the batching comparison's folder too (the serving section's frame)
    cmp_doc = {**base, "kind": "serving_batching_comparison", "settings": {"model": "tiny"},
               "summary": {"rows": [], "overhead_c1": {}}}
    (folder / "other.json").write_text(json.dumps(cmp_doc))
    text = serving_report.render(tmp_path / "results")
    assert "In-flight vs static batching — tiny on Test CPU, 2 cores" in text
    assert "| 4 | 1249.3 | 795.1 | 1.57x | 12.4 | 28.4 | 30.2 | 61.7 | 88.8 | 55.5 |" in text
