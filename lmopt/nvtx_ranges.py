"""NVTX ranges for Nsight Systems, cheap when no profiler is attached.

`nvtx_range("prefill")` pushes/pops a range in the "lmopt" domain. Without the `nvtx` package, or with
LMOPT_NVTX=0, it is a no-op context manager.

    with nvtx_range("decode_step"): ...        # what the generation loop and the engines do
    set_enabled(False)                         # the bare loop, for measuring the annotation's own cost
    set_range_hook(torch.profiler.record_function)   # also mark the ranges in a PyTorch profiler trace

Cost (profile/nsys_nvtx_overhead.py measures it): the push/pop goes straight to the NVTX C API with attributes
cached per name, about 0.5 us per range without a profiler attached; the `nvtx` package's own `push_range(msg,
domain=...)` looks the domain and attributes up on every call and costs several times more.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable

DOMAIN = "lmopt"
_NULL = nullcontext()          # reusable: entering it does nothing
_hook: Callable | None = None  # extra context-manager factory entered with every range (torch record_function)

try:
    import nvtx as _nvtx
    from nvtx._lib import pop_range as _pop, push_range as _push  # the C calls behind nvtx.push_range

    _DOMAIN = _nvtx.get_domain(DOMAIN)
    _HANDLE = _DOMAIN.handle
    AVAILABLE = True
except ImportError:  # profiling is optional
    AVAILABLE = False

ENABLED = AVAILABLE and os.environ.get("LMOPT_NVTX", "1") != "0"
_attrs: dict = {}


class _Range:
    __slots__ = ("a",)

    def __init__(self, name: str):
        a = _attrs.get(name)
        if a is None:
            a = _attrs[name] = _DOMAIN.get_event_attributes(name, None, None, None)
        self.a = a

    def __enter__(self):
        _push(self.a, _HANDLE)

    def __exit__(self, *exc):
        _pop(_HANDLE)
        return False


class _Hooked:
    """An NVTX range (when enabled) plus the hook's range, e.g. a PyTorch profiler record_function."""
    __slots__ = ("inner", "extra")

    def __init__(self, name: str):
        self.inner = _Range(name) if ENABLED else _NULL
        self.extra = _hook(name)

    def __enter__(self):
        self.inner.__enter__()
        self.extra.__enter__()

    def __exit__(self, *exc):
        self.extra.__exit__(*exc)
        self.inner.__exit__(*exc)
        return False


def nvtx_range(name: str):
    if _hook is not None:
        return _Hooked(name)
    if not ENABLED:
        return _NULL
    return _Range(name)


def set_enabled(on: bool) -> bool:
    """Turn NVTX ranges on/off at run time (no-op without the package); returns the previous state."""
    global ENABLED
    prev, ENABLED = ENABLED, bool(on) and AVAILABLE
    return prev


def set_range_hook(factory: Callable | None) -> None:
    """Also enter `factory(name)` with every range (None removes it): how the PyTorch profiler sees our ranges."""
    global _hook
    _hook = factory
