"""llama.cpp as a benchmark engine: without `make llamacpp` every entry point says so in one line; with it (the tests
below the first two run only where it is installed), the vendored converter's F32 file computes PyTorch's tokens and
the benchmark runs its rows."""
from __future__ import annotations

import importlib.machinery
import sys

import pytest

from conftest import assert_one_line_error, read_json, run_cli
from lmopt import llamacpp


@pytest.fixture
def no_llamacpp(tmp_path, monkeypatch):
    """An install folder with nothing in it, for subprocesses (llama_cpp must not be importable otherwise), and an
    import that fails in this process."""
    outside = [p for p in sys.path if p != str(llamacpp.site_dir())]
    if importlib.machinery.PathFinder.find_spec("llama_cpp", outside) is not None:
        pytest.skip("llama_cpp is importable from this environment itself")
    monkeypatch.setenv("LMOPT_LLAMACPP", str(tmp_path / "none"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    return {"LMOPT_LLAMACPP": str(tmp_path / "none")}


def test_missing_install_names_the_make_target(no_llamacpp, artifacts):
    from lmopt.engines import create_engine
    from lmopt.errors import UserError

    with pytest.raises(UserError, match="make llamacpp"):
        create_engine("llamacpp", "llama-test", precision="int4", artifacts=artifacts)
    proc = run_cli("convert/export_gguf.py", "--model", "llama-test", "--artifacts", str(artifacts), check=False,
                   env=no_llamacpp)
    assert_one_line_error(proc, "make llamacpp")
    assert not (artifacts / "llama-test" / "gguf").exists()


def test_benchmark_row_without_llamacpp_says_why(no_llamacpp, tmp_path):
    out = tmp_path / "b.json"
    run_cli("profile/benchmark.py", "--model", "llama-test", "--artifacts", str(tmp_path / "art"),
            "--engines", "torch,llamacpp", "--precisions", "fp32", "--batch-sizes", "1", "--short-prompt", "4",
            "--long-prompt", "8", "--max-new-tokens", "3", "--warmup", "0", "--repeats", "1", "--bandwidth-mb", "8",
            "--out", str(out), env=no_llamacpp)
    row = next(r for r in read_json(out)["rows"] if r["engine"] == "llamacpp")
    assert row["status"] == "skipped" and "make llamacpp" in row["reason"]


def test_wrong_precision_and_device():
    from lmopt.engines import create_engine
    from lmopt.errors import UserError

    with pytest.raises(UserError, match="F32, Q8_0, Q4_0"):
        create_engine("llamacpp", "llama-test", precision="fp16")
    with pytest.raises(UserError, match="--device cpu"):
        create_engine("llamacpp", "llama-test", precision="fp32", device="cuda")
    assert llamacpp.gguf_weight_bytes({"token_embd.weight": {"bytes": 10}, "output.weight": {"bytes": 10},
                                       "blk.0.w": {"bytes": 5}}) == 15
    assert llamacpp.gguf_weight_bytes({"token_embd.weight": {"bytes": 10}, "blk.0.w": {"bytes": 5}}) == 15  # tied


def _installed() -> bool:
    return (llamacpp.site_dir() / "llama_cpp").is_dir() and llamacpp.vendor_dir().is_dir()


needs_llamacpp = pytest.mark.skipif(not _installed(), reason="llama.cpp not installed (make llamacpp)")


@needs_llamacpp
@pytest.mark.parametrize("model", ["llama-test", "gpt2-test"])
def test_converted_files_match_pytorch_and_benchmark(model, tmp_path):
    art = tmp_path / "art"
    run_cli("convert/export_gguf.py", "--model", model, "--artifacts", str(art), "--check-tokens", "8")
    for t in ("f32", "q8_0", "q4_0"):
        man = read_json(art / model / "gguf" / t / "manifest.json")
        assert man["file_type"] == t and man["weight_bytes_per_step"] > 0
    f32 = read_json(art / model / "gguf" / "f32" / "manifest.json")["check_vs_torch_fp32"]
    assert f32["max_rel_dlogits"] < 1e-3 and f32["greedy_agreement"] == 1.0
    out = tmp_path / "b.json"
    run_cli("profile/benchmark.py", "--model", model, "--artifacts", str(art), "--engines", "torch,llamacpp",
            "--precisions", "fp32,int8,int4", "--batch-sizes", "1", "--short-prompt", "8", "--long-prompt", "16",
            "--max-new-tokens", "4", "--warmup", "0", "--repeats", "1", "--threads", "2", "--bandwidth-mb", "8",
            "--out", str(out))
    rows = {(r["engine"], r["precision"]): r for r in read_json(out)["rows"]}
    for p in ("fp32", "int8", "int4"):
        assert rows[("llamacpp", p)]["status"] == "ok", rows[("llamacpp", p)].get("reason")
    assert rows[("llamacpp", "fp32")]["summary"]["1"]["agreement_vs_baseline"] == 1.0
