"""A per-step timeline of a served engine: every prefill and decode call of the scheduler's loop (host clock in and
out, rows, and on a GPU the device's own start and end from CUDA events), and every pass of the sender that streams
the tokens out, so the loss between the engine's ceiling and the served figure can be put on the host or the device.

    trace = StepTrace.from_env(name)              # None unless LMOPT_STEP_TRACE names a folder
    slots = trace.wrap(slots) if trace else slots # the slot engine the scheduler drives
    trace.send(t0, t1, responses)                 # the sender thread, per pass (perf_counter seconds)
    trace.dump_when_idle()                        # LMOPT_STEP_TRACE/step-trace-<name>.json, once the load is over
    trace.dump()                                  # the same, now (the model's finalize)

    summary = summarize(json.load(open(path)), t_from, t_to)   # profile/serve_bench.py: the 64-stream window

Clock: time.perf_counter, which on Linux is CLOCK_MONOTONIC, the same clock in every process of the machine, so the
load generator's measurement window (its own perf_counter) selects the steps of that window. Device times: one CUDA
event recorded before and one after each engine call on the current stream; an event's device time is placed on
the host clock through a reference event synchronized at the start. The last `capacity` calls are kept. Cost: two
event records and a few list appends per step (microseconds).
"""
from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

ENV = "LMOPT_STEP_TRACE"
_CALLS = ("decode_slots", "prefill_slots", "prefill_slot")


class StepTrace:
    def __init__(self, path: str | Path, capacity: int = 50000, cuda: bool | None = None):
        self.path = Path(path)
        self.calls = collections.deque(maxlen=capacity)   # (kind, t_in, t_out, rows, ev_in, ev_out)
        self.sends = collections.deque(maxlen=capacity)   # (t_in, t_out, responses)
        self.torch = None
        if cuda is not False:
            try:
                import torch

                if torch.cuda.is_available():
                    self.torch = torch
            except ImportError:
                pass
        self.ref, self.t_ref = None, None
        self._dumped_at = 0.0
        if self.torch is not None:
            self.ref = self.torch.cuda.Event(enable_timing=True)
            self.ref.record()
            self.ref.synchronize()
            self.t_ref = time.perf_counter()

    @classmethod
    def from_env(cls, name: str) -> "StepTrace | None":
        folder = os.environ.get(ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"step-trace-{name}.json")

    def wrap(self, engine):
        return _Traced(engine, self)

    def send(self, t_in: float, t_out: float, responses: int) -> None:
        self.sends.append((t_in, t_out, responses))

    def dump_when_idle(self, idle_s: float = 1.0) -> None:
        """Write the trace once nothing was traced for idle_s (the sender thread calls this while no stream runs):
        a reader gets it after a load without stopping the server."""
        last = max(self.calls[-1][2] if self.calls else 0.0, self.sends[-1][1] if self.sends else 0.0)
        if last > self._dumped_at and time.perf_counter() - last >= idle_s:
            self.dump()
            self._dumped_at = last

    def _event(self):
        if self.torch is None:
            return None
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def dump(self) -> Path:
        """Write the trace (device times resolved now: every recorded event has completed after a synchronize)."""
        calls = []
        if self.torch is not None:
            self.torch.cuda.synchronize()
        for kind, t_in, t_out, rows, e_in, e_out in list(self.calls):
            row = {"kind": kind, "t_in": t_in, "t_out": t_out, "rows": rows}
            if e_in is not None:
                row["gpu_start"] = self.t_ref + self.ref.elapsed_time(e_in) / 1e3
                row["gpu_end"] = self.t_ref + self.ref.elapsed_time(e_out) / 1e3
            calls.append(row)
        doc = {"clock": "time.perf_counter (CLOCK_MONOTONIC)", "device_times": self.torch is not None,
               "calls": calls, "sends": [{"t_in": a, "t_out": b, "responses": n} for a, b, n in self.sends]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)
        return self.path


class _Traced:
    """The slot engine, its prefill and decode calls timed; everything else passed through (capabilities too)."""

    def __init__(self, inner, trace: StepTrace):
        self._inner, self._trace = inner, trace

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in _CALLS:
            return attr
        trace = self._trace

        def timed(slots, *args, **kwargs):
            t_in = time.perf_counter()
            e_in = trace._event()
            out = attr(slots, *args, **kwargs)
            e_out = trace._event()
            rows = len(slots) if isinstance(slots, (list, tuple)) else 1
            trace.calls.append((name.split("_")[0], t_in, time.perf_counter(), rows, e_in, e_out))
            return out

        return timed


