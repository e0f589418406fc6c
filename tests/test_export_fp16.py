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
            "--max-new-tokens", "8", "--repeats", "1", "--bandwidth-mb", "16")
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


@pytest.mark.parametrize("model,dtype", [("tiny", "fp32"), ("gpt2-test", "fp16")])
def test_gqa_graph_fixed_kv_buffer(model, dtype, tmp_path):
    """--attention gqa: GroupQueryAttention per layer over a fixed KV buffer; the ort-gqa engine decodes the eager
    model's tokens, and rows of different lengths in one step give the tokens each prompt gives alone."""
    from lmopt.data import builtin_text
    from lmopt.engines import create_engine
    from lmopt.engines.torch_engine import TorchEngine
    from lmopt.generate import SamplingParams, generate
    from lmopt.models import load_tokenizer

    run_cli("convert/export_onnx.py", "--model", model, "--artifacts", str(tmp_path), "--dtype", dtype,
            "--attention", "gqa", "--max-len", "96")
    folder = tmp_path / model / "export" / f"{dtype}-gqa"
    man = read_json(folder / "manifest.json")
    assert man["engine"] == "ort-gqa" and man["graph"]["max_len"] == 96
    assert all(c["passed"] for c in man["validation"]["checks"]), man["validation"]
    g = onnx.load(str(folder / "model.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GroupQueryAttention") == man["model_shape"]["num_layers"]
    past = next(i for i in g.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[2].dim_param == "max_len"   # the buffer, not a growing cache

    engine = create_engine("ort-gqa", model, precision=dtype, artifacts=tmp_path)
    ids = load_tokenizer(model)(builtin_text("eval"))["input_ids"]
    prompts = [ids[:20], ids[50:57], ids[200:213]]
    p = SamplingParams(max_new_tokens=16)
    batch = generate(engine, prompts, p).tokens
    assert batch == generate(TorchEngine(model), prompts, p).tokens
    assert [generate(engine, [x], p).tokens[0] for x in prompts] == batch
    with pytest.raises(Exception, match="context of 96"):   # the buffer bounds the context generate() allows
        generate(engine, [ids[:93]], SamplingParams(max_new_tokens=5))


def test_gqa_bad_arguments_and_missing_graph(tmp_path):
    from lmopt.engines import create_engine
    from lmopt.errors import UserError

    proc = run_cli("convert/export_onnx.py", "--artifacts", str(tmp_path), "--max-len", "64", check=False)
    assert_one_line_error(proc, "--max-len", "--attention gqa")
    proc = run_cli("convert/export_onnx.py", "--artifacts", str(tmp_path), "--attention", "flash", check=False)
    assert_one_line_error(proc, "unknown --attention 'flash'")
    with pytest.raises(UserError, match="--dtype fp16 --attention gqa"):
        create_engine("ort-gqa", "tiny", precision="fp16", artifacts=tmp_path)
