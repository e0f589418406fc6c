"""Optimization-profile shapes of stage 3 (no TensorRT needed): the built-in model and a GPT-2 shape, every KV input
consistent with the others, min <= opt <= max, and the layer-precision summary of the engine inspector's JSON."""
from __future__ import annotations

from dataclasses import replace

import pytest

from lmopt import trt_build as bte
from lmopt.errors import UserError
from lmopt.models import load_config, model_shape


def _check_consistent(shape: dict, profiles: list[dict], max_batch: int, max_seq: int) -> None:
    assert [p["name"] for p in profiles] == ["prefill", "decode"]
    kv = [n for n in profiles[0]["shapes"] if n.startswith("past_key_values.")]
    assert len(kv) == 2 * shape["num_layers"]
    for p in profiles:
        sh = p["shapes"]
        for which in ("min", "opt", "max"):
            b, s = sh["input_ids"][which]
            past = sh[kv[0]][which][2]
            for name in kv:  # every KV input identical, [B, kv_heads, P, head_dim]
                assert sh[name][which] == [b, shape["num_kv_heads"], past, shape["head_dim"]], (p["name"], name)
            assert sh["attention_mask"][which] == [b, past + s]
            assert sh["position_ids"][which] == [b, s]
        for name, v in sh.items():  # min <= opt <= max, dim by dim
            assert all(lo <= mid <= hi for lo, mid, hi in zip(v["min"], v["opt"], v["max"])), (p["name"], name, v)
        assert sh["attention_mask"]["max"] == [max_batch, max_seq]
    prefill, decode = profiles[0]["shapes"], profiles[1]["shapes"]
    assert [prefill[kv[0]][k][2] for k in ("min", "opt", "max")] == [0, 0, 0]  # prefill: empty past
    assert decode["input_ids"]["min"][1] == decode["input_ids"]["max"][1] == 1
    assert decode[kv[0]]["min"][2] == 1 and decode[kv[0]]["max"][2] == max_seq - 1


def test_profiles_builtin_model():
    shape = model_shape(load_config("tiny"))
    s = bte.EngineSettings(max_batch=4)
    profiles = bte.derive_profiles(shape, bte.default_input_names(shape), s)
    _check_consistent(shape, profiles, 4, shape["max_positions"])  # 512 tokens: the whole context
    assert profiles[1]["shapes"]["past_key_values.3.value"]["opt"] == [1, 2, 256, 32]


def test_profiles_gpt2_shape():
    shape = model_shape(load_config("gpt2-124m"))
    assert (shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]) == (12, 12, 64)
    s = bte.EngineSettings(model="gpt2-124m", max_batch=16, max_seq_len=1024, opt_batch=8)
    profiles = bte.derive_profiles(shape, bte.default_input_names(shape), s)
    _check_consistent(shape, profiles, 16, 1024)
    assert profiles[0]["shapes"]["input_ids"]["opt"] == [8, 256]


def test_profile_inputs_match_the_real_export(tiny_export):
    from lmopt.artifacts import onnx_file
    from lmopt.manifest import read_manifest

    man = read_manifest(tiny_export)
    graph = bte.inspect_onnx(onnx_file(tiny_export, man))
    assert sorted(graph["inputs"]) == sorted(bte.default_input_names(man["model_shape"]))
    assert graph["qdq_nodes"] == 0 and graph["fp16_initializers"] == 0


@pytest.mark.parametrize("change, needle", [
    (dict(max_batch=0), "max shapes smaller than min"),
    (dict(min_batch=4, max_batch=2), "max shapes smaller than min"),
    (dict(max_seq_len=1), "max shapes smaller than min"),
    (dict(opt_batch=9), "--opt-batch 9 is outside"),
    (dict(max_seq_len=4096), "exceeds the model's context"),
    (dict(opt_past_len=512), "--opt-past-len 512 is outside"),
])
def test_bad_limits(change, needle):
    shape = model_shape(load_config("tiny"))
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        bte.resolved_lengths(shape, replace(bte.EngineSettings(), **change))


def test_unexpected_graph_input():
    shape = model_shape(load_config("tiny"))
    with pytest.raises(UserError, match="unexpected graph input 'pixel_values'"):
        bte.derive_profiles(shape, ["input_ids", "pixel_values"], bte.EngineSettings())


# The inspector's JSON in the shapes TensorRT documents: 11 has "DataType" per tensor, 10 a "Format/Datatype" string.
TRT11_LAYERS = {"Layers": [
    {"Name": "gemm_q", "LayerType": "gemm", "Inputs": [{"Name": "x_q", "DataType": "Int8", "Format": "Row major"}],
     "Outputs": [{"Name": "y", "DataType": "Half", "Format": "Row major"}]},
    {"Name": "norm", "LayerType": "Normalization", "Inputs": [{"Name": "y", "DataType": "Half"}],
     "Outputs": [{"Name": "z", "DataType": "Half"}]},
    {"Name": "logits", "LayerType": "gemm", "Inputs": [{"Name": "z", "DataType": "Float"}],
     "Outputs": [{"Name": "logits", "DataType": "Float"}]},
    {"Name": "x_quantize", "LayerType": "Quantize", "Inputs": [{"Name": "x", "DataType": "Float"}],
     "Outputs": [{"Name": "x_q", "DataType": "Int8"}]},
    {"Name": "shape_math", "LayerType": "Shape", "Inputs": [{"Name": "ids", "DataType": "Int64"}],
     "Outputs": [{"Name": "n", "DataType": "Int64"}]},
]}
TRT10_LAYERS = {"Layers": [
    {"Name": "gemm", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP16 format"}]},
    "bare_layer_name",
], "Bindings": ["a", "b"]}


def test_layer_precision_summary_both_formats():
    s11 = bte.layer_precision_summary(TRT11_LAYERS)
    assert s11["by_precision"]["int8"] == 2 and s11["int8_compute_layers"] == 1  # the GEMM, not the Quantize
    assert s11["by_precision"]["fp16"] == 1 and s11["by_precision"]["fp32"] == 1
    assert s11["by_precision"]["other"] == 1 and s11["layers"] == 5
    bte.check_precision_proof(s11, "int8")
    only_q = {"Layers": [TRT11_LAYERS["Layers"][3]]}
    with pytest.raises(UserError, match="no INT8 math"):
        bte.check_precision_proof(bte.layer_precision_summary(only_q), "int8")
    s10 = bte.layer_precision_summary(TRT10_LAYERS)
    assert s10["by_precision"]["fp16"] == 1 and s10["by_precision"]["other"] == 1
    with pytest.raises(UserError, match="has no INT8 layer"):
        bte.check_precision_proof(s10, "int8")
