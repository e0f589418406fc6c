"""Stage 3 CLIs (optimize/build_trt_engine.py, optimize/trtexec_command.sh): the exact trtexec command per precision,
one-line errors for bad input and for a machine without TensorRT/GPU, and — where TensorRT 11 and a GPU exist — a
real FP16 build of the built-in model checked end to end.

The FP16 and INT8 graphs are made here from the tiny export with the standard tools (onnxconverter-common's FP16
conversion, ONNX Runtime's static Q/DQ quantizer, symmetric INT8 as TensorRT requires), so these tests do not depend
on stage 2's scripts.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, read_json, run_cli

from lmopt import trt_api

BUILD = "optimize/build_trt_engine.py"
TRT, TRT_MISSING = trt_api.availability()


@pytest.fixture(scope="module")
def trt_graphs(tiny_export, tmp_path_factory) -> dict[str, Path]:
    import onnx
    from onnxconverter_common import float16
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = tmp_path_factory.mktemp("trt_graphs")
    src = tiny_export / "model.onnx"
    with warnings.catch_warnings():  # "float32 number ... will be truncated": tiny weights, expected in FP16
        warnings.simplefilter("ignore", UserWarning)
        fp16 = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(fp16, str(out / "fp16.onnx"))

    class OnePrompt(CalibrationDataReader):
        def __init__(self):
            ids = np.arange(1, 17, dtype=np.int64)[None]
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids - 1}
            for i in range(4):
                for kv in ("key", "value"):
                    feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 32), np.float32)
            self.feeds = iter([feed])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(out / "int8.onnx"), OnePrompt(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    return {"fp16": out / "fp16.onnx", "int8": out / "int8.onnx", "fp32": src}


def _spec(shapes: dict[str, tuple]) -> str:
    return ",".join(f"{n}:{'x'.join(map(str, d))}" for n, d in shapes.items())


def _expected_trtexec(onnx: Path, art: Path, precision: str) -> str:
    """Written out by hand for tiny (4 layers, 2 KV heads, head_dim 32, 512 positions) with --max-batch 4:
    prefill prompt 1/128/512 with an empty past, decode one token with past 1/256/511."""
    def shapes(b, s, p):
        d = {"input_ids": (b, s), "attention_mask": (b, p + s), "position_ids": (b, s)}
        for i in range(4):
            d[f"past_key_values.{i}.key"] = d[f"past_key_values.{i}.value"] = (b, 2, p, 32)
        return d
    out = art / "tiny" / "engine" / f"trt11.4-{precision}-trtexec"
    return " ".join([
        "trtexec", f"--onnx={onnx}", f"--saveEngine={out}/model.plan",
        "--profile=0", f"--minShapes={_spec(shapes(1, 1, 0))}", f"--optShapes={_spec(shapes(1, 128, 0))}",
        f"--maxShapes={_spec(shapes(4, 512, 0))}",
        "--profile=1", f"--minShapes={_spec(shapes(1, 1, 1))}", f"--optShapes={_spec(shapes(1, 1, 256))}",
        f"--maxShapes={_spec(shapes(4, 1, 511))}",
        "--memPoolSize=workspace:4096M", "--builderOptimizationLevel=3",
        f"--timingCacheFile={art}/tiny/engine/timing-trt11.4.cache", "--profilingVerbosity=detailed",
        f"--exportLayerInfo={out}/layers.json", "--skipInference"])


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trtexec_dry_run_exact_command(precision, trt_graphs, tmp_path):
    import subprocess

    art = tmp_path / "art"
    env = dict(os.environ, TRT_VERSION="11.4", PY=str(REPO / ".venv" / "bin" / "python"))
    if not Path(env["PY"]).exists():
        env["PY"] = __import__("sys").executable
    proc = subprocess.run(["bash", str(REPO / "optimize" / "trtexec_command.sh"), "--model", "tiny", "--artifacts",
                           str(art), "--precision", precision, "--onnx", str(trt_graphs[precision]),
                           "--max-batch", "4", "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line == _expected_trtexec(trt_graphs[precision], art, precision)
    for removed in ("--fp16", "--int8", "--best", "--calib", "--stronglyTyped"):  # gone or implied in trtexec 11
        assert removed not in line.split()
    assert not art.exists()  # a dry run writes nothing


def test_onnx_without_qdq_as_int8(tiny_export, tmp_path):
    proc = run_cli(BUILD, "--model", "tiny", "--artifacts", str(tmp_path), "--precision", "int8",
                   "--onnx", str(tiny_export / "model.onnx"), check=False)
    assert_one_line_error(proc, "no QuantizeLinear/DequantizeLinear nodes", "make quantize")
    assert not (tmp_path / "tiny").exists()


def test_max_shapes_smaller_than_min(trt_graphs, tmp_path):
    proc = run_cli(BUILD, "--model", "tiny", "--artifacts", str(tmp_path), "--precision", "fp16", "--onnx",
                   str(trt_graphs["fp16"]), "--min-batch", "4", "--max-batch", "2", check=False)
    assert_one_line_error(proc, "max shapes smaller than min", "--max-batch 2 < --min-batch 4")
    assert not (tmp_path / "tiny").exists()


def test_missing_onnx(tmp_path):
    proc = run_cli(BUILD, "--model", "tiny", "--artifacts", str(tmp_path), "--precision", "int8", check=False)
    assert_one_line_error(proc, "no int8 ONNX for tensorrt", "run: make quantize")
    proc = run_cli(BUILD, "--model", "tiny", "--artifacts", str(tmp_path), "--precision", "fp16",
                   "--onnx", str(tmp_path / "nope.onnx"), check=False)
    assert_one_line_error(proc, "nope.onnx does not exist")
    assert not (tmp_path / "tiny").exists()


@pytest.mark.skipif(TRT is not None, reason="TensorRT and a GPU are available here")
def test_without_tensorrt_one_line_and_skip(trt_graphs, tmp_path):
    args = ["--model", "tiny", "--artifacts", str(tmp_path), "--precision", "fp16", "--onnx", str(trt_graphs["fp16"])]
    line = assert_one_line_error(run_cli(BUILD, *args, check=False))
    assert line == f"error: {TRT_MISSING}"
    assert "pip install tensorrt-cu13==11.4.0.106" in line or "GPU" in line
    proc = run_cli(BUILD, *args, "--skip-if-unavailable")
    assert "note: skipping the TensorRT fp16 engine" in proc.stdout
    assert not (tmp_path / "tiny").exists()


@pytest.mark.skipif(TRT is not None, reason="TensorRT and a GPU are available here")
def test_runtime_without_tensorrt(tmp_path):
    from lmopt.engines import create_engine
    from lmopt.errors import UserError

    with pytest.raises(UserError, match="TensorRT"):
        create_engine("trt", "tiny", precision="fp16", artifacts=tmp_path)


@pytest.mark.skipif(shutil.which("trtexec") is not None, reason="trtexec is installed here")
def test_trtexec_wrapper_without_trtexec(tmp_path):
    import subprocess

    cmd = ["bash", str(REPO / "optimize" / "trtexec_command.sh"), "--model", "tiny", "--artifacts", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, "trtexec not found on PATH", "TensorRT 11")
    proc = subprocess.run([*cmd, "--skip-if-unavailable"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("note: skipping the trtexec build: trtexec not found")


def test_help_works():
    assert "--max-seq-len" in run_cli(BUILD, "--help").stdout


@pytest.mark.skipif(TRT is None, reason=f"needs TensorRT 11 and an NVIDIA GPU: {TRT_MISSING}")
def test_real_fp16_build_and_runtime(trt_graphs, artifacts):
    run_cli(BUILD, "--model", "tiny", "--artifacts", str(artifacts), "--precision", "fp16",
            "--onnx", str(trt_graphs["fp16"]), "--max-batch", "4")
    engines = artifacts / "tiny" / "engine"
    folder = engines / f"{trt_api.version_tag(TRT)}-fp16"
    man = read_json(folder / "manifest.json")
    assert man["validation"]["passed"] and man["layer_precision"]["by_precision"]["fp16"] > 0
    assert man["engine_info"]["num_profiles"] == 2 and (folder / "layers.json").is_file()
    assert (engines / f"timing-{trt_api.version_tag(TRT)}.cache").stat().st_size > 0

    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate

    eng = create_engine("trt", "tiny", precision="fp16", device="cuda", artifacts=artifacts)
    assert eng.weight_bytes() == man["weight_bytes"] > 0
    out = generate(eng, [[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=8))
    assert [len(t) for t in out.tokens] == [8, 8] or "stop" in out.finish_reasons
    eng.close()
    shutil.rmtree(folder)
