"""Fault test: two Triton replicas behind HAProxy (serve/run_replicas.sh), a streaming load through the balancer,
one replica killed (SIGKILL of its whole process group) at a random moment.

    python profile/fault_test.py --model tiny --duration 60 --out results/<machine>/tiny/fault-test.json

Each client opens one gRPC stream per request (a stream is pinned to the replica it was sent to) and asks for
--max-new-tokens tokens; a request is `completed` (final response), `failed` (an error, recorded with its message) or
`hung` (no response for --timeout s: must never happen). Counts: before and after the kill; failures that were in
flight at the kill; which replica each request (and each failure) had been sent to, from HAProxy's log (the client
sends an x-request-id header the balancer logs); requests sent after the kill; and the time from
the kill until HAProxy's health check (GET /v2/health/ready every CHECK_MS) had taken the dead replica out of both
backends (its stats page, polled every 20 ms).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import csv
import io
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from lmopt import cli
from lmopt import results as R
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging
from lmopt.paths import model_slug
from lmopt.serving import free_ports

log = get_logger("fault-test")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FaultSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    duration: float = 60.0           # seconds of load
    clients: int = 8                 # concurrent streaming clients
    max_new_tokens: int = 32         # tokens asked per request
    kill_window: str = "0.3,0.7"     # the kill lands at a random moment in this fraction of --duration
    seed: int = 0                    # of the kill moment (0 = from the clock)
    timeout: float = 30.0            # a request with no response for this long counts as hung
    check_ms: int = 500              # HAProxy health-check interval
    fall: int = 2                    # failed checks before HAProxy takes a replica out
    out: str = ""                    # result JSON (default <artifacts>/<model>/profile/fault-test/fault-test.json)


def _stats(port: int) -> dict[tuple[str, str], str]:
    """(backend, server) -> status from HAProxy's CSV stats."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=2) as r:
        text = r.read().decode().lstrip("# ")
    return {(row["pxname"], row["svname"]): row["status"] for row in csv.DictReader(io.StringIO(text))}


_LOG = re.compile(r"\[(\d+/\w+/\d+:\d+:\d+:\d+\.\d+)\] grpc_in triton_grpc/(\S+) .*?\{([^}]*)\}")


def _served_by(haproxy_log: Path) -> list[tuple[float, str, str]]:
    """(accept time as epoch seconds, server name, x-request-id) of every gRPC request in HAProxy's log."""
    out = []
    for m in _LOG.finditer(haproxy_log.read_text(errors="replace")):
        t = datetime.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S.%f").astimezone().timestamp()
        out.append((t, m.group(2), m.group(3)))
    return out


class Load:
    """--clients threads, each sending one streaming request after another through the balancer."""

    def __init__(self, s: FaultSettings, grpc_url: str):
        self.s, self.url, self.records, self.lock = s, grpc_url, [], threading.Lock()
        self.stop = threading.Event()

    def _one(self, i: int, n: int) -> dict:
        from lmopt.triton_client import GenRequest, GrpcStream

        rec = {"client": i, "id": f"c{i}-{n}", "start": time.time(), "tokens": 0}
        try:
            with GrpcStream(self.url, timeout=self.s.timeout, headers={"x-request-id": rec["id"]}) as st:
                req = GenRequest(prompt=f"client {i} request {n}: once upon a time", max_tokens=self.s.max_new_tokens,
                                 temperature=0.0)
                for piece in st.generate(req, request_id=f"c{i}-{n}"):
                    rec["tokens"] += len(piece.token_ids)
            rec["status"] = "completed"
        except TimeoutError as e:
            rec["status"], rec["error"] = "hung", str(e)
        except Exception as e:  # RuntimeError from the stream, or the client library's own
            rec["status"], rec["error"] = "failed", (str(e).splitlines() or [type(e).__name__])[0][:300]
        rec["end"] = time.time()
        return rec

    def _client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            rec = self._one(i, n)
            n += 1
            with self.lock:
                self.records.append(rec)

    def run(self) -> list[threading.Thread]:
        ts = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.s.clients)]
        for t in ts:
            t.start()
        return ts


