"""Turn a profiler's raw events into the summary `run_nsys_profile.py` writes, the same for both backends.

    events = events_from_nsys_sqlite("run.sqlite")       # Nsight Systems (nsys stats writes the .sqlite)
    events = events_from_chrome_trace("trace.json")     # PyTorch profiler (Kineto/CUPTI Chrome trace)
    summary = summarize(events, wall_s=1.23)

Events (all times in ns): ranges [(name, start, end, thread)], kernels [(name, start, end, stream)],
memcpy [(kind, start, end, bytes, stream, note)], launches [(api_start, gpu_start)] pairs joined by correlation id.
"""
from __future__ import annotations

import gzip
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

from lmopt.results import percentile


def _pct(xs: list[float], q: float) -> float:
    """Percentile for q in 0..1 (lmopt.results' interpolation), 0.0 for no samples."""
    return percentile(xs, q * 100) or 0.0


def _stats_ms(durs_ns: list[int]) -> dict:
    ms = [d / 1e6 for d in durs_ns]
    return {"count": len(ms), "total_ms": round(sum(ms), 4), "mean_ms": round(sum(ms) / len(ms), 5) if ms else 0.0,
            "p50_ms": round(_pct(ms, 0.5), 5), "p90_ms": round(_pct(ms, 0.9), 5),
            "min_ms": round(min(ms), 5) if ms else 0.0, "max_ms": round(max(ms), 5) if ms else 0.0}


# ---- readers ---------------------------------------------------------------------------------------------------------
def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def events_from_nsys_sqlite(path: str | Path, domain: str = "lmopt") -> dict:
    """Events from the SQLite export of an .nsys-rep (schema of Nsight Systems 2022.4; newer ones keep these names)."""
    con = sqlite3.connect(str(path))
    tables = _tables(con)
    strings = dict(con.execute("SELECT id, value FROM StringIds")) if "StringIds" in tables else {}
    ev: dict = {"ranges": [], "kernels": [], "memcpy": [], "launches": [], "traced": []}
    if "NVTX_EVENTS" in tables:
        ev["traced"].append("nvtx")
        dom_ids = {r[0] for r in con.execute(
            "SELECT domainId FROM NVTX_EVENTS WHERE eventType = 75 AND text = ?", (domain,))}
        # 59 = push/pop range; the text sits in `text` or, for registered strings, in StringIds via textId
        for start, end, text, text_id, dom, tid in con.execute(
                "SELECT start, end, text, textId, domainId, globalTid FROM NVTX_EVENTS WHERE eventType = 59"):
            if end is None or (dom_ids and dom not in dom_ids):
                continue
            ev["ranges"].append((text if text is not None else strings.get(text_id, "?"), start, end, tid))
    if "OSRT_API" in tables:
        ev["traced"].append("osrt")
        ev["osrt"] = [(strings.get(n, "?"), s, e) for n, s, e in con.execute("SELECT nameId, start, end FROM OSRT_API")]
    if "CUPTI_ACTIVITY_KIND_KERNEL" in tables:
        ev["traced"].append("cuda_kernels")
        cols = {r[1] for r in con.execute("PRAGMA table_info(CUPTI_ACTIVITY_KIND_KERNEL)")}
        name_col = "demangledName" if "demangledName" in cols else "shortName"
        kern = list(con.execute(f"SELECT {name_col}, start, end, streamId, correlationId "
                                "FROM CUPTI_ACTIVITY_KIND_KERNEL"))
        ev["kernels"] = [(strings.get(n, str(n)), s, e, st) for n, s, e, st, _ in kern]
        if "CUPTI_ACTIVITY_KIND_RUNTIME" in tables:
            api = dict(con.execute("SELECT correlationId, start FROM CUPTI_ACTIVITY_KIND_RUNTIME"))
            ev["launches"] = [(api[c], s) for _, s, _, _, c in kern if c in api]
    if "CUPTI_ACTIVITY_KIND_MEMCPY" in tables:
        ev["traced"].append("cuda_memcpy")
        kinds = {1: "HtoD", 2: "DtoH", 8: "DtoD", 9: "HtoH", 10: "PtoP"}
        mem = {0: "unknown", 1: "pageable", 2: "pinned", 3: "device", 4: "array", 5: "managed"}
        for k, s, e, b, st, src, dst in con.execute(
                "SELECT copyKind, start, end, bytes, streamId, srcKind, dstKind FROM CUPTI_ACTIVITY_KIND_MEMCPY"):
            ev["memcpy"].append((kinds.get(k, str(k)), s, e, b, st, f"{mem.get(src, src)}->{mem.get(dst, dst)}"))
    con.close()
    return ev


