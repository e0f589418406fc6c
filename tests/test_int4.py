"""CPU graph work: the fused GroupQueryAttention graph in FP32 on ONNX Runtime's CPU EP, and stage 2's weight-only
INT4 variants (MatMulNBits) of optimum's graph and of the fused graph, scored like every stage-2 graph."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_one_line_error, read_json, run_cli


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tmp_path_factory.mktemp("int4")


@pytest.mark.parametrize("model", ["llama-test", "gpt2-test"])
def test_fused_graph_fp32_cpu_and_int4(model, art):
    run_cli("convert/export_onnx.py", "--model", model, "--artifacts", str(art), "--dtype", "fp32",
            "--attention", "gqa", "--max-len", "128")
    exp = read_json(art / model / "export" / "fp32-gqa" / "manifest.json")
    assert exp["graph"]["op_counts"]["GroupQueryAttention"] == 2 and exp["validation"]["passed"]
    run_cli("convert/quantize_model.py", "--model", model, "--artifacts", str(art), "--target", "onnxruntime-int4",
            "--attention", "gqa", "--eval-samples", "2", "--eval-seq-len", "48", "--greedy-prompts", "1",
            "--greedy-tokens", "8")
    man = read_json(art / model / "quantize" / "int4-cpu-nbits-gqa" / "manifest.json")
    assert man["precision"] == "int4" and man["engine"] == "ort-gqa" and man["graph"]["max_len"] == 128
    assert man["accuracy"]["ppl_increase_pct"] <= 1.0 and man["validation"]["passed"]
    cov = man["int8_fallback"]["onnxruntime"]
    assert cov["op_types"].get("MatMulNBits", 0) == cov["matmuls_int8"] > 0

    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate

    for precision in ("fp32", "int4"):
        eng = create_engine("ort-gqa", model, precision=precision, artifacts=art, threads=2)
        assert eng.info.precision == precision
        out = generate(eng, [[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=4))
        assert [len(t) for t in out.tokens] == [4, 4]
        eng.close()


def test_int4_of_optimum_graph_and_find_onnx(tiny_export, artifacts):
    """The built-in model: 4-bit weights within the 1% budget (the sweep keeps a layer FP32), ORT finds the graph
    by precision, and the ort engine's logits stay near FP32."""
    run_cli("convert/quantize_model.py", "--model", "tiny", "--artifacts", str(artifacts), "--target",
            "onnxruntime-int4", "--greedy-prompts", "1", "--greedy-tokens", "8")  # the default evaluation text
    man = read_json(artifacts / "tiny" / "quantize" / "int4-cpu-nbits" / "manifest.json")
    assert man["precision"] == "int4" and man["engine"] == "ort" and man["validation"]["passed"]
    assert man["accuracy"]["ppl_increase_pct"] <= 1.0
    from lmopt.engines import create_engine

    eng = create_engine("ort", "tiny", precision="int4", artifacts=artifacts)
    assert eng.info.variant == "int4-cpu-nbits"
    ref = create_engine("ort", "tiny", precision="fp32", artifacts=artifacts)
    ids = np.array([[5, 6, 7, 8, 9]], np.int64)
    a = eng.prefill(ids, np.ones_like(ids), np.arange(5)[None])[0]
    b = ref.prefill(ids, np.ones_like(ids), np.arange(5)[None])[0]
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_gqa_source_errors(artifacts):
    proc = run_cli("convert/quantize_model.py", "--model", "tiny", "--artifacts", str(artifacts), "--attention", "gqa",
                   check=False)
    assert_one_line_error(proc, "--target onnxruntime-int4")
    proc = run_cli("convert/quantize_model.py", "--model", "llama-test", "--artifacts", str(artifacts / "none"),
                   "--target", "onnxruntime-int4", "--attention", "gqa", check=False)
    assert_one_line_error(proc, "--attention gqa")


def test_decode_ops_profile(tiny_export, artifacts, tmp_path):
    out = tmp_path / "ops.json"
    run_cli("profile/decode_ops.py", "--model", "tiny", "--artifacts", str(artifacts), "--rows", "ort:fp32",
            "--prompt", "16", "--max-new-tokens", "5", "--out", str(out))
    r = read_json(out)
    assert r["kind"] == "decode-ops"
    row = r["rows"][0]
    assert row["decode_steps"] == 4 and row["ops"]["MatMul"]["nodes_per_step"] > 0
    assert abs(sum(v["share"] for v in row["ops"].values()) - 1) < 1e-2
    pf = row["prefill"]  # the warm prefills, apart from the decode steps
    assert pf["prompt_tokens"] == 16 and pf["runs"] == 3 and pf["ops"]["MatMul"]["nodes"] == row["ops"]["MatMul"][
        "nodes_per_step"] and abs(sum(v["share"] for v in pf["ops"].values()) - 1) < 1e-2
    from lmopt.report.benchmark import render_decode_ops

    line = render_decode_ops(r).splitlines()[-1]
    assert line.startswith("| ort | fp32 (fp32) |") and "MatMul" in line
    proc = run_cli("profile/decode_ops.py", "--model", "tiny", "--artifacts", str(artifacts), "--rows", "ort",
                   check=False)
    assert_one_line_error(proc, "engine:precision")
