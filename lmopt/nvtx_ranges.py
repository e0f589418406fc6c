"""NVTX ranges for Nsight Systems, cheap when no profiler is attached.

`nvtx_range("prefill")` pushes/pops a range in the "lmopt" domain. Without the `nvtx` package, or with
LMOPT_NVTX=0, it is a no-op context manager.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

try:
    if os.environ.get("LMOPT_NVTX", "1") == "0":
        raise ImportError
    import nvtx as _nvtx

    _DOMAIN = _nvtx.get_domain("lmopt")

    @contextmanager
    def nvtx_range(name: str):
        _nvtx.push_range(name, domain="lmopt")
        try:
            yield
        finally:
            _nvtx.pop_range(domain="lmopt")

    ENABLED = True
except ImportError:  # profiling is optional
    def nvtx_range(name: str):  # type: ignore[misc]
        return nullcontext()

    ENABLED = False