def run(s: FaultSettings) -> dict:
    lo, hi = (float(x) for x in s.kill_window.split(","))
    if not 0 < lo < hi < 1:
        raise UserError(f"--kill-window '{s.kill_window}' must be two fractions 0 < a < b < 1, like 0.3,0.7")
    if s.clients < 1 or s.duration <= 0:
        raise UserError("--clients must be >= 1 and --duration > 0")
    if not shutil_which("haproxy"):
        raise UserError("haproxy is not installed — run: make setup-haproxy")
    rng = random.Random(s.seed or time.time_ns())
    kill_at = rng.uniform(lo, hi) * s.duration
    http, grpc, stats = free_ports(3)
    env = dict(os.environ, REPLICAS="2", HTTP_PORT=str(http), GRPC_PORT=str(grpc), STATS_PORT=str(stats),
               OPENAI_PORT="0", CHECK_MS=str(s.check_ms), FALL=str(s.fall),
               PYTHON=os.environ.get("PYTHON", __import__("sys").executable))
    script = ["bash", str(ROOT / "serve" / "run_replicas.sh")]
    art = str(Path(s.artifacts).resolve())
    run_dir = Path(art) / model_slug(s.model) / "serve" / "run-replicas"
    proc = subprocess.run(script + ["start", s.model, art], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")] or proc.stderr.splitlines()
        raise UserError(f"the replicas did not start: {(errs or ['?'])[-1].removeprefix('error: ')}")
    try:
        victim = rng.randrange(2)
        pgid = int((run_dir / f"replica-{victim}.pid").read_text())
        load = Load(s, f"127.0.0.1:{grpc}")
        t0 = time.time()
        threads = load.run()
        time.sleep(kill_at)
        t_kill = time.time()
        os.killpg(pgid, signal.SIGKILL)
        log.info("killed replica %d (process group %d) at %.1f s", victim, pgid, t_kill - t0)
        out_at: dict[str, float] = {}
        while time.time() - t_kill < 30 and len(out_at) < 2:
            for (px, sv), status in _stats(stats).items():
                if sv == f"r{victim}" and px not in out_at and not status.startswith("UP"):
                    out_at[px] = time.time() - t_kill
            time.sleep(0.02)
        time.sleep(max(0.0, t0 + s.duration - time.time()))
        load.stop.set()
        for t in threads:
            t.join(s.timeout + 10)
        hanging = sum(t.is_alive() for t in threads)
        served = _served_by(run_dir / "haproxy.log")
    finally:
        subprocess.run(script + ["stop", s.model, art], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    recs = sorted(load.records, key=lambda r: r["start"])
    before = [r for r in recs if r["start"] < t_kill]
    after = [r for r in recs if r["start"] >= t_kill]
    failed = [r for r in recs if r["status"] != "completed"]
    in_flight_failed = [r for r in failed if r["start"] < t_kill <= r["end"]]
    after_by: dict[str, int] = {}
    after_completed_by: dict[str, int] = {}
    server_of = {rid: sv for _, sv, rid in served}
    for r in recs:
        r["replica"] = server_of.get(r["id"], "?")
        if r["start"] >= t_kill:
            after_by[r["replica"]] = after_by.get(r["replica"], 0) + 1
            if r["status"] == "completed":
                after_completed_by[r["replica"]] = after_completed_by.get(r["replica"], 0) + 1
    dead = f"r{victim}"
    summary = {
        "requests": len(recs),
        "completed": sum(r["status"] == "completed" for r in recs),
        "failed": sum(r["status"] == "failed" for r in recs),
        "hung": sum(r["status"] == "hung" for r in recs) + hanging,
        "failed_in_flight_at_kill": len(in_flight_failed),
        "failed_other": len(failed) - len(in_flight_failed),
        # HAProxy's log (x-request-id): which replica each failed request had been sent to
        "failed_on_killed_replica": sum(r["replica"] == dead for r in failed),
        "failed_on_survivor": sum(r["replica"] not in (dead, "?") for r in failed),
        # not in HAProxy's log: a stream HAProxy refused itself (HTTP/2 REFUSED_STREAM) as the replica died
        "failed_not_in_balancer_log": sum(r["replica"] == "?" for r in failed),
        "sent_after_kill_to_killed_replica": sum(r["replica"] == dead for r in after),
        "in_flight_at_kill": sum(r["start"] < t_kill <= r["end"] for r in recs),
        "completed_before_kill": sum(r["status"] == "completed" for r in before),
        "sent_after_kill": len(after),
        "completed_after_kill": sum(r["status"] == "completed" for r in after),
        "after_kill_served_by": after_by,          # HAProxy's log: replica -> requests the clients sent after the kill
        "after_kill_completed_by": after_completed_by,     # the same, only those that completed
        "killed_replica": f"r{victim}",
        "kill_at_s": round(t_kill - t0, 3),
        "taken_out_after_s": {k: round(v, 3) for k, v in out_at.items()},
        "failure_latency_s": R.stats([r["end"] - t_kill for r in failed], digits=3),
        "errors": sorted({r["error"] for r in failed}),
        "request_latency_s": R.stats([r["end"] - r["start"] for r in recs if r["status"] == "completed"], digits=3),
    }
    # samples: every request in flight at the kill or not completed, and requests ended per second (a small file)
    rel = [{k: (round(v - t0, 3) if k in ("start", "end") else v) for k, v in r.items()} for r in recs
           if r["start"] < t_kill <= r["end"] or r["status"] != "completed"]
    per_s: dict[int, dict] = {}
    for r in recs:
        row = per_s.setdefault(int(r["end"] - t0), {"completed": 0, "failed": 0, "hung": 0})
        row[r["status"]] += 1
    samples = {"in_flight_at_kill_or_failed": rel,
               "ended_per_second": [{"second": k, **v} for k, v in sorted(per_s.items())]}
    doc = R.envelope("fault-test", settings=asdict(s), summary=summary, samples=samples,
                     versions=R.versions("tritonclient", "nvidia-pytriton"),
                     balancer=subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0])
    out = Path(s.out or Path(s.artifacts) / model_slug(s.model) / "profile" / "fault-test" / "fault-test.json")
    R.write_json(out, doc)
    log.info("%s", {k: summary[k] for k in ("completed", "failed", "hung", "failed_in_flight_at_kill",
                                             "sent_after_kill", "completed_after_kill", "after_kill_served_by",
                                             "taken_out_after_s")})
    log.info("wrote %s", out)
    return doc


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, FaultSettings)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    run(cli.settings_from(FaultSettings, args))
    return 0


if __name__ == "__main__":
    cli.run(main)
