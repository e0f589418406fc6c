"""TensorRT API conformance without TensorRT: every name the builder and runtime use exists in TensorRT 11's Python
bindings, none of the names 11 removed is used, and lmopt/trt_api.py's list covers what the code really touches.

The bindings come from the `tensorrt-cu13-bindings` wheel (requirements.txt): its compiled `tensorrt.so` cannot be
imported without libnvinfer, but its string table holds every bound name. The linker merges a string into a longer
one that ends with it ("Builder" is stored as the tail of "IExprBuilder"), so a name counts as present when it ends
one of the strings. That also lets a name through that only exists as the tail of another (`execution_context` of
`create_execution_context`); the names in lmopt/trt_api.py were also read in the TensorRT 11.1 OSS bindings' source
(python/src/infer/pyCore.cpp, python/src/parsers/pyOnnx.cpp).
"""
from __future__ import annotations

import ast
import importlib.util
import re
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from lmopt import trt_api

SOURCES = [REPO / "optimize" / "build_trt_engine.py", REPO / "lmopt" / "engines" / "trt_engine.py",
           REPO / "lmopt" / "trt_api.py"]
# variables that hold TensorRT objects in SOURCES -> their class in the bindings
OBJECT_VARS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
               "config": "IBuilderConfig", "profile": "IOptimizationProfile", "cache": "ITimingCache",
               "runtime": "Runtime", "engine": "ICudaEngine", "inspector": "EngineInspector",
               "context": "IExecutionContext", "sev": "ILogger.Severity"}


@pytest.fixture(scope="module")
def binding_strings() -> str:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-cu13-bindings is not installed — pip install -r requirements.txt")
    version = metadata.version("tensorrt-cu13-bindings")
    assert version.startswith("11."), f"conformance is checked against TensorRT 11, found bindings {version}"
    so = Path(spec.submodule_search_locations[0]) / "tensorrt.so"
    strings = {s.decode("latin-1") for s in re.findall(rb"[\x20-\x7e]{2,}", so.read_bytes())}
    return "\0" + "\0".join(strings) + "\0"


def _present(table: str, name: str) -> bool:
    return f"{name}\0" in table  # equal to, or the tail of, a string in the table


def used_in_sources() -> dict[str, str]:
    """Every TensorRT name the source files touch: `trt.A.B` chains and attributes of TensorRT objects."""
    found: dict[str, str] = {}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
                continue  # only whole chains
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name):
                continue
            parts.reverse()
            if parts[-1].startswith("__") and parts[-1] != "__version__":
                parts = parts[:-1]  # trt.ILogger.__init__ is Python's, not TensorRT's
            if not parts:
                continue
            if cur.id == "trt":
                found[".".join(parts)] = f"{path.name}:{node.lineno}"
            elif cur.id in OBJECT_VARS:
                found[f"{OBJECT_VARS[cur.id]}.{parts[0]}"] = f"{path.name}:{node.lineno}"
    return found


def test_every_used_name_exists_in_tensorrt_11(binding_strings):
    missing = [f"{name} ({part})" for name in trt_api.USED for part in name.split(".")
               if not _present(binding_strings, part)]
    assert not missing, f"not in TensorRT 11.4's bindings: {missing}"


def test_no_removed_name_is_used():
    used = set(trt_api.USED) | set(used_in_sources())
    assert not used & set(trt_api.REMOVED_IN_11), used & set(trt_api.REMOVED_IN_11)


def test_removed_names_are_really_gone_from_11(binding_strings):
    # proves both that the installed bindings are 11.x and that our list of removals is right
    still_there = [n for n in trt_api.REMOVED_DISTINCTIVE if _present(binding_strings, n)]
    assert not still_there, still_there
    # and the check would notice a name that exists
    assert _present(binding_strings, "build_serialized_network") and _present(binding_strings, "STRONGLY_TYPED")


def test_sources_use_only_listed_names():
    found = used_in_sources()
    assert len(found) >= 30, f"the scan found too little to mean anything: {sorted(found)}"
    unlisted = {n: where for n, where in found.items() if n not in trt_api.USED}
    assert not unlisted, f"add these to lmopt/trt_api.py USED (or stop using them): {unlisted}"


def test_network_flags_per_major_version():
    flag = SimpleNamespace(STRONGLY_TYPED=1)  # kSTRONGLY_TYPED's value in TensorRT 10
    assert trt_api.network_flags(SimpleNamespace(__version__="11.4.0.106", NetworkDefinitionCreationFlag=flag)) == 0
    assert trt_api.network_flags(SimpleNamespace(__version__="10.13.3.9", NetworkDefinitionCreationFlag=flag)) == 2
    assert trt_api.version_tag(SimpleNamespace(__version__="11.4.0.106")) == "trt11.4"


def test_trt_runtime_device_memory_needs_cuda_torch(monkeypatch):
    """The TensorRT runtime's device buffers are torch CUDA tensors: without torch, or with a CPU-only torch, one
    line names the install (docs/tensorrt.md, "TensorRT runtime")."""
    import sys

    import pytest

    from lmopt.engines.trt_engine import torch_for_device_memory
    from lmopt.errors import UserError

    import torch

    if torch.cuda.is_available():
        assert torch_for_device_memory() is torch
    else:
        with pytest.raises(UserError, match="CUDA build of torch.*pip install torch"):
            torch_for_device_memory()
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now raises ImportError
    with pytest.raises(UserError, match="torch is not installed — pip install torch"):
        torch_for_device_memory()
