"""Pinned vs pageable host->device copies of the engine's per-step inputs and of its KV cache, measured on a GPU.

    from lmopt.profiling.pinned_copies import pinned_vs_pageable
    pinned_vs_pageable("llama-1b", batch=1, seq=160, precision="fp16", device="cuda", repeats=30)

Each case copies the same bytes from a pageable and from a pinned host buffer, interleaved, timed with CUDA events
(GPU time of the copy) and with the host clock (how long the copy call blocks the CPU: a pageable copy is staged
through a driver buffer and blocks, a pinned non_blocking copy returns at once and can overlap other work).
On a machine without a GPU it returns a status saying so.
"""
from __future__ import annotations

import statistics
import time


def _cases(model: str, batch: int, seq: int, precision: str) -> dict[str, list[int]]:
    """Byte sizes of the tensors copied per case: the decode step's inputs and the KV cache, per layer tensor."""
    from lmopt.models import load_config, model_shape

    sh = model_shape(load_config(model))
    elt = 2 if precision in ("fp16", "bf16") else 4
    kv = batch * sh["num_kv_heads"] * seq * sh["head_dim"] * elt
    long_ctx = min(2048, sh["max_positions"])
    kv_long = batch * sh["num_kv_heads"] * long_ctx * sh["head_dim"] * elt
    return {
        # input_ids [B,1], position_ids [B,1], attention_mask [B, seq]: int64
        "decode_step_inputs": [batch * 8, batch * 8, batch * seq * 8],
        "kv_cache_all_layers": [kv] * (2 * sh["num_layers"]),
        # the same KV cache at a long context, where bandwidth rather than per-copy latency decides
        f"kv_cache_all_layers_ctx{long_ctx}": [kv_long] * (2 * sh["num_layers"]),
    }


def pinned_vs_pageable(model: str, batch: int, seq: int, precision: str, device: str, repeats: int) -> dict:
    try:
        import torch
    except ImportError:
        return {"status": "skipped: needs torch with CUDA and a GPU"}
    if not device.startswith("cuda") or not torch.cuda.is_available():
        why = "device is cpu" if not device.startswith("cuda") else "torch sees no CUDA device"
        return {"status": f"skipped: needs a GPU ({why}); run with --device cuda on a machine with an NVIDIA GPU"}
    dev = torch.device(device)
    out: dict = {"status": "measured", "method": "same bytes copied from a pageable and a pinned host buffer, "
                 "interleaved; gpu_ms from CUDA events, host_call_ms = time until copy_ returns (non_blocking=True)",
                 "repeats": repeats, "batch": batch, "seq": seq, "precision": precision, "cases": {}}
    for case, sizes in _cases(model, batch, seq, precision).items():
        srcs = {"pageable": [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes],
                "pinned": [torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1) for n in sizes]}
        dsts = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes]
        res = {m: {"gpu_ms": [], "host_call_ms": []} for m in srcs}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for r in range(repeats + 3):           # 3 warm-up copies per mode, not recorded
            order = ("pageable", "pinned") if r % 2 == 0 else ("pinned", "pageable")
            for mode in order:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start.record()
                for d, s in zip(dsts, srcs[mode]):
                    d.copy_(s, non_blocking=True)
                end.record()
                t1 = time.perf_counter()
                end.synchronize()
                if r >= 3:
                    res[mode]["gpu_ms"].append(start.elapsed_time(end))
                    res[mode]["host_call_ms"].append((t1 - t0) * 1e3)
        nbytes = sum(sizes)
        row: dict = {"bytes": nbytes, "tensors": len(sizes)}
        for mode, v in res.items():
            med = statistics.median(v["gpu_ms"])
            row[mode] = {"gpu_ms_median": round(med, 5), "host_call_ms_median": round(statistics.median(
                v["host_call_ms"]), 5), "GB_per_s": round(nbytes / med / 1e6, 2) if med else None,
                "gpu_ms": [round(x, 5) for x in v["gpu_ms"]], "host_call_ms": [round(x, 5) for x in v["host_call_ms"]]}
        row["pinned_speedup_gpu"] = round(row["pageable"]["gpu_ms_median"] / row["pinned"]["gpu_ms_median"], 3)
        row["pinned_speedup_host_call"] = round(row["pageable"]["host_call_ms_median"] /
                                                max(row["pinned"]["host_call_ms_median"], 1e-9), 2)
        out["cases"][case] = row
        del srcs, dsts
    return out
