"""The "openai-endpoint" section of results/README.md, rendered from committed result files: the endpoint's
overhead at one stream (kind "openai-overhead", profile/openai_overhead.py) and aiperf beside our load generator (kind "aiperf-compare",
profile/aiperf_compare.py). Every table names the machine, date and command of its data.
"""
from __future__ import annotations

from pathlib import Path

from lmopt.report import collect


def _f(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.0%}"


def _where(doc: dict) -> str:
    m = doc["machine"]
    where = f"{m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count', '?')} cores"
    # the server ran on this machine's GPU whenever it has one (the endpoint tools themselves have no device)
    return f"{m['gpu']['name']} + {where}" if m.get("gpu") else where


def _source(d, root: Path) -> str:
    doc = d.data
    try:
        rel = d.path.relative_to(root.parent) if root.name == "results" else d.path
    except ValueError:
        rel = d.path
    load = doc.get("loadavg_after") or doc.get("loadavg")
    return (f"Data: `{Path(rel).as_posix()}`, {doc['created'][:10]}, command `{' '.join(doc['command'])}`"
            + (f"; load average {load[0]:.1f} at the end (a shared machine)" if load else "") + ".")


# the measuring script's paths with the minimal clients (not other endpoints): the endpoint through a bare asyncio
# HTTP client, Triton's stream through its gRPC stub with hand-built protobufs
_LEAN = {"openai-raw": "OpenAI endpoint, minimal HTTP client", "direct-lean": "Triton gRPC stream, minimal gRPC client"}


def _overhead(d, root: Path) -> list[str]:
    doc, s, sm = d.data, d.data["settings"], d.data["summary"]
    setup = sm["direct"].get("setup_ms")
    out = [f"**Endpoint overhead at one stream** ({s['model']} on {_where(doc)}): the same server, the same prompts "
           f"({s['prompt_tokens']} tokens), {s['max_new_tokens']} greedy tokens, {s['requests']} requests per path "
           "interleaved, through the endpoint (HTTP + SSE; client aiohttp) and through Triton's gRPC stream directly "
           "(client tritonclient); ms"
           + (f"; each clock starts when its client has the prompt's text (the direct client's tokenizing and request "
              f"tensors are inside its TTFT: {setup['p50']:.2f} ms p50, as the endpoint's are inside the endpoint's)"
              if setup else "") + ". " + _source(d, root), "",
           "| path | TTFT p50 | TTFT p90 | ITL p50 | ITL mean | end-to-end p50 |", "|---|---:|---:|---:|---:|---:|"]
    # endpoints measured in the same loop (--compare-url: e.g. the gateway before a change), each with its overhead
    cmp = sm.get("compare", {})
    others = {k: v for k, v in cmp.items() if k not in _LEAN}
    if others:
        out[0] += (" Also in the same loop, on the same Triton server: " + "; ".join(
            f"**{k}** (`{v['url']}`; TTFT endpoint − this, paired: "
            f"{_f(v.get('paired_ttft_endpoint_minus_this_ms_p50'), '+.2f')} ms)" for k, v in others.items()) + ".")
    lean = [k for k in _LEAN if k in cmp]
    if lean:
        what = {"openai-raw": "the endpoint through HTTP/1.1 on bare asyncio streams",
                "direct-lean": "Triton's stream through its gRPC stub with the request protobuf built and the "
                               "responses read by hand"}
        out[0] += (f" The same loop also ran {'the minimal clients' if len(lean) > 1 else 'a minimal client'} "
                   f"(rows in italics): {'; '.join(what[k] for k in lean)} — less of the time is the clients' own.")
    for name, label, x in (("direct", "Triton gRPC stream", sm["direct"]), ("openai", "OpenAI endpoint", sm["openai"]),
                           *((k, f"*{_LEAN[k]}*" if k in _LEAN else k, v) for k, v in cmp.items())):
        out.append(f"| {label} | {_f(x['ttft_ms']['p50'], '.2f')} | {_f(x['ttft_ms']['p90'], '.2f')} "
                   f"| {_f(x['itl_ms']['p50'], '.3f')} | {_f(x['itl_ms']['mean'], '.3f')} | {_f(x['e2e_ms']['p50'])} |")
    rows = [("endpoint − direct", sm), *((f"{k} − direct", v) for k, v in cmp.items())]
    if "minimal_clients" in sm:
        raw, lean = sm["minimal_clients"]["paths"]
        rows.append((f"endpoint − direct, minimal clients ({raw} − {lean})", sm["minimal_clients"]))
    for label, x in rows:
        oh, om = x["overhead_ms"], x["overhead_mean_ms"]
        e2e = f"{oh['e2e_ms']:+.1f}" if "e2e_ms" in oh else "–"
        out.append(f"| **{label}** | {oh['ttft_ms']:+.2f} (paired {x['paired_ttft_delta_ms_p50']:+.2f}) | "
                   f"| {oh['itl_ms']:+.3f} | {om['itl_ms']:+.3f} | {e2e} |")
    out.append("")
    return out


def _compare(d, root: Path) -> list[str]:
    doc, s = d.data, d.data["settings"]
    version = doc["versions"].get("aiperf")
    out = [f"**aiperf{' ' + version if version else ''} and our load generator** ({s['model']} on {_where(doc)}): "
           f"prompt {s['prompt_tokens']} tokens, {s['max_new_tokens']} greedy tokens, ≥{s['requests']} requests per "
           "level and tool, one tool after the other on the same server. aiperf and our endpoint client go through the "
           "OpenAI endpoint, the load generator straight to Triton's gRPC stream. ITL per request "
           "((latency − TTFT) / (tokens − 1), aiperf's definition), medians in ms; difference = aiperf vs load "
           f"generator (bar ±{s['tolerance']:.0%}). " + _source(d, root), "",
           "| concurrency | aiperf TTFT | ITL | tok/s | load gen. TTFT | ITL | tok/s | endpoint client TTFT | ITL | "
           "tok/s | Δ TTFT | Δ ITL |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["summary"]:
        a, o, e, df = r["aiperf"], r["load_generator"], r["endpoint_client"], r["relative_difference"]
        out.append(f"| {r['concurrency']} | {_f(a['ttft_ms']['p50'])} | {_f(a['itl_ms']['p50'], '.2f')} "
                   f"| {_f(a['output_tok_per_s'], '.0f')} | {_f(o['ttft_ms']['p50'])} "
                   f"| {_f(o['itl_per_request_ms']['p50'], '.2f')} | {_f(o['output_tok_per_s'], '.0f')} "
                   f"| {_f(e['ttft_ms']['p50'])} | {_f(e['itl_per_request_ms']['p50'], '.2f')} "
                   f"| {_f(e['output_tok_per_s'], '.0f')} | {_pct(df['ttft_p50'])} | {_pct(df['itl_p50'])} |")
    out.append("")
    return out


def render(results_dir: Path) -> str:
    root = Path(results_dir)
    out = []
    for d in collect(root, ("openai-overhead", "aiperf-compare")):
        out += _overhead(d, root) if d.kind == "openai-overhead" else _compare(d, root)
    return "\n".join(out).rstrip() + "\n" if out else "No endpoint measurements committed yet.\n"
