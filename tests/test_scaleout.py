"""Scale-out: model instances on every GPU of a host (the generated config only: no GPU here)."""
from __future__ import annotations

import pytest

from conftest import assert_one_line_error, load_script, run_cli

from lmopt.errors import UserError


def _parse(text: str):
    """The generated config.pbtxt parsed by Triton's own ModelConfig schema."""
    m = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(text, m.ModelConfig())


def test_gpus_list_gives_one_instance_group_entry_per_gpu():
    repo = load_script("serve/make_model_repository.py")
    s = repo.RepoSettings(engine="compiled", device="cuda", instances=2, gpus="0,1")
    gpus = repo.resolve_gpus(s.gpus, s.device)
    assert gpus == [0, 1]
    for name, decoupled in (("lm", False), ("lm_stream", True)):
        cfg = _parse(repo.config_pbtxt(name, s, "fp16", decoupled, {"engine": "compiled"}, gpus))
        groups = [(g.count, g.kind, list(g.gpus)) for g in cfg.instance_group]
        kind_gpu = type(cfg.instance_group[0]).KIND_GPU
        assert groups == [(2, kind_gpu, [0]), (2, kind_gpu, [1])]
    # without --gpus: one entry, Triton's placement (as before)
    cfg = _parse(repo.config_pbtxt("lm", repo.RepoSettings(device="cuda"), "fp16", False, {}, []))
    assert len(cfg.instance_group) == 1 and not cfg.instance_group[0].gpus


def test_gpus_all_counts_the_machines_gpus(monkeypatch):
    repo = load_script("serve/make_model_repository.py")
    monkeypatch.setattr(repo, "count_gpus", lambda: 2)
    assert repo.resolve_gpus("all", "cuda") == [0, 1]
    monkeypatch.setattr(repo, "count_gpus", lambda: 0)
    with pytest.raises(UserError, match="--gpus 0,1"):
        repo.resolve_gpus("all", "cuda")
    for bad, msg in (("0,x", "list of GPU indices"), ("1,1", "distinct"), ("-1", ">= 0")):
        with pytest.raises(UserError, match=msg):
            repo.resolve_gpus(bad, "cuda")


def test_gpus_without_cuda_is_a_one_line_error(tmp_path):
    proc = run_cli("serve/make_model_repository.py", "--artifacts", str(tmp_path / "a"), "--gpus", "0,1",
                   check=False)
    assert_one_line_error(proc, "--device cuda")
    assert not (tmp_path / "a").exists()


def test_engines_place_onnx_runtime_on_the_instance_gpu():
    from lmopt.engines.base import cuda_device_id

    assert [cuda_device_id(d) for d in ("cuda", "cuda:0", "cuda:3")] == [0, 0, 3]
