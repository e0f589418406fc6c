"""One home for what every measuring script writes: statistics, the result envelope, the bandwidth floor.

    from lmopt import results as R
    R.stats([1.2, 1.4, 1.3])                 # {"count", "mean", "p50", "p90", "p95", "p99", "min", "max"}
    R.stats(step_seconds, scale=1e3)         # the same, seconds in, milliseconds out
    doc = R.envelope("benchmark", settings=asdict(s), summary=..., samples=..., versions=R.versions("torch"))
    R.write_json(path, doc)                  # atomic: temp name, then rename

Conventions:
- Latency statistics are in milliseconds; the key that holds them says so (`ttft_ms`, `itl_ms`, `step_ms`).
  Percentiles interpolate linearly between samples (numpy's default, "type 7").
- The envelope: `schema`, `kind`, `created` (UTC ISO), `command`, `machine`, `versions`, `settings`, then the
  kind's own fields, then `summary` and the raw `samples`. Readers (README, notebook) find files by `kind`.
- The bandwidth floor of one decode step = bytes the step must read / measured *read* bandwidth. Bytes read =
  the engine's `weight_bytes()` (every weight once; an input embedding that is not tied to the LM head is left
  out, since a step reads only its B rows) + the KV cache at the step's context. Read bandwidth: best of N timed
  reductions (sums, a max) over a buffer much larger than the last-level cache, with every core's thread (CPU) or
  on the device (CUDA) — the kind of traffic a decode step makes. A step faster than its floor is a measurement error
  (`below_floor`), unless its bytes fit in the last-level cache, where the memory floor does not bind. Result files
  written before the read probe existed hold only a copy bandwidth (bytes read + written, STREAM's convention);
  `floor_bandwidth` reads either.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 2
STAT_KEYS = ("count", "mean", "p50", "p90", "p95", "p99", "min", "max")


# ---- statistics ------------------------------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between samples; None for no samples."""
    s = sorted(float(x) for x in xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs: Iterable[float], scale: float = 1.0, digits: int = 4) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p95, p99, min, max of raw samples, each multiplied by `scale` (1e3: s -> ms)."""
    a = [float(x) * scale for x in xs]
    if not a:
        return {k: (0 if k == "count" else None) for k in STAT_KEYS}
    r = lambda x: round(x, digits)  # noqa: E731
    return {"count": len(a), "mean": r(sum(a) / len(a)), "p50": r(percentile(a, 50)), "p90": r(percentile(a, 90)),
            "p95": r(percentile(a, 95)), "p99": r(percentile(a, 99)), "min": r(min(a)), "max": r(max(a))}


# ---- the envelope ----------------------------------------------------------------------------------------------------
def versions(*names: str) -> dict[str, str | None]:
    from lmopt.manifest import package_versions

    return package_versions(*names)


def envelope(kind: str, *, settings: dict, summary: Any = None, samples: Any = None,
             versions: dict | None = None, **fields: Any) -> dict:
    """A self-describing result document; `fields` (the kind's own) sit between settings and summary."""
    from lmopt.manifest import machine_info, now_iso

    doc = {"schema": SCHEMA_VERSION, "kind": kind, "created": now_iso(),
           "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "machine": machine_info(),
           "versions": versions or {}, "settings": settings, **fields}
    if summary is not None:
        doc["summary"] = summary
    if samples is not None:
        doc["samples"] = samples
    return doc


def write_json(path: str | os.PathLike, doc: Any) -> Path:
    """Write JSON atomically (a temp name in the same folder, then rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def save_result(path: str | os.PathLike, doc: Any, log, publish_model: str | None = None) -> Path:
    """write_json, logged; with publish_model (a script's --publish) also the same file at
    results/<machine_tag>/<model>/<name> in the repository, where the README tables read it."""
    from .paths import REPO_ROOT, model_slug

    path = write_json(path, doc)
    log.info("Saving %s", path)
    if publish_model:
        dest = write_json(REPO_ROOT / "results" / machine_tag(doc) / model_slug(publish_model) / path.name, doc)
        log.info("Saving %s", dest)
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def machine_tag(result: dict) -> str:
    """A short, stable folder name under results/ for the machine a result came from (e.g. cpu-amd-epyc-2c,
    nvidia-h200): the GPU's name when the result ran on one, else CPU model and core count."""
    m = result.get("machine", {})
    if m.get("gpu") and str(result.get("settings", {}).get("device", "cpu")).startswith("cuda"):
        return _slug(m["gpu"]["name"])
    cpu = m.get("cpu_model") or m.get("processor") or "cpu"
    words = [w for w in _slug(re.sub(r"\(.*?\)|processor|\d+-core", "", cpu, flags=re.I)).split("-") if w][:2]
    return "cpu-" + "-".join(words) + f"-{m.get('cpu_count', '?')}c"


# ---- the bandwidth floor ---------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 5) -> float | None:
    """Best-of-`reps` copy bandwidth of an `nbytes` buffer in GB/s, counting bytes read + written; None if nbytes<=0.

    CUDA: device-to-device copies timed with CUDA events; CPU: numpy copies timed with the host clock."""
    if nbytes <= 0:
        return None
    if str(device).startswith("cuda"):
        import torch

        a = torch.empty(nbytes, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(reps):
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        del a, b
        torch.cuda.empty_cache()
    else:
        import numpy as np

        a = np.ones(nbytes, dtype=np.uint8)
        b = np.empty_like(a)
        np.copyto(b, a)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            np.copyto(b, a)
            best = min(best, time.perf_counter() - t0)
        del a, b
    return 2 * nbytes / best / 1e9


def read_bandwidth_gbs(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 5,
                       threads: int | None = None) -> dict | None:
    """Best-of-`reps` read bandwidth in GB/s: a float32 sum over an `nbytes` buffer, bytes read only; None if
    nbytes<=0. Returns {"gbs", "buffer_bytes", "reps", "threads", "llc_bytes"}.

    CPU: the fastest of a few reductions (_cpu_read_probes) on `threads` threads (default: every core this process
    may run on), timed with the host clock; torch's thread count is restored. CUDA: torch's sum timed with CUDA
    events."""
    if nbytes <= 0:
        return None
    import torch

    n = max(1, nbytes // 4)
    if str(device).startswith("cuda"):
        a = torch.ones(n, dtype=torch.float32, device=device)
        for _ in range(3):
            a.sum()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(reps):
            start.record()
            a.sum()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        del a
        torch.cuda.empty_cache()
        used = None
    else:
        used = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        methods = _cpu_read_probes(n, reps, used)
        return {"gbs": max(methods.values()), "buffer_bytes": n * 4, "reps": reps, "threads": used,
                "llc_bytes": llc_bytes(), "methods_gbs": methods}
    return {"gbs": round(n * 4 / best / 1e9, 2), "buffer_bytes": n * 4, "reps": reps, "threads": used,
            "llc_bytes": None}


def _cpu_read_probes(n: int, reps: int, threads: int) -> dict[str, float]:
    """GB/s of a few read-only passes over n float32 values on `threads` threads, each best of `reps`: torch's sum,
    max and matrix-vector product (its own thread pool), and numpy sums of one slice per thread (numpy releases the
    GIL). The floor takes the fastest: a pass that is not memory-bound would otherwise lower the bar."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    def best_of(f) -> float:
        f()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return round(n * 4 / t / 1e9, 2)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(n, dtype=torch.float32)
    m, v = a.view(-1, 1024), torch.ones(1024)
    try:  # a matrix-vector product streams its matrix once: a decode step's own access pattern
        out = {"torch.sum": best_of(a.sum), "torch.amax": best_of(a.amax), "torch.mv": best_of(lambda: m @ v)}
    finally:
        torch.set_num_threads(before)
    x = a.numpy()
    parts = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:
        out["numpy.sum per thread"] = best_of(lambda: list(pool.map(np.sum, parts)))
    del a, m, x, parts
    return out


def llc_bytes() -> int | None:
    """Size of the largest CPU cache (sysfs), or None where the system does not say."""
    best = None
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            size = int(txt.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
        best = max(best or 0, size)
    return best


def floor_bandwidth(result: dict) -> tuple[float | None, str | None]:
    """(GB/s, "read" | "copy") a benchmark result's floor divides by: the read bandwidth where the file has it, else
    the copy bandwidth of files written before the read probe; (None, None) when neither was measured."""
    if result.get("read_bandwidth_gbs"):
        return result["read_bandwidth_gbs"], "read"
    if result.get("copy_bandwidth_gbs"):
        return result["copy_bandwidth_gbs"], "copy"
    return None, None


def below_floor(step_ms: float | None, floor: dict, llc: int | None) -> bool:
    """True when a measured step is faster than its bandwidth floor although its bytes cannot sit in the last-level
    cache: the measurement is wrong (the step did not do its work, or the bytes read are miscounted)."""
    if not step_ms or not floor.get("floor_ms"):
        return False
    if llc and floor["bytes"] <= llc:
        return False
    return step_ms < floor["floor_ms"]


def kv_bytes(shape: dict, batch: int, context: int, bytes_per: int) -> int:
    """KV-cache bytes one decode step reads at `context` cached positions (keys and values, every layer)."""
    return 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * context * batch * bytes_per


def step_floor(weight_bytes: int, shape: dict, batch: int, context: int, kv_bytes_per: int,
               bandwidth_gbs: float | None) -> dict:
    """The bandwidth floor of one decode step: {"weight_bytes", "kv_bytes", "bytes", "floor_ms"} (floor_ms None
    without a bandwidth)."""
    kv = kv_bytes(shape, batch, context, kv_bytes_per)
    total = int(weight_bytes) + kv
    return {"weight_bytes": int(weight_bytes), "kv_bytes": kv, "bytes": total,
            "floor_ms": round(total / (bandwidth_gbs * 1e9) * 1e3, 5) if bandwidth_gbs else None}


def torch_weight_bytes(model) -> int:
    """Weight bytes a decode step of a torch model reads: every parameter once, except an input embedding that is
    not tied to the LM head (a step reads only its B rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total
