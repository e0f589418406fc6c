"""Stage 2 (convert/quantize_model.py): both INT8 graphs on the built-in model, the accuracy budget and its sweep,
the fallback check, the hand-off to the engines, and one-line errors for bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, load_script, no_partial, read_json, run_cli

SCRIPT = "convert/quantize_model.py"
TRT, CPU = "int8-qdq-trt-minmax", "int8-cpu-u8s8-minmax"


@pytest.fixture(scope="module")
def strict_quantize(tiny_export) -> Path:
    """Both INT8 graphs of the built-in model under a strict 0.1% budget (the default CPU graph is +0.15% on AVX2,
    so the sweep has to choose exclusions)."""
    artifacts = tiny_export.parent.parent.parent
    proc = run_cli(SCRIPT, "--model", "tiny", "--artifacts", str(artifacts), "--max-ppl-increase", "0.1")
    assert "Δppl %" in proc.stdout and TRT in proc.stdout and CPU in proc.stdout   # the accuracy table
    return artifacts / "tiny" / "quantize"


def test_manifests_follow_the_contract(strict_quantize, tiny_export):
    from lmopt.manifest import sha256_file

    export = read_json(tiny_export / "manifest.json")
    for variant, target in [(TRT, "tensorrt"), (CPU, "onnxruntime")]:
        folder = strict_quantize / variant
        man = read_json(folder / "manifest.json")
        assert man["stage"] == "quantize" and man["variant"] == variant and man["model"] == "tiny"
        assert man["precision"] == "int8" and man["targets"] == [target] and man["default"] is True
        assert man["outputs"]["onnx"] == "model.onnx"
        entry = man["outputs"]["files"]["model.onnx"]
        assert entry["sha256"] == sha256_file(folder / "model.onnx")
        assert man["model_shape"] == export["model_shape"]
        assert man["inputs"]["onnx"]["sha256"] == export["outputs"]["files"]["model.onnx"]["sha256"]
        assert man["inputs"]["evaluation_text"] == "builtin:eval" and man["inputs"]["calibration_text"] == "builtin:calib"
        assert man["validation"]["passed"] is True
        acc = man["accuracy"]
        for k in ("ppl_fp32", "ppl", "top1_agreement", "max_abs_dlogits", "greedy_agreement"):
            assert k in acc
        assert acc["greedy_tokens"] == 32 and acc["ppl_increase_pct"] <= 0.1
        assert acc["eval_tokens"] >= 8192 and acc["eval_windows"] == 64
        noise = acc["noise"]    # the evaluation's own spread: intervals around the point estimates
        lo, hi = noise["ppl_fp32_interval"]
        assert lo < acc["ppl_fp32"] < hi and noise["ppl_fp32_halfwidth_pct"] > 0
        lo, hi = noise["ppl_increase_pct_interval"]
        assert lo <= acc["ppl_increase_pct"] <= hi and noise["ppl_increase_pct_halfwidth"] >= 0
        assert acc["top1_agreement"] > 0.8
        assert "/model/rotary_emb/MatMul" in man["exclusions"]["always"]
        down = man["exclusions"]["outliers"]   # the MLP down projections stay FP32 (their input's outliers)
        assert len(down) == export["model_shape"]["num_layers"] and all("down_proj" in n for n in down)
        assert set(down) <= set(man["exclusions"]["all"])
        own = man["int8_fallback"][target]
        assert own["matmuls_int8"] > 0 and 0 < own["int8_flop_fraction"] <= 1
        assert not list(strict_quantize.glob(".*tmp*"))


def test_budget_sweep_chooses_exclusions(strict_quantize):
    man = read_json(strict_quantize / CPU / "manifest.json")
    sweep = man["sensitivity"]
    full = sweep.get("full_int8_ppl_increase_pct")
    if not sweep["ran"] and full is not None and full <= 0.1:
        # INT8 kernels differ by CPU: with AVX-512 VNNI full INT8 of the built-in model can already meet 0.1%
        # (it was +0.2% on AVX2), and then there is nothing to sweep.
        pytest.skip(f"full INT8 already within the 0.1% budget on this CPU (Δppl {full:+.3f}%): no sweep to check")
    assert sweep["ran"] is True and full > 0.1
    # every group scored, most sensitive (largest gain when kept FP32) first
    deltas = [r["ppl_increase_pct"] for r in sweep["table"]]
    assert len(deltas) >= 4 and deltas == sorted(deltas)
    chosen = sweep["chosen_exclusions"]
    assert chosen and chosen == [r["group"] for r in sweep["table"][: len(chosen)]]
    assert sweep["steps"][-1]["ppl_increase_pct"] <= 0.1
    assert man["exclusions"]["budget"] == chosen
    # excluded groups are really float: fewer INT8 MatMuls than the model has
    cov = man["int8_fallback"]["onnxruntime"]
    assert cov["matmuls_float"] > 1


def test_cpu_graph_is_u8s8_and_fused_trt_graph_is_symmetric(strict_quantize):
    import onnx
    from onnx import TensorProto

    cpu = read_json(strict_quantize / CPU / "manifest.json")["int8_fallback"]["onnxruntime"]
    assert cpu["op_types"].get("QLinearMatMul", 0) + cpu["op_types"].get("MatMulInteger", 0) == cpu["matmuls_int8"]

    def zero_points(path):
        g = onnx.load(str(path)).graph
        inits = {i.name: i for i in g.initializer}
        return [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]

    cpu_zp = zero_points(strict_quantize / CPU / "model.onnx")
    trt_zp = zero_points(strict_quantize / TRT / "model.onnx")
    assert cpu_zp and all(z.data_type == TensorProto.UINT8 for z in cpu_zp)
    assert trt_zp and all(z.data_type == TensorProto.INT8 for z in trt_zp)
    assert all(not onnx.numpy_helper.to_array(z).any() for z in trt_zp)   # symmetric: zero point 0
    trt = read_json(strict_quantize / TRT / "manifest.json")["int8_fallback"]["tensorrt"]
    assert trt["matmuls_int8"] >= trt["matmuls_float"]


def test_engines_find_and_run_the_int8_graphs(strict_quantize):
    from lmopt.artifacts import find_onnx
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate

    artifacts = strict_quantize.parent.parent
    assert find_onnx(artifacts, "tiny", "int8", "onnxruntime")[0].name == CPU
    assert find_onnx(artifacts, "tiny", "int8", "tensorrt")[0].name == TRT
    eng = create_engine("ort", "tiny", "int8", artifacts=artifacts)
    assert eng.info.variant == CPU
    out = generate(eng, [[5, 6, 7, 8]], SamplingParams(max_new_tokens=8))
    assert len(out.tokens[0]) == 8


def _copy_export(tiny_export, root: Path) -> Path:
    dst = root / "tiny" / "export" / "fp32"
    shutil.copytree(tiny_export, dst)
    return dst


def test_impossible_budget_writes_nothing(tiny_export, tmp_path):
    art = tmp_path / "art"
    _copy_export(tiny_export, art)
    proc = run_cli(SCRIPT, "--artifacts", str(art), "--target", "onnxruntime", "--max-ppl-increase", "0",
                   "--max-excluded", "0", check=False)
    written = art / "tiny" / "quantize" / CPU / "manifest.json"
    if proc.returncode == 0 and written.is_file():
        full = read_json(written)["sensitivity"]["full_int8_ppl_increase_pct"]
        if full <= 0:
            # on some CPUs (AVX-512 VNNI kernels) INT8 lowers the built-in model's perplexity: a budget of 0 is met
            pytest.skip(f"INT8 meets a 0% budget on this CPU (Δppl {full:+.3f}%): no impossible budget to test")
    assert_one_line_error(proc, "no INT8 model written", "budget")
    assert not (art / "tiny" / "quantize").exists() or not any((art / "tiny" / "quantize").iterdir())
    assert no_partial(art)


@pytest.mark.parametrize("case", ["empty-calib", "short-calib", "missing-calib", "negative-budget", "text-budget"])
def test_bad_input(case, tiny_export, tmp_path):
    art = tmp_path / "art"
    _copy_export(tiny_export, art)
    args = ["--artifacts", str(art), "--target", "onnxruntime"]
    needle = {"empty-calib": "is empty", "short-calib": "need", "missing-calib": "does not exist",
              "negative-budget": "--max-ppl-increase",
              "text-budget": "must be a number"}[case]
    if case in ("empty-calib", "short-calib"):
        f = tmp_path / "calib.txt"
        f.write_text("" if case == "empty-calib" else "def f(): return 1\n")
        args += ["--calib-text", str(f)]
    elif case == "missing-calib":
        args += ["--calib-text", str(tmp_path / "nope.txt")]
    else:
        args += ["--max-ppl-increase", {"negative-budget": "-1", "text-budget": "one"}[case]]
    proc = run_cli(SCRIPT, *args, check=False)
    assert_one_line_error(proc, needle)
    assert not (art / "tiny" / "quantize").exists()


@pytest.mark.parametrize("case", ["missing-manifest", "truncated", "corrupt"])
def test_bad_fp32_onnx(case, tiny_export, tmp_path):
    art = tmp_path / "art"
    if case == "missing-manifest":
        art.mkdir()
        needle = "run: make export"
    else:
        dst = _copy_export(tiny_export, art)
        data = (dst / "model.onnx").read_bytes()
        if case == "truncated":
            (dst / "model.onnx").write_bytes(data[: len(data) // 2])
            needle = "truncated"
        else:  # same size, different bytes
            (dst / "model.onnx").write_bytes(data[:1000] + bytes(b ^ 0xFF for b in data[1000:2000]) + data[2000:])
            needle = "sha256"
    proc = run_cli(SCRIPT, "--artifacts", str(art), check=False)
    assert_one_line_error(proc, needle)
    assert not (art / "tiny" / "quantize").exists()


def _break_graph(path: Path, seed: int = 0) -> None:
    """Deliberately damage a graph: Gaussian noise of half their spread on the float matrices left in it (the
    token embedding table; the quantized MatMul weights are int8 and stay as they are)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    broken = 0
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2 and w.size >= 4096:
            init.CopyFrom(numpy_helper.from_array(
                (w + rng.normal(0, 0.5 * w.std(), w.shape)).astype(np.float32), init.name))
            broken += 1
    assert broken
    onnx.save(model, str(path))