def _ms(xs: list[float]) -> dict:
    from lmopt.results import stats

    return stats(xs, scale=1e3)


def summarize(doc: dict, t_from: float, t_to: float) -> dict:
    """The steps between t_from and t_to: how the window's time splits between the device and the host."""
    calls = [c for c in doc["calls"] if t_from <= c["t_in"] and c["t_out"] <= t_to]
    sends = [s for s in doc["sends"] if t_from <= s["t_in"] and s["t_out"] <= t_to]
    win = t_to - t_from
    dec = [c for c in calls if c["kind"] == "decode"]
    pre = [c for c in calls if c["kind"] == "prefill"]
    period = [b["t_in"] - a["t_in"] for a, b in zip(dec, dec[1:])]
    out = {"window_s": win, "decode_steps": len(dec), "prefill_calls": len(pre),
           "decode_rows": _stats_plain([c["rows"] for c in dec]),
           "decode_step_period_ms": _ms(period),
           "host_in_decode_call_ms": _ms([c["t_out"] - c["t_in"] for c in dec]),
           "host_in_prefill_call_ms": _ms([c["t_out"] - c["t_in"] for c in pre]),
           "host_share_in_engine_calls": sum(c["t_out"] - c["t_in"] for c in calls) / win if win > 0 else None,
           "send_passes": len(sends), "responses_sent": sum(s["responses"] for s in sends),
           "send_pass_ms": _ms([s["t_out"] - s["t_in"] for s in sends]),
           "send_share": sum(s["t_out"] - s["t_in"] for s in sends) / win if win > 0 else None,
           "device_times": bool(doc.get("device_times"))}
    if dec and win > 0:
        out["decode_steps_per_s"] = len(dec) / win
    if doc.get("device_times") and calls:
        busy = _union([(c["gpu_start"], c["gpu_end"]) for c in calls], t_from, t_to)
        out["gpu_busy_share"] = busy / win if win > 0 else None
        out["gpu_decode_step_ms"] = _ms([c["gpu_end"] - c["gpu_start"] for c in dec])
        out["gpu_prefill_ms"] = _ms([c["gpu_end"] - c["gpu_start"] for c in pre])
        out["gpu_decode_share"] = sum(c["gpu_end"] - c["gpu_start"] for c in dec) / win if win > 0 else None
        out["gpu_prefill_share"] = sum(c["gpu_end"] - c["gpu_start"] for c in pre) / win if win > 0 else None
        # the device idle before each decode step: waiting for the host to queue it
        gaps = [max(0.0, b["gpu_start"] - a["gpu_end"]) for a, b in zip(calls, calls[1:]) if b["kind"] == "decode"]
        out["gpu_idle_before_decode_ms"] = _ms(gaps)
        # host time per decode step outside the engine's own calls: the scheduler's bookkeeping, handing tokens
        # out, and waiting for the interpreter lock while the sender thread holds it
        out["host_outside_engine_per_step_ms"] = _ms([p - (a["t_out"] - a["t_in"]) for a, p in zip(dec, period)])
    return out


def _stats_plain(xs):
    from lmopt.results import stats

    return stats(xs)


def _union(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Total length of the union of [a, b] spans clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end, lo), min(b, hi)
        if b > a:
            total += b - a
        end = max(end, b)
    return total


def samples(doc: dict, t_from: float, t_to: float, n: int = 400) -> list[dict]:
    """The first `n` calls of the window, times relative to t_from in ms (the committed timeline's raw rows)."""
    rows = []
    for c in doc["calls"]:
        if t_from <= c["t_in"] and c["t_out"] <= t_to:
            r = {"kind": c["kind"], "rows": c["rows"], "in_ms": round((c["t_in"] - t_from) * 1e3, 3),
                 "out_ms": round((c["t_out"] - t_from) * 1e3, 3)}
            if "gpu_start" in c:
                r["gpu_start_ms"] = round((c["gpu_start"] - t_from) * 1e3, 3)
                r["gpu_end_ms"] = round((c["gpu_end"] - t_from) * 1e3, 3)
            rows.append(r)
            if len(rows) >= n:
                break
    return rows
