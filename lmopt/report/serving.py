"""The "serving" section of results/README.md, rendered from committed serving result files.

One table set per folder holding a batching comparison (kind "serving_batching_comparison", written by
profile/serve_bench.py); beside it, the streaming sweep (kind "streaming_load", label "batching-on") and the
perf_analyzer sweeps (kind "perf_analyzer", labels "batching-on"/"batching-off"). Documents are found by kind and
label, never by file name. Every table names the machine, date and command of its data.
`results_dir` is the committed results root or any folder below it (e.g. artifacts/<model>/profile).
"""
from __future__ import annotations

from pathlib import Path

from lmopt.report import Doc, collect


def _f(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _new_tokens(settings: dict):
    return settings.get("max_new_tokens", settings.get("max_tokens"))  # files written before the flags were unified


def _find(docs: list[Doc], folder: Path, kind: str, label: str) -> dict | None:
    for d in docs:
        if d.path.parent == folder and d.kind == kind and d.label == label:
            return d.data
    return None


def _section(folder: Path, cmp_doc: dict, docs: list[Doc]) -> str:
    where = _where(cmp_doc)
    model = cmp_doc["settings"]["model"]
    out = [f"### {model} on {where}",
           "",
           f"Data: `{folder.as_posix()}/serving-*.json`, {cmp_doc['created'][:10]}, command "
           f"`{' '.join(cmp_doc['command'])}` (serve variant `{cmp_doc.get('serve_variant', '?')}`).",
           ""]
    # streaming sweep (batching on: the served configuration)
    st = _find(docs, folder, "streaming_load", "batching-on")
    if st is not None:
        s = st["settings"]
        out += [f"**Streaming** (`{s['triton_model']}`, gRPC stream, prompt {s['prompt_tokens']} tokens, up to "
                f"{_new_tokens(s)} new, ≤{s['requests']} requests or {s['duration_s']:g} s per level, warm-up "
                "excluded; ms):", "",
                "| concurrency | requests | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | end-to-end p50 | end-to-end p99 "
                "| output tok/s | req/s |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in st["summary"]:
            out.append(f"| {r['concurrency']} | {r['completed']}{' (' + str(r['failed']) + ' failed)' if r['failed'] else ''} "
                       f"| {_f(r['ttft_ms']['p50'])} | {_f(r['ttft_ms']['p99'])} | {_f(r['itl_ms']['p50'], '.2f')} "
                       f"| {_f(r['itl_ms']['p99'], '.2f')} | {_f(r['e2e_ms']['p50'])} | {_f(r['e2e_ms']['p99'])} "
                       f"| {_f(r['output_tok_per_s'])} | {_f(r['requests_per_s'], '.2f')} |")
        out.append("")
    # perf_analyzer + batching on/off
    pa_on = _find(docs, folder, "perf_analyzer", "batching-on")
    if pa_on is not None and _find(docs, folder, "perf_analyzer", "batching-off") is not None:
        s = pa_on["settings"]
        out += [f"**perf_analyzer** (`{s['triton_model']}`, non-streaming, gRPC, {s['measurement_requests']} requests "
                f"per window, prompt {s['prompt_tokens']} tokens, {_new_tokens(s)} new) and **dynamic batching on vs "
                "off** (same model and load; off = the same repository without its `dynamic_batching` block):", "",
                "| concurrency | req/s on | req/s off | on/off | p95 ms on | p95 ms off | requests per execution on "
                "| streaming tok/s on | off | on/off |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cmp_doc["summary"]["rows"]:
            if "pa_rps_on" not in r:
                out.append(f"| {r['concurrency']:g} | no stable perf_analyzer measurement (on or off) ||||| "
                           f"{_f(r.get('stream_tok_s_on'))} | {_f(r.get('stream_tok_s_off'))} "
                           f"| {_f(r.get('stream_throughput_ratio'), '.2f')}x |")
                continue
            out.append(f"| {r['concurrency']:g} | {_f(r.get('pa_rps_on'))} | {_f(r.get('pa_rps_off'))} "
                       f"| {_f(r.get('pa_throughput_ratio'), '.2f')}x | {_f(r.get('pa_p95_ms_on'))} "
                       f"| {_f(r.get('pa_p95_ms_off'))} | {_f(r.get('pa_requests_per_execution_on'), '.2f')} "
                       f"| {_f(r.get('stream_tok_s_on'))} | {_f(r.get('stream_tok_s_off'))} "
                       f"| {_f(r.get('stream_throughput_ratio'), '.2f')}x |")
        out.append("")
        c = cmp_doc["summary"].get("claim_40pct")
        if c:
            held = c["levels_with_ratio_ge_1_4_and_p95_not_worse"]
            measured = [r["concurrency"] for r in cmp_doc["summary"]["rows"] if "pa_rps_on" in r]
            failed = [x for x in measured if x not in held]
            verdict = "holds" if c["confirmed"] else "does not hold"
            out += [f"The dynamic-batching claim (\"+40% throughput, no latency trade-off\") {verdict} at its best level here: "
                    f"concurrency {c['best_concurrency']:g}, {c['throughput_ratio']:.2f}x requests/s at p95 "
                    f"{c['p95_ms_on']:.1f} ms (on) vs {c['p95_ms_off']:.1f} ms (off). It holds at concurrency "
                    f"{', '.join(f'{x:g}' for x in held) or 'none'}; not at {', '.join(f'{x:g}' for x in failed) or 'none'}"
                    + (" (with one request in flight there is nothing to batch: one request per execution)."
                       if 1 in failed else "."), ""]
    out += _overhead_table(cmp_doc["summary"].get("overhead_c1") or {}, OVERHEAD_INTRO, cmp_doc["summary"].get("floor_c1"))
    return "\n".join(out)


OVERHEAD_INTRO = ("**Serving overhead** at concurrency 1 (Triton streaming vs the same engine in-process: `lmopt.generate`'s "
                  "loop, and, where measured, the same engine behind `lmopt.scheduler` in the client's process; "
                  "{method}; ms; targets: TTFT within +2 ms, ITL within +10%). TTFT is the median; ITL the mean, since "
                  "served tokens can arrive in bursts that make the median gap meaningless (the p50 is in the files):")
_REQUEST_BY_REQUEST = "interleaved request by request"


def _overhead_table(over: dict, intro: str, floor: dict | None = None) -> list[str]:
    """Served vs in-process at concurrency 1, one row per server configuration, and Triton's own floor (the
    engine-less lm_empty model) when measured (lines, empty without data)."""
    if not over:
        return []
    method = next((o["method"] for o in over.values() if o.get("method")), _REQUEST_BY_REQUEST)
    out = [intro.format(method=method), "",
           "| server config | TTFT p50 served | in-process | Δ | in-process scheduler | Δ | ITL mean served "
           "| in-process | Δ | in-process scheduler | Δ | same tokens |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, o in over.items():
        sv, ip, d = o["served"], o["in_process"], o["overhead_ms"]
        q = o.get("in_process_scheduler")
        qt = (f"{_f(q['ttft_ms']['p50'], '.2f')} | {q['overhead_ms']['ttft_p50']:+.2f}" if q else "– | –")
        qi = (f"{_f(q['itl_ms']['mean'], '.3f')} | {q['overhead_ms']['itl_mean']:+.3f}" if q else "– | –")
        out.append(f"| {name} | {_f(sv['ttft_ms']['p50'], '.2f')} | {_f(ip['ttft_ms']['p50'], '.2f')} "
                   f"| {d['ttft_p50']:+.2f} | {qt} | {_f(sv['itl_ms']['mean'], '.3f')} "
                   f"| {_f(ip['itl_ms']['mean'], '.3f')} | {d['itl_mean']:+.3f} | {qi} | {o['same_tokens']} |")
    if floor:
        out.append(f"| floor: `lm_empty`, no engine | {_f(floor['ttft_ms']['p50'], '.2f')} | | | | | "
                   f"{_f(floor['itl_ms']['mean'], '.3f')} | | | | | |")
    firsts = [(name, o["block_first_ttft_ms"]) for name, o in over.items() if o.get("block_first_ttft_ms")]
    if firsts:
        out += ["", "First request of each block, not counted above (TTFT p50 ms, served / in-process / in-process "
                "scheduler): " + "; ".join(
                    f"{name} {_f(b['served']['p50'], '.2f')} / {_f(b['in_process']['p50'], '.2f')} / "
                    f"{_f(b['in_process_scheduler']['p50'], '.2f')}" for name, b in firsts) + "."]
    return out + [""]


def _where(doc: dict) -> str:
    m = doc["machine"]
    where = f"{m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count', '?')} cores"
    return f"{m['gpu']['name']} + {where}" if m.get("gpu") else where


def _scheduler_section(folder: Path, doc: dict, docs: list[Doc]) -> str:
    """In-flight batching (lmopt.scheduler) vs static batching: same model, load and machine, both servers measured
    by the same tools in the same run (kind serving_scheduler_comparison)."""
    s = doc["settings"]
    out = [f"### In-flight vs static batching — {s['model']} on {_where(doc)}", "",
           f"Data: `{folder.as_posix()}/serving-*-{{inflight,static}}.json` and `serving-scheduler.json`, "
           f"{doc['created'][:10]}, command `{' '.join(doc['command'])}` (serve variant "
           f"`{doc.get('serve_variant', '?')}`). Static = the same repository with `batching: static` (Triton's "
           f"dynamic batcher groups requests, each group runs to completion); in-flight = requests join and leave "
           f"the running batch at every decode step. Streaming: `lm_stream`, prompt {s['prompt_tokens']} tokens, up "
           f"to {_new_tokens(s)} new; perf_analyzer: `lm`, non-streaming (the Python backend runs one `execute()` "
           f"per instance at a time, so `lm` requests that arrive during one wait in Triton's queue: in-flight "
           f"batching pays off for the streaming model).", "",
           "| concurrency | output tok/s in-flight | static | in-flight/static | TTFT p50 ms in-flight | static "
           "| TTFT p95 ms in-flight | static | req/s (perf_analyzer) in-flight | static |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["summary"]["rows"]:
        out.append(f"| {r['concurrency']:g} | {_f(r.get('stream_tok_s_on'))} | {_f(r.get('stream_tok_s_off'))} "
                   f"| {_f(r.get('stream_throughput_ratio'), '.2f')}x | {_f(r.get('stream_ttft_p50_ms_on'))} "
                   f"| {_f(r.get('stream_ttft_p50_ms_off'))} | {_f(r.get('stream_ttft_p95_ms_on'))} "
                   f"| {_f(r.get('stream_ttft_p95_ms_off'))} | {_f(r.get('pa_rps_on'))} | {_f(r.get('pa_rps_off'))} |")
    out.append("")
    out += _overhead_table(doc["summary"].get("overhead_c1") or {}, OVERHEAD_INTRO, doc["summary"].get("floor_c1"))
    return "\n".join(out)


def _ms3(st: dict) -> str:
    return f"{_f(st.get('p50'))} / {_f(st.get('p90'))} / {_f(st.get('p99'))}"


def explain_timeline(tl: dict, served: float | None, ceiling: float | None) -> str:
    """What stands between the served figure and the engine's ceiling, in the timeline's own numbers."""
    period, busy = tl["decode_step_period_ms"].get("p50"), tl.get("gpu_busy_share")
    parts = [f"At {tl['level']} streams the served engine ran {tl['decode_steps']} decode steps in "
             f"{tl['window_s']:.1f} s, one every {_f(period, '.2f')} ms (p50) with {_f(tl['decode_rows'].get('mean'))} "
             f"rows on average, and {tl['prefill_calls']} prefill calls."]
    if busy is not None:
        gpu = tl.get("gpu_decode_step_ms", {}).get("p50")
        parts.append(f"The GPU was busy {busy:.0%} of the window (decode {_f((tl.get('gpu_decode_share') or 0) * 100, '.0f')}%, "
                     f"prefill {_f((tl.get('gpu_prefill_share') or 0) * 100, '.0f')}%); a decode step takes "
                     f"{_f(gpu, '.2f')} ms of GPU time, and the GPU sat idle {_f(tl['gpu_idle_before_decode_ms'].get('p50'), '.2f')} "
                     f"ms (p50) before each step waiting for the host to queue it.")
        out = tl.get("host_outside_engine_per_step_ms", {}).get("p50")
        parts.append(f"Per step the scheduler's thread spent {_f(tl['host_in_decode_call_ms'].get('p50'), '.2f')} ms in "
                     f"the engine's decode call and {_f(out, '.2f')} ms outside it (its bookkeeping, handing tokens "
                     f"out, and waiting for the interpreter lock the sender thread holds); the sender spent "
                     f"{(tl.get('send_share') or 0):.0%} of the window in its passes ({tl['responses_sent']} responses).")
        if busy < 0.8:
            parts.append("The device waits for the host: what stands between this figure and the ceiling is host "
                         "time per step (Python on the engine loop and the sender competing for one interpreter), "
                         "not the engine.")
        else:
            parts.append("The device is busy nearly all the time: what is left is the steps themselves (prefills "
                         "between decode steps, rows padded to the captured batch bucket), not host time.")
    else:
        parts.append(f"No device times (a CPU run): the scheduler's thread spent {_f(tl['host_in_decode_call_ms'].get('p50'), '.2f')} "
                     f"ms per step in the engine's decode call; the sender {(tl.get('send_share') or 0):.0%} of the "
                     "window in its passes.")
    if served and ceiling:
        parts.append(f"Served {served:,.0f} tokens/s against a ceiling of {ceiling:,.0f} ({served / ceiling:.2f}x).")
    return " ".join(parts)


def _load_section(folder: Path, doc: dict) -> str:
    """The serving benchmark (kind serving_load_benchmark): every table from the one file."""
    s, sm = doc["settings"], doc["summary"]
    w, obj = sm["workload"], sm["objective"]
    out = [f"### Serving benchmark — {s['model']} on {_where(doc)}", "",
           f"Data: `{folder.as_posix()}/serving-load.json`, {doc['created'][:10]}, command `{' '.join(doc['command'])}` "
           f"(serve variant `{doc.get('serve_variant', '?')}`). Workload `{w['kind']}`: {w['requests']} requests, "
           f"input {_f(w['input_tokens']['mean'], '.0f')} tokens on average ({_f(w['input_tokens']['min'], '.0f')}–"
           f"{_f(w['input_tokens']['max'], '.0f')}), output {_f(w['output_tokens']['mean'], '.0f')} "
           f"({_f(w['output_tokens']['min'], '.0f')}–{_f(w['output_tokens']['max'], '.0f')})"
           f"{', fixed lengths (EOS ignored)' if w.get('ignore_eos') else ''}; Triton gRPC stream, `lm_stream`. "
           f"Objective: TTFT p99 ≤ {obj['ttft_p99_ms']:g} ms and ITL p99 ≤ {obj['itl_p99_ms']:g} ms (goodput = "
           "requests/s meeting it one by one). Closed loop = N streams, each sending its next request when one ends; "
           "open loop = Poisson arrivals at the rate. Ceiling = the engine alone for this workload at the level's "
           "measured occupancy (docs/serving_benchmark.md). ms:", "",
           "| load | done (failed) | output tok/s | req/s | TTFT p50 / p90 / p99 | ITL p50 / p90 / p99 "
           "| end-to-end p50 / p90 / p99 | occupancy | goodput req/s | objective | ceiling tok/s | served / ceiling |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in sm["sweep"]:
        load = f"{r['level']} streams" if r["mode"] == "concurrency" else f"{r['level']} req/s (open)"
        fail = f" ({r['failed']})" if r["failed"] else ""
        out.append(f"| {load} | {r['completed']}{fail} | {_f(r['output_tok_per_s'], ',.0f')} | {_f(r['requests_per_s'])} "
                   f"| {_ms3(r['ttft_ms'])} | {_ms3(r['itl_ms'])} | {_ms3(r['e2e_ms'])} "
                   f"| {_f(r['occupancy']['decoding'])} | {_f(r['goodput_rps'])} | {'met' if r['meets_objective'] else 'missed'} "
                   f"| {_f(r.get('ceiling_tok_per_s'), ',.0f')} | {_f(r.get('served_over_ceiling'), '.2f')} |")
    out.append("")
    g = sm.get("goodput") or {}
    out.append(f"Goodput: the highest open-loop rate meeting the objective is "
               f"{g['highest_rate_meeting_objective'] if g.get('highest_rate_meeting_objective') is not None else 'none of those measured'}"
               + (f" ({_f(g.get('requests_per_s'))} req/s, {_f(g.get('output_tok_per_s'), ',.0f')} tokens/s)"
                  if g.get("requests_per_s") else "")
               + f"; the highest closed-loop level meeting it: {g.get('highest_concurrency_meeting_objective') or 'none'}"
               " streams.")
    out.append("")
    c = sm.get("ceiling")
    if c:
        pre = ", ".join(f"{k} {v:.2f} ms" for k, v in c["prefill_ms_per_prompt"].items())
        out += [f"Engine ceiling, in-process, no server: prefill per prompt {pre} (the cheaper counts); decode step "
                + ", ".join(f"{v['decode_step_ms']:.3f} ms at {v['decode_rows']} rows" for v in c["levels"].values())
                + (" (fed on the device)" if c.get("fed_on_device") else "") + ".", ""]
    rows = [("in-process scheduler", r) for r in sm.get("in_process_scheduler") or []]
    if rows:
        out += ["Where the loss is, same request stream (tokens/s; TTFT p50 ms):", "",
                "| streams | engine ceiling | in-process scheduler | served (Triton) | served / in-process "
                "| served / ceiling | TTFT p50 in-process | served |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        served = {r["level"]: r for r in sm["sweep"] if r["mode"] == "concurrency"}
        for _, r in rows:
            sv = served.get(r["level"], {})
            out.append(f"| {r['level']} | {_f(sv.get('ceiling_tok_per_s'), ',.0f')} | {_f(r['output_tok_per_s'], ',.0f')} "
                       f"| {_f(sv.get('output_tok_per_s'), ',.0f')} | {_f(r.get('served_over_in_process'), '.2f')} "
                       f"| {_f(sv.get('served_over_ceiling'), '.2f')} | {_f(r['ttft_ms']['p50'])} "
                       f"| {_f((sv.get('ttft_ms') or {}).get('p50'))} |")
        out.append("")
    ep = sm.get("endpoint") or {}
    for lvl, e in ep.items():
        out += [f"OpenAI endpoint vs Triton's gRPC stream at {lvl} streams (same server, alternating): "
                f"{_f(e['openai_tok_per_s'], ',.0f')} vs {_f(e['grpc_tok_per_s'], ',.0f')} tokens/s "
                f"({_f(e['ratio'], '.2f')}x); TTFT p50 {_f(e['openai_ttft_p50_ms'])} vs {_f(e['grpc_ttft_p50_ms'])} ms.", ""]
    fl = sm.get("floor") or []
    if fl:
        out += ["Triton's own ceiling: `lm_empty` (no engine; each request streams its output length in one-token "
                "responses at once) on the same server:", "",
                "| streams | responses/s | tokens/s | req/s | TTFT p50 ms | failed |", "|---:|---:|---:|---:|---:|---:|"]
        for r in fl:
            rps = r["token_responses"] / r["wall_s"] if r["wall_s"] else None
            out.append(f"| {r['level']} | {_f(rps, ',.0f')} | {_f(r['output_tok_per_s'], ',.0f')} "
                       f"| {_f(r['requests_per_s'])} | {_f(r['ttft_ms']['p50'])} | {r['failed']} |")
        out.append("")
    o = sm.get("overhead_c1")
    if o:
        out += _overhead_table({"in-flight": o}, OVERHEAD_INTRO)
    tl = sm.get("timeline")
    if tl:
        r64 = next((r for r in sm["sweep"] if r["mode"] == "concurrency" and r["level"] == tl["level"]), {})
        out += [f"**Per-step timeline** of the served engine at {tl['level']} streams (`{Path(tl['result']).name}`): "
                + explain_timeline(tl, r64.get("output_tok_per_s"), r64.get("ceiling_tok_per_s")), ""]
    t = sm.get("targets") or []
    if t:
        out += ["| target | measured | bar | |", "|---|---:|---:|---|"]
        for x in t:
            v = x["value"]
            val = "–" if v is None else f"{v:,.3g}" if isinstance(v, float) else str(v)
            verdict = {True: "met", False: "**missed**", None: "not measured"}[x["met"]] if x["bar"] is not None else ""
            out.append(f"| {x['target']} | {val} | {'' if x['bar'] is None else x['bar']} | {verdict} |")
        out.append("")
    return "\n".join(out)


def render(results_dir) -> str:
    """Markdown for the README's serving section (no markers) from the serving comparisons under results_dir: dynamic
    batching on vs off, and in-flight vs static batching."""
    docs = collect(results_dir, kinds=["serving_batching_comparison", "serving_scheduler_comparison",
                                       "streaming_load", "perf_analyzer", "serving_load_benchmark"])
    found = [d for d in docs if d.kind == "serving_batching_comparison"]
    inflight = [d for d in docs if d.kind == "serving_scheduler_comparison"]
    loads = [d for d in docs if d.kind == "serving_load_benchmark"]
    if not found and not loads:
        return ("No serving results committed yet — run `make serve-bench` then `make serve-bench-publish` "
                "(writes results/<machine>/<model>/serving-*.json).")
    head = ("Served through the real Triton Inference Server 2.51 (Python backend running the pipeline's engine), "
            "measured by `profile/serve_bench.py` (`make serve-bench`) with Triton's perf_analyzer and our asyncio "
            "gRPC streaming load generator (`profile/load_generator.py`). TTFT = time to first token, ITL = time "
            "between tokens.\n")
    return "\n".join([head] + [_load_section(d.path.parent, d.data) for d in loads]
                     + [_scheduler_section(d.path.parent, d.data, docs) for d in inflight]
                     + [_section(d.path.parent, d.data, docs) for d in found]).rstrip() + "\n"