def test_broken_graph_fails_the_gate(tiny_export, tmp_path, monkeypatch):
    """A quantizer that returns a damaged graph: Δppl far outside the budget and outside the evaluation's own noise,
    so the stage writes nothing — also after the sweep has kept layers in FP32 (the damage is not in a layer)."""
    from lmopt import quantization
    from lmopt.errors import UserError

    art = tmp_path / "art"
    _copy_export(tiny_export, art)
    real = quantization.Calibration.quantize
    scored = []

    def broken_quantize(self, preset, exclude, out_path):
        real(self, preset, exclude, out_path)
        _break_graph(Path(out_path))

    real_full = quantization.Evaluator.full

    def full(self, path, session_kwargs=None):
        scored.append(real_full(self, path, session_kwargs))
        return scored[-1]

    monkeypatch.setattr(quantization.Calibration, "quantize", broken_quantize)
    monkeypatch.setattr(quantization.Evaluator, "full", full)
    mod = load_script(SCRIPT)
    with pytest.raises(UserError, match="no INT8 model written"):
        mod.quantize(settings=mod.QuantizeSettings(artifacts=str(art), target="onnxruntime", max_excluded=1))
    assert not (art / "tiny" / "quantize").exists() or not any((art / "tiny" / "quantize").iterdir())
    acc = scored[-1]
    assert acc["eval_tokens"] >= 8192 and acc["ppl_increase_pct"] > 1.0
    assert acc["noise"]["ppl_increase_pct_interval"][0] > 1.0     # failed for the damage, not for the noise