def events_from_chrome_trace(path: str | Path) -> dict:
    """Events from a PyTorch profiler Chrome trace (timestamps in us there)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    data = json.loads(raw)
    items = data["traceEvents"] if isinstance(data, dict) else data
    ev: dict = {"ranges": [], "kernels": [], "memcpy": [], "launches": [], "cpu_ops": [], "traced": ["cpu_ops"]}
    api_start: dict[int, int] = {}
    kern_corr: list[tuple[int, int]] = []
    for e in items:
        if e.get("ph") != "X":
            continue
        cat, name, args = e.get("cat", ""), e.get("name", ""), e.get("args", {}) or {}
        s = int(round(float(e["ts"]) * 1000))
        d = int(round(float(e.get("dur", 0)) * 1000))
        if cat == "user_annotation":
            ev["ranges"].append((name, s, s + d, (e.get("pid"), e.get("tid"))))
        elif cat == "kernel":
            ev["kernels"].append((name, s, s + d, args.get("stream")))
            if "correlation" in args:
                kern_corr.append((args["correlation"], s))
        elif cat == "gpu_memcpy":
            # names look like "Memcpy HtoD (Pageable -> Device)"
            kind = name.split()[1] if len(name.split()) > 1 else name
            note = name[name.find("(") + 1: name.rfind(")")].replace(" ", "").lower() if "(" in name else ""
            ev["memcpy"].append((kind, s, s + d, int(args.get("bytes", 0) or 0), args.get("stream"), note))
        elif cat in ("cuda_runtime", "cuda_driver"):
            if "correlation" in args:
                api_start[args["correlation"]] = s
        elif cat == "cpu_op":
            ev["cpu_ops"].append((name, s, s + d, (e.get("pid"), e.get("tid"))))
    ev["launches"] = [(api_start[c], s) for c, s in kern_corr if c in api_start]
    if ev["ranges"]:
        ev["traced"].append("ranges")
    if ev["kernels"]:
        ev["traced"].append("cuda_kernels")
    if ev["memcpy"]:
        ev["traced"].append("cuda_memcpy")
    return ev


# ---- summary -----------------------------------------------------------------------------------------------------------
def range_tree(ranges: list[tuple]) -> list[dict]:
    """Each range with its parent's name and depth, from start/end containment on the same thread."""
    out = []
    by_thread: dict = defaultdict(list)
    for r in ranges:
        by_thread[r[3]].append(r)
    for rs in by_thread.values():
        rs.sort(key=lambda r: (r[1], -r[2]))
        stack: list[dict] = []
        for name, s, e, _ in rs:
            while stack and stack[-1]["end"] <= s:
                stack.pop()
            node = {"name": name, "start": s, "end": e, "depth": len(stack),
                    "parent": stack[-1]["name"] if stack else None}
            out.append(node)
            stack.append(node)
    return out


def nvtx_summary(ranges: list[tuple], root: str, wall_s: float | None) -> dict:
    """Time per range name, and how much of the measured wall time the ranges under `root`'s children explain."""
    tree = range_tree(ranges)
    by_name: dict[str, list[int]] = defaultdict(list)
    parents: dict[str, set] = defaultdict(set)
    for n in tree:
        by_name[n["name"]].append(n["end"] - n["start"])
        parents[n["name"]].add(n["parent"])
    table = {name: {**_stats_ms(d), "parents": sorted(p for p in parents[name] if p)}
             for name, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))}
    # the workload wraps the measured loop in `root`, each round in one child ("generate"); the grandchildren
    # (tokenize, prefill, sample, decode_step, detokenize) are the work itself
    rounds = [n for n in tree if n["parent"] == root]
    round_names = {n["name"] for n in rounds}
    work = [n for n in tree if n["parent"] in round_names and n["depth"] == 2]
    work_ns = sum(n["end"] - n["start"] for n in work)
    roots = [n for n in tree if n["name"] == root]
    out = {"ranges": table, "root": root, "root_ms": round(sum(n["end"] - n["start"] for n in roots) / 1e6, 4),
           "work_ranges": sorted({n["name"] for n in work}), "work_ranges_sum_ms": round(work_ns / 1e6, 4)}
    if wall_s:
        out["measured_wall_ms"] = round(wall_s * 1e3, 4)
        out["work_ranges_share_of_wall"] = round(work_ns / 1e9 / wall_s, 4)
        out["adds_up_within_10pct"] = abs(work_ns / 1e9 / wall_s - 1.0) <= 0.10
    return out


def kernel_summary(kernels: list[tuple], top: int = 25) -> dict:
    by: dict[str, list[int]] = defaultdict(list)
    for name, s, e, _ in kernels:
        by[name].append(e - s)
    total = sum(sum(v) for v in by.values())
    rows = sorted(by.items(), key=lambda kv: -sum(kv[1]))
    return {"kernels": len(kernels), "total_ms": round(total / 1e6, 4), "distinct": len(by),
            "by_name": [{"name": n[:200], **_stats_ms(d), "share": round(sum(d) / total, 4) if total else 0.0}
                        for n, d in rows[:top]]}


