"""Stage 1 with --dtype fp16: the FP16 graph for ONNX Runtime (CUDA EP on a GPU), made by ONNX Runtime's optimizer and
FP16 converter from the FP32 export, validated against PyTorch on the CPU EP here."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from conftest import assert_one_line_error, no_partial, read_json, run_cli


@pytest.mark.parametrize("model", ["gpt2-test", "tiny"])
def test_fp16_export_for_onnxruntime(model, tmp_path):
    from lmopt.engines import find_onnx, onnx_file

    proc = run_cli("convert/export_onnx.py", "--model", model, "--artifacts", str(tmp_path), "--dtype", "fp16")
    assert "[FAIL]" not in proc.stdout + proc.stderr
    folder, man = find_onnx(tmp_path, model, "fp16", "onnxruntime")
    assert folder == tmp_path / model / "export" / "fp16" and man["precision"] == "fp16"
    assert man["targets"] == ["onnxruntime"] and man["settings"]["device"] == "cpu"
    assert all(c["passed"] for c in man["validation"]["checks"]), man["validation"]
    assert man["fused_operators"]  # the optimizer fused the norms (GPT-2: LayerNorm/SkipLayerNorm, FastGelu)
    assert sorted(p.name for p in folder.iterdir() if "onnx" in p.name) == ["model.onnx"]  # FP32 graph removed
    g = onnx.load(str(onnx_file(folder, man))).graph
    kv = [v for v in list(g.input) + list(g.output) if "key" in v.name or "value" in v.name or v.name == "logits"]
    assert kv and all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in kv)
    # GPT-2 from optimum's FP16 export had a LayerNormalization bound to float and float16; this one loads
    types = {i.data_type for i in g.initializer if len(i.dims) > 1}
    assert types == {TensorProto.FLOAT16}
    assert no_partial(tmp_path / model)

    # the benchmark finds it (ort fp16) and it decodes the baseline's tokens; its KV cache counts as 2-byte elements
    run_cli("profile/benchmark.py", "--model", model, "--artifacts", str(tmp_path), "--engines", "torch,ort",
            "--precisions", "fp32,fp16", "--batch-sizes", "1", "--short-prompt", "8", "--long-prompt", "16",
            "--new-tokens", "8", "--repeats", "1", "--bandwidth-mb", "16")
    rows = {(r["engine"], r["precision"]): r for r in read_json(tmp_path / model / "profile" / "benchmark-cpu.json")["rows"]}
    ort16 = rows[("ort", "fp16")]
    assert ort16["status"] == "ok" and ort16["variant"] == "fp16", ort16.get("reason")
    assert ort16["summary"]["1"]["agreement_vs_baseline"] == 1.0


def test_fp16_export_bad_arguments(tmp_path):
    for args, needles in [(["--dtype", "bf16"], ("--dtype", "fp32 or fp16")),
                          (["--device", "tpu", "--dtype", "fp16"], ("--device", "cpu or cuda")),
                          (["--device", "cuda"], ("same on every device",))]:
        proc = run_cli("convert/export_onnx.py", "--artifacts", str(tmp_path), *args, check=False)
        assert_one_line_error(proc, *needles)
    assert not (tmp_path / "tiny").exists()


def test_fp16_export_on_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the no-GPU message cannot be checked here")
    proc = run_cli("convert/export_onnx.py", "--artifacts", str(tmp_path), "--dtype", "fp16", "--device", "cuda",
                   check=False)
    assert_one_line_error(proc, "no CUDA device")
    assert not (tmp_path / "tiny").exists()
