"""Stage 2 FP16 (convert/convert_fp16.py): AutoCast graph for strongly typed TensorRT, validated against FP32."""
from __future__ import annotations

import pytest

from conftest import assert_one_line_error, read_json, run_cli

SCRIPT = "convert/convert_fp16.py"


def test_fp16_graph_keeps_accuracy_and_fp32_islands(tiny_export):
    import onnx
    from onnx import TensorProto

    from lmopt.artifacts import find_onnx, onnx_file

    artifacts = tiny_export.parent.parent.parent
    proc = run_cli(SCRIPT, "--model", "tiny", "--artifacts", str(artifacts))
    assert "fp16" in proc.stdout and "Δppl %" in proc.stdout
    folder, man = find_onnx(artifacts, "tiny", "fp16", "tensorrt")
    assert folder.name == "fp16" and man["stage"] == "quantize" and man["precision"] == "fp16"
    assert man["targets"] == ["tensorrt"] and man["default"] is True
    assert man["validation"]["passed"] is True
    acc = man["accuracy"]
    assert acc["ppl_increase_pct"] <= 0.1 and acc["greedy_tokens"] == 32 and 0 <= acc["greedy_agreement"] <= 1
    assert man["model_shape"] == read_json(tiny_export / "manifest.json")["model_shape"]

    g = onnx.load(str(onnx_file(folder, man))).graph
    assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
               for v in list(g.input) + list(g.output))
    assert any(i.data_type == TensorProto.FLOAT16 for i in g.initializer)      # weights really halved
    # the RMSNorm reductions and Softmax stayed FP32
    kept = man["precision_counts"]["fp32_by_op"]
    assert kept.get("ReduceMean", 0) > 0 and kept.get("Softmax", 0) > 0
    with pytest.raises(Exception, match="fp16 ONNX .* not onnxruntime"):
        find_onnx(artifacts, "tiny", "fp16", "onnxruntime")   # FP16 on CPU is no faster: not offered to ORT


def test_fp16_bad_budget(tmp_path):
    proc = run_cli(SCRIPT, "--artifacts", str(tmp_path), "--max-ppl-increase", "-0.5", check=False)
    assert_one_line_error(proc, ">= 0")


def test_fp16_missing_export(tmp_path):
    proc = run_cli(SCRIPT, "--artifacts", str(tmp_path), check=False)
    assert_one_line_error(proc, "run: make export")
    assert not (tmp_path / "tiny" / "quantize").exists()