def memcpy_summary(copies: list[tuple]) -> dict:
    out: dict = {}
    for kind in sorted({c[0] for c in copies}):
        cs = [c for c in copies if c[0] == kind]
        ns, nbytes = sum(c[2] - c[1] for c in cs), sum(c[3] for c in cs)
        notes: dict[str, int] = defaultdict(int)
        for c in cs:
            notes[c[5] or "?"] += 1
        out[kind] = {**_stats_ms([c[2] - c[1] for c in cs]), "bytes": nbytes,
                     "GB_per_s": round(nbytes / ns, 3) if ns else None, "memory_kinds": dict(notes)}
    return out


def launch_gap_summary(launches: list[tuple]) -> dict:
    """CPU launch call start -> GPU kernel start: queueing behind earlier work plus launch latency."""
    gaps = [(g - a) / 1e3 for a, g in launches]
    if not gaps:
        return {"count": 0}
    return {"count": len(gaps), "mean_us": round(sum(gaps) / len(gaps), 2), "p50_us": round(_pct(gaps, 0.5), 2),
            "p90_us": round(_pct(gaps, 0.9), 2), "max_us": round(max(gaps), 2)}


def stream_overlap(kernels: list[tuple], copies: list[tuple]) -> dict:
    """Share of GPU-busy time during which more than one stream had a kernel or copy running."""
    edges = []
    for name, s, e, st in kernels:
        edges += [(s, 1, st), (e, -1, st)]
    for c in copies:
        edges += [(c[1], 1, c[4]), (c[2], -1, c[4])]
    if not edges:
        return {"streams": 0}
    edges.sort(key=lambda x: (x[0], x[1]))
    active: dict = defaultdict(int)
    busy = multi = 0
    prev = edges[0][0]
    for t, d, st in edges:
        n_streams = sum(1 for v in active.values() if v > 0)
        if n_streams >= 1:
            busy += t - prev
        if n_streams >= 2:
            multi += t - prev
        active[st] += d
        prev = t
    return {"streams": len({e[2] for e in edges}), "busy_ms": round(busy / 1e6, 4),
            "multi_stream_ms": round(multi / 1e6, 4), "multi_stream_share": round(multi / busy, 4) if busy else 0.0}


def cpu_op_summary(ops: list[tuple], top: int = 25) -> dict:
    """Per op name: self time (minus the ops nested inside, what to optimize) and inclusive time."""
    self_ns: dict[str, int] = defaultdict(int)
    incl: dict[str, list[int]] = defaultdict(list)
    by_thread: dict = defaultdict(list)
    for o in ops:
        by_thread[o[3]].append(o)
    for rs in by_thread.values():
        rs.sort(key=lambda r: (r[1], -r[2]))
        stack: list[list] = []          # [name, end, child_ns]
        def close(node):
            self_ns[node[0]] += node[3] - node[2]
        for name, s, e, _ in rs:
            while stack and stack[-1][1] <= s:
                close(stack.pop())
            if stack:
                stack[-1][2] += e - s
            incl[name].append(e - s)
            stack.append([name, e, 0, e - s])
        while stack:
            close(stack.pop())
    total = sum(self_ns.values())
    rows = sorted(self_ns.items(), key=lambda kv: -kv[1])
    return {"ops": len(ops), "self_total_ms": round(total / 1e6, 3),
            "by_self_time": [{"name": n, "self_ms": round(v / 1e6, 4), "self_share": round(v / total, 4) if total
                              else 0.0, "inclusive": _stats_ms(incl[n])} for n, v in rows[:top]]}


def osrt_summary(calls: list[tuple], top: int = 15) -> dict:
    by: dict[str, list[int]] = defaultdict(list)
    for name, s, e in calls:
        by[name].append(e - s)
    rows = sorted(by.items(), key=lambda kv: -sum(kv[1]))
    return {"calls": len(calls), "by_name": [{"name": n, **_stats_ms(d)} for n, d in rows[:top]]}


def summarize(ev: dict, root: str, wall_s: float | None) -> dict:
    gpu = bool(ev["kernels"] or ev["memcpy"])
    out = {"traced": ev["traced"], "nvtx": nvtx_summary(ev["ranges"], root, wall_s)}
    if "cpu_ops" in ev:
        out["cpu_ops"] = cpu_op_summary(ev["cpu_ops"])
    if "osrt" in ev:
        out["os_runtime"] = osrt_summary(ev["osrt"])
    out["cuda_kernels"] = kernel_summary(ev["kernels"]) if ev["kernels"] else None
    out["memcpy"] = memcpy_summary(ev["memcpy"]) if ev["memcpy"] else None
    out["launch_to_start"] = launch_gap_summary(ev["launches"]) if ev["launches"] else None
    out["stream_overlap"] = stream_overlap(ev["kernels"], ev["memcpy"]) if gpu else None
    return out
