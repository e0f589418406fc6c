"""Stage 1 (convert/export_onnx.py): real exports, validation recorded, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path


from conftest import REPO, assert_one_line_error, no_partial, read_json, run_cli


def _check_manifest(folder: Path, atol: float = 1e-4):
    man = read_json(folder / "manifest.json")
    assert man["stage"] == "export" and man["precision"] == "fp32"
    assert man["validation"]["passed"] is True
    by_name = {c["name"]: c for c in man["validation"]["checks"]}
    prefill = next(c for n, c in by_name.items() if n.startswith("prefill"))
    decode = next(c for n, c in by_name.items() if "decode steps" in n)
    greedy = next(c for n, c in by_name.items() if "greedy" in n)
    shapes = next(c for n, c in by_name.items() if "dynamic shapes" in n)
    assert prefill["value"] <= atol and decode["value"] <= atol and shapes["value"] <= atol
    assert greedy["value"] == "32/32"
    for name in ("b1/past0/seq1", "b4/past0/seq64", "b1/past100/seq1", "b4/past100/seq64"):
        assert name in shapes["name"]
    f = man["outputs"]["files"]["model.onnx"]
    assert (folder / "model.onnx").stat().st_size == f["bytes"]
    return man


def test_export_builtin_model(tiny_export):
    man = _check_manifest(tiny_export)
    assert man["model_shape"]["model_type"] == "llama"
    assert man["model_shape"]["num_kv_heads"] < man["model_shape"]["num_heads"]  # grouped-query attention
    assert (tiny_export / "tokenizer.json").is_file()
    assert no_partial(tiny_export.parent)


def test_export_gpt2_shaped_random(gpt2_test_export):
    man = _check_manifest(gpt2_test_export)
    assert man["model_shape"]["model_type"] == "gpt2"


def test_builtin_model_is_small_and_trained():
    weights = REPO / "models" / "tiny" / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    report = json.loads((REPO / "models" / "tiny" / "training.json").read_text())
    assert report["eval_perplexity"] < report["uniform_perplexity"] / 10  # far below the uniform baseline (an order of magnitude)
    cfg = json.loads((REPO / "models" / "tiny" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]


def test_nonexistent_model_path(tmp_path):
    proc = run_cli("convert/export_onnx.py", "--model", str(tmp_path / "nope"), "--artifacts", str(tmp_path / "a"),
                   check=False)
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "a" / "nope").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "empty_model").mkdir()
    proc = run_cli("convert/export_onnx.py", "--model", str(tmp_path / "empty_model"), "--artifacts",
                   str(tmp_path / "a"), check=False)
    assert_one_line_error(proc, "config.json")
    assert not (tmp_path / "a" / "empty_model").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    proc = run_cli("convert/export_onnx.py", "--model", str(tmp_path / "bert"), "--artifacts", str(tmp_path / "a"),
                   check=False)
    assert_one_line_error(proc, "architecture 'bert'", "not supported")
    assert not (tmp_path / "a" / "bert").exists()


def test_unwritable_artifacts_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = run_cli("convert/export_onnx.py", "--model", "llama-test", "--artifacts", str(blocker / "art"),
                   check=False)
    assert_one_line_error(proc, "cannot write to artifacts folder", "--artifacts")
    if os.geteuid() != 0:  # root ignores permission bits; the file-as-folder case above holds for everyone
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        proc = run_cli("convert/export_onnx.py", "--model", "llama-test", "--artifacts", str(ro), check=False)
        assert_one_line_error(proc, "cannot write to artifacts folder")


def test_unknown_model_name(tmp_path):
    # offline: a bare name that is neither a preset nor in the local Hugging Face cache is refused in one line
    proc = run_cli("convert/export_onnx.py", "--model", "no-such-preset", "--artifacts", str(tmp_path), check=False,
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_one_line_error(proc, "'no-such-preset' is not in the local Hugging Face cache", "HF_HUB_OFFLINE")


def test_legacy_hub_id_loads_from_local_cache(tmp_path):
    """`--model gpt2` (a hub id without an organisation) loads from the local Hugging Face cache."""
    from lmopt.models import load_model, load_tokenizer

    snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / "0123abc"
    load_model("gpt2-test").save_pretrained(snap)
    load_tokenizer("gpt2-test").save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    proc = run_cli("convert/export_onnx.py", "--model", "gpt2", "--artifacts", str(tmp_path / "art"),
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    _check_manifest(tmp_path / "art" / "gpt2" / "export" / "fp32")  # validated like any export: 32/32 greedy


def test_help_works():
    proc = run_cli("convert/export_onnx.py", "--help")
    assert "--artifacts" in proc.stdout and "--model" in proc.stdout
