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


# ---- the serving benchmark (profile/serve_bench.py --compare load) ---------------------------------------------------
def test_workloads_are_seeded_and_what_they_say():
    """random: lengths within mean +- spread, the same for the same seed; corpus: chat-formatted prompts; fixed: the
    older held-out windows."""
    from lmopt.chat import render_chat
    from lmopt.models import load_tokenizer
    from lmopt.serving import build_workload

    a = build_workload("tiny", "random", 40, 64, 16, 0.25, seed=3)
    assert a == build_workload("tiny", "random", 40, 64, 16, 0.25, seed=3)
    assert a != build_workload("tiny", "random", 40, 64, 16, 0.25, seed=4)
    assert all(48 <= len(x.prompt_ids) <= 80 and 12 <= x.max_tokens <= 20 for x in a)
    assert len({x.max_tokens for x in a}) > 1 and len({len(x.prompt_ids) for x in a}) > 1
    tok = load_tokenizer("tiny")
    c = build_workload("tiny", "corpus", 4, 64, 16, 0.25, seed=3)
    for x in c:
        assert x.prompt.endswith("Assistant:") and x.prompt.startswith("User: ")
        assert abs(len(x.prompt_ids) - 64) <= 20
        assert render_chat(tok, [{"role": "user", "content": x.prompt[len("User: "):-len("\nAssistant:")]}]) == x.prompt
    f = build_workload("tiny", "fixed", 3, 16, 8)
    assert [len(x.prompt_ids) for x in f] == [16] * 3 and {x.max_tokens for x in f} == {8}
    with pytest.raises(Exception, match="unknown workload"):
        build_workload("tiny", "nope", 3, 16, 8)


def test_step_trace_summary():
    """The timeline's arithmetic on a hand-made trace: union of device spans, shares, periods, the window."""
    from lmopt.profiling.step_trace import summarize

    calls = [{"kind": "prefill", "t_in": 0.000, "t_out": 0.001, "rows": 1, "gpu_start": 0.0005, "gpu_end": 0.0020},
             {"kind": "decode", "t_in": 0.002, "t_out": 0.0025, "rows": 2, "gpu_start": 0.0025, "gpu_end": 0.0045},
             {"kind": "decode", "t_in": 0.006, "t_out": 0.0065, "rows": 2, "gpu_start": 0.0065, "gpu_end": 0.0085},
             {"kind": "decode", "t_in": 0.5, "t_out": 0.6, "rows": 2, "gpu_start": 0.5, "gpu_end": 0.6}]  # outside
    doc = {"device_times": True, "calls": calls, "sends": [{"t_in": 0.003, "t_out": 0.004, "responses": 2}]}
    s = summarize(doc, 0.0, 0.01)
    assert s["decode_steps"] == 2 and s["prefill_calls"] == 1
    assert s["gpu_busy_share"] == pytest.approx((0.0015 + 0.002 + 0.002) / 0.01)
    assert s["decode_step_period_ms"]["p50"] == pytest.approx(4.0)
    assert s["send_share"] == pytest.approx(0.1) and s["responses_sent"] == 2
    assert s["gpu_idle_before_decode_ms"]["max"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def load_bench(serve_repo, artifacts):
    """A small run of the serving benchmark: two closed-loop levels and one open-loop rate of the random workload,
    the ceiling, the in-process scheduler, the endpoint vs gRPC, lm_empty, the overhead and the timeline."""
    proc = run_cli("profile/serve_bench.py", "--model", "tiny", "--artifacts", str(artifacts), "--serve-variant",
                   serve_repo.name, "--compare", "load", "--concurrency", "1,2", "--open-loop-rates", "40",
                   "--prompt-tokens", "16", "--max-new-tokens", "8", "--requests", "6", "--rate-requests", "6",
                   "--duration-s", "20", "--num-prompts", "8", "--floor-levels", "2", "--timeline-level", "2",
                   "--in-process-levels", "2", "--endpoint-levels", "2", "--overhead-requests", "2",
                   "--prompt-input", "input_ids", timeout=600)
    return artifacts / "tiny" / "profile", proc


def test_load_benchmark_result(load_bench):
    from lmopt.serving import build_workload

    prof, proc = load_bench
    doc = read_json(prof / "serving-load.json")
    assert doc["kind"] == "serving_load_benchmark" and doc["schema"] == SCHEMA_VERSION
    sm = doc["summary"]
    assert [(r["mode"], r["level"]) for r in sm["sweep"]] == [("concurrency", 1), ("concurrency", 2), ("rate", 40.0)]
    items = build_workload("tiny", "random", 8, 16, 8, 0.25, 0)
    stream = read_json(prof / "serving-stream-load.json")
    for r in sm["sweep"]:
        assert r["failed"] == 0 and r["completed"] == 6
        assert 0 <= r["goodput_rps"] <= r["requests_per_s"] and isinstance(r["meets_objective"], bool)
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"] <= r["ttft_ms"]["p99"]
        key = str(r["level"]) if r["mode"] == "concurrency" else f"rate-{r['level']}"
        recs = [x for x in stream["samples"][key] if not x["warmup"]]
        # EOS ignored: every request streamed exactly the output length the workload gave it
        assert all(len(x["tokens"]) == items[x["prompt_index"] % 8].max_tokens for x in recs)
        assert r["output_tokens"] == sum(len(x["tokens"]) for x in recs)
    for r in sm["sweep"][:2]:
        c = sm["ceiling"]["levels"][str(r["level"])]
        assert c["output_tok_per_s"] > 0 and r["served_over_ceiling"] == pytest.approx(
            r["output_tok_per_s"] / c["output_tok_per_s"])
    (q,) = sm["in_process_scheduler"]
    assert q["level"] == 2 and q["failed"] == 0 and q["served_over_in_process"] > 0
    e = sm["endpoint"]["2"]
    assert e["ratio"] > 0 and e["failed"] == {"grpc": 0, "openai": 0}
    (f,) = sm["floor"]
    assert f["level"] == 2 and f["failed"] == 0 and f["token_responses"] == f["output_tokens"] > 0
    assert sm["overhead_c1"]["same_tokens"] == "2/2"
    tl = sm["timeline"]
    assert tl["decode_steps"] > 0 and tl["send_passes"] > 0 and tl["host_in_decode_call_ms"]["count"] > 0
    assert read_json(prof / "serving-timeline.json")["kind"] == "serving_timeline"
    assert doc["complete"] is True
    assert {t["target"] for t in sm["targets"]} >= {"1 stream: TTFT overhead ms <= bar"}
    assert "serving benchmark: workload random" in proc.stdout
    assert not list(prof.glob(".triton-*.pid"))


def test_load_benchmark_renders(load_bench):
    from lmopt.report import serving as serving_report

    prof, _ = load_bench
    text = serving_report.render(prof)
    doc = read_json(prof / "serving-load.json")
    r = doc["summary"]["sweep"][1]
    assert "Serving benchmark — tiny" in text and "Per-step timeline" in text and "`lm_empty`" in text
    assert f"| 2 streams | {r['completed']} | {r['output_tok_per_s']:,.0f} |" in text
