"""The "scale-out" section of results/README.md, rendered from committed result files: the fault test (kind
"fault-test", profile/fault_test.py): two Triton replicas behind HAProxy, one killed under streaming load.
"""
from __future__ import annotations

import re
from pathlib import Path

from lmopt.report import collect
from lmopt.report.openai import _source, _where


def _fault(d, root: Path) -> list[str]:
    doc, s, sm = d.data, d.data["settings"], d.data["summary"]
    # the replica each failed request had been sent to (HAProxy's log; "?" = not in it), from the samples
    where = [r.get("replica") for r in doc["samples"]["in_flight_at_kill_or_failed"] if r["status"] != "completed"]
    dead = sm["killed_replica"]
    split = (f"{sum(w == dead for w in where)} / {sum(w not in (dead, '?', None) for w in where)} / "
             f"{sum(w == '?' for w in where)}") if all(where) else "–"
    out_s = sm["taken_out_after_s"]
    fl = sm["failure_latency_s"]
    balancer = re.sub(r"^HAProxy version (\S+).*", r"HAProxy \1", doc.get("balancer", "HAProxy"))
    return [f"**Fault test** ({s['model']} on {_where(doc)}, balancer {balancer}): two replicas, "
            f"{s['clients']} streaming clients for {s['duration']:g} s ({s['max_new_tokens']} tokens per request, one "
            f"gRPC stream per request), replica `{sm['killed_replica']}` SIGKILLed at {sm['kill_at_s']:.1f} s; health "
            f"check every {s['check_ms']} ms, out after {s['fall']} failures. " + _source(d, root), "",
            "| requests | completed | failed | hung | failed: sent to the killed replica / to the survivor "
            "| in flight at the kill (sent before, ended after) | failed of those | sent after the kill "
            "| completed of those | served after the kill (HAProxy log) | dead replica out of HTTP / gRPC after |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
            f"| {sm['requests']} | {sm['completed']} | {sm['failed']} | {sm['hung']} "
            f"| {split} "
            f"| {sm['in_flight_at_kill']} "
            f"| {sm['failed_in_flight_at_kill']} | {sm['sent_after_kill']} | {sm['completed_after_kill']} "
            f"| {', '.join(f'{k}: {v}' for k, v in sorted(sm['after_kill_served_by'].items()))} "
            f"| {out_s.get('triton_http', float('nan')):.2f} s / {out_s.get('triton_grpc', float('nan')):.2f} s |", "",
            "Errors the failed requests got"
            + (f" (within {fl['max'] * 1e3:.0f} ms of the kill)" if fl.get("max") is not None else "") + ": "
            + ("; ".join(f"`{e}`" for e in sm["errors"]) or "none") + ". A request in flight on the killed replica "
            "whose last response had already left it completes; one still generating there fails, and so does one "
            f"sent to it in the moment after the SIGKILL, before its connections were reset "
            f"({sm.get('sent_after_kill_to_killed_replica', sm['after_kill_served_by'].get(sm['killed_replica'], 0))} "
            "here): HAProxy retries only a refused connection, not a gRPC "
            "stream already forwarded. Not in the balancer's log: most likely a stream HAProxy refused itself (HTTP/2 "
            "REFUSED_STREAM, gRPC UNAVAILABLE) as the replica's connection went down.", ""]


def render(results_dir: Path) -> str:
    root = Path(results_dir)
    out = []
    for d in collect(root, ("fault-test",)):
        out += _fault(d, root)
    return "\n".join(out).rstrip() + "\n" if out else "No fault test committed yet.\n"
