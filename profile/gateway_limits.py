"""The OpenAI gateway's request limits, measured: a body over its --max-body-bytes is refused at once, and a long
prompt is tokenized off the event loop, so `/health` (and every other request) is answered meanwhile.

    make serve-openai                                      # Triton + gateway (or start them yourself)
    python profile/gateway_limits.py --openai-url http://127.0.0.1:8080
    python profile/gateway_limits.py --repeats 10 --publish     # also copy the result under results/<machine>/

Per repeat, on fresh connections (raw sockets and http.client: little client between the clock and the server):
  idle        GET /health alone.
  oversized   POST /v1/completions with a --big-bytes body (5 MB, Content-Length declared), uploaded from a thread:
              the time from the first byte sent to the 413 read; a GET /health sent once the upload has begun, its
              time to the answer.
  chunked     the same body without Content-Length (chunked): the gateway counts the bytes as they come.
  long        a prompt of English text in a --long-bytes body (under the gateway's limit), which the gateway parses
              and tokenizes; GET /health sent again and again on another connection until the POST is answered: each
              one's time (the longest is what a long prompt can stall the gateway).
  control     GET /health again and again for as long as the long POST took, with nothing else sent: on a loaded
              machine the longest of these is what the machine alone stalls the gateway (or the client).
The API key, when the gateway wants one, comes from --api-key or $LMOPT_API_KEY (sent as a bearer token).
In-process, with --model's tokenizer (what the gateway's 2 KB threshold rests on): ms to encode texts of growing
length as the gateway does (lmopt.models.encode) and with the single call that holds the GIL, each after a 10 ms
sleep (a request at one stream finds the code cold), and the round trip of a call to a worker thread.

Reads:  the gateway (GET /v1/models for the served model's name); data/eval.txt (the long prompt's text)
Writes: artifacts/<model>/profile/gateway-limits.json; with --publish also results/<machine-tag>/<model>/
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import http.client
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lmopt import cli, results
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("gateway-limits")


@dataclass
class LimitsSettings:
    model: str = "tiny"                       # the output folder, and the tokenizer timed in-process
    artifacts: str = "artifacts"
    openai_url: str = "http://127.0.0.1:8080"  # the endpoint's base URL (without /v1)
    api_key: str = ""                         # bearer token for a gateway started with one (default: $LMOPT_API_KEY)
    repeats: int = 5                          # measured repeats of each case
    big_bytes: int = 5_000_000                # the oversized body
    long_bytes: int = 1_000_000               # the long prompt's body (under the gateway's default 1 MiB limit)
    tokenizer_repeats: int = 15               # in-process encode timings per text length (0: none)
    label: str = ""                           # what gateway this is (e.g. "before": an older build), kept in the result
    out: str = ""
    publish: bool = False                     # also copy the result to results/<machine-tag>/<model>/


class Gateway:
    def __init__(self, url: str, api_key: str):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise UserError(f"--openai-url {url} is not an http://host:port URL — e.g. http://127.0.0.1:8080")
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(self, path: str) -> tuple[int, bytes, float]:
        """(status, body, seconds) of one GET on a new connection."""
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            c.request("GET", path, headers=self.headers)
            r = c.getresponse()
            body = r.read()
            return r.status, body, time.perf_counter() - t0
        finally:
            c.close()

    def post(self, path: str, body: bytes, chunked: bool = False, meanwhile=None) -> tuple[int, bytes, float]:
        """(status, response body, seconds from the first byte sent to the response read) of one POST whose body is
        uploaded from a thread while the response is awaited; `meanwhile()` runs in another thread once the upload
        has begun."""
        s = socket.create_connection((self.host, self.port), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{extra}{size}"
                "\r\n\r\n").encode()

        def upload():
            try:
                if not chunked:
                    s.sendall(body)
                    return
                for i in range(0, len(body), 1 << 16):
                    piece = body[i:i + (1 << 16)]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass   # the server answered and closed before the whole body was sent

        threads = [threading.Thread(target=upload, daemon=True)]
        if meanwhile is not None:
            threads.append(threading.Thread(target=meanwhile, daemon=True))
        t0 = time.perf_counter()
        try:
            s.sendall(head)
            for t in threads:
                t.start()
            status, resp = _read_response(s.makefile("rb"))
            dt = time.perf_counter() - t0
        finally:
            for t in threads:
                t.join(120)
            s.close()
        return status, resp, dt


def _polls(per_repeat: list[dict]) -> dict:
    """Over the repeats: the statistics of each repeat's /health p50 and longest, and the number of polls."""
    return {"polls": sum(x["count"] for x in per_repeat),
            "health_p50_ms": results.stats(x["p50"] for x in per_repeat if x["count"]),
            "health_longest_ms": results.stats(x["max"] for x in per_repeat if x["count"])}


def _read_response(f) -> tuple[int, bytes]:
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    return status, f.read(length)


def tokenizer_costs(model: str, sizes=(256, 1024, 2048, 4096, 16384), n: int = 15) -> dict:
    """ms (p50 of n, each after a 10 ms sleep) to encode data/eval.txt text of each size: `encode` (the gateway's
    call) and `encode_gil` (the single Rust call, GIL held throughout); `worker_hop_ms`: a no-op sent to a thread pool
    from an event loop and awaited, cold."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from lmopt.models import encode, load_tokenizer
    from lmopt.paths import REPO_ROOT

    tok = load_tokenizer(model)
    text = (REPO_ROOT / "data" / "eval.txt").read_text() * 2

    def cold(fn) -> float:
        xs = []
        for _ in range(n):
            time.sleep(0.01)
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return results.stats(xs, scale=1e3)["p50"]

    rows = [{"chars": k, "tokens": len(encode(tok, text[:k])), "encode_ms": cold(lambda: encode(tok, text[:k])),
             "encode_gil_ms": cold(lambda: tok.backend_tokenizer.encode(text[:k]).ids)} for k in sizes]

    async def hops():
        loop, pool, xs = asyncio.get_running_loop(), ThreadPoolExecutor(2), []
        for _ in range(n * 3):
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await loop.run_in_executor(pool, int)
            xs.append(time.perf_counter() - t0)
        pool.shutdown()
        return results.stats(xs, scale=1e3)

    return {"model": model, "sizes": rows, "worker_hop_ms": asyncio.run(hops())}


def measure(*, settings: LimitsSettings) -> dict:
    from lmopt.paths import REPO_ROOT, model_slug

    s = settings
    if s.repeats < 1 or s.big_bytes < 1 or s.long_bytes < 1 or s.tokenizer_repeats < 0:
        raise UserError("--repeats, --big-bytes and --long-bytes must be >= 1, --tokenizer-repeats >= 0")
    gw = Gateway(s.openai_url, s.api_key or os.environ.get("LMOPT_API_KEY", ""))
    try:
        status, body, _ = gw.get("/v1/models")
    except OSError as e:
        raise UserError(f"no gateway at {s.openai_url} ({e}) — start one: make serve-openai") from None
    if status != 200:
        raise UserError(f"GET /v1/models answered {status}: {body[:200]!r} — a gateway with an API key wants "
                        "--api-key or $LMOPT_API_KEY")
    served = json.loads(body)["data"][0]["id"]
    big = json.dumps({"model": served, "prompt": "x" * s.big_bytes, "max_tokens": 1}).encode()
    text = (REPO_ROOT / "data" / "eval.txt").read_text()
    words = (text * (s.long_bytes // len(text) + 2))[:s.long_bytes]
    while len(long := json.dumps({"model": served, "prompt": words, "max_tokens": 1}).encode()) > s.long_bytes:
        words = words[:len(words) - (len(long) - s.long_bytes) - 1]   # JSON escapes made it longer than the text

    rows = []
    for i in range(s.repeats):
        row = {"idle_health_ms": gw.get("/health")[2] * 1e3}
        for case, body, chunked in (("oversized", big, False), ("chunked", big, True)):
            health = {}
            st, resp, dt = gw.post("/v1/completions", body, chunked,
                                   meanwhile=lambda h=health: h.update(zip(("status", "_", "s"), gw.get("/health"))))
            row[case] = {"status": st, "ms": dt * 1e3, "health_status": health["status"],
                         "health_ms": health["s"] * 1e3,
                         "error_code": json.loads(resp).get("error", {}).get("code") if resp else None}
        polls, done = [], threading.Event()

        def poll():
            while not done.is_set():
                polls.append(gw.get("/health")[2] * 1e3)

        def long_post():
            out.update(zip(("status", "resp", "s"), gw.post("/v1/completions", long)))
            done.set()

        out: dict = {}
        poller, poster = threading.Thread(target=poll), threading.Thread(target=long_post)
        poster.start()
        poller.start()
        poster.join(300)
        done.set()
        poller.join(60)
        row["long"] = {"status": out["status"], "ms": out["s"] * 1e3, "health_ms": results.stats(polls),
                       "error_code": json.loads(out["resp"]).get("error", {}).get("code") if out["resp"] else None}
        control, until = [], time.perf_counter() + out["s"]
        while time.perf_counter() < until:
            control.append(gw.get("/health")[2] * 1e3)
        row["control"] = {"health_ms": results.stats(control)}   # thousands of polls: their statistics, not each
        rows.append(row)
        log.info("repeat %d: 413 in %.1f ms (health %.1f ms), chunked 413 in %.1f ms, long prompt %.0f ms (%d health "
                 "polls, longest %.1f ms; control: longest %.1f ms)", i + 1, row["oversized"]["ms"],
                 row["oversized"]["health_ms"], row["chunked"]["ms"], row["long"]["ms"], len(polls),
                 max(polls, default=0), max(control, default=0))

    summary = {
        "idle_health_ms": results.stats(r["idle_health_ms"] for r in rows),
        **{case: {"statuses": sorted({r[case]["status"] for r in rows}),
                  "ms": results.stats(r[case]["ms"] for r in rows),
                  "health_ms": results.stats(r[case]["health_ms"] for r in rows)} for case in ("oversized", "chunked")},
        "long": {"statuses": sorted({r["long"]["status"] for r in rows}), "body_bytes": len(long),
                 "ms": results.stats(r["long"]["ms"] for r in rows),
                 **_polls([r["long"]["health_ms"] for r in rows])},
        "control": _polls([r["control"]["health_ms"] for r in rows]),
    }
    if s.tokenizer_repeats:
        summary["tokenizer"] = tokenizer_costs(s.model, n=s.tokenizer_repeats)
    path = Path(s.out) if s.out else REPO_ROOT / s.artifacts / model_slug(s.model) / "profile" / "gateway-limits.json"
    doc = results.envelope("gateway-limits", settings={**asdict(s), "api_key": bool(s.api_key)}, summary=summary,
                           label=s.label or None,
                           samples=rows, served_model=served, big_body_bytes=len(big),
                           versions=results.versions("starlette", "uvicorn", "uvloop", "httptools", "tokenizers"),
                           loadavg=[round(x, 2) for x in os.getloadavg()])
    results.save_result(path, doc, log, publish_model=s.model if s.publish else None)
    o, c, lg = summary["oversized"], summary["chunked"], summary["long"]
    print(f"idle /health p50 {summary['idle_health_ms']['p50']:.1f} ms ({s.repeats} repeats)")
    print(f"{len(big) / 1e6:.1f} MB body: {o['statuses']} in p50 {o['ms']['p50']:.1f} ms (max {o['ms']['max']:.1f}); "
          f"/health meanwhile p50 {o['health_ms']['p50']:.1f} ms (max {o['health_ms']['max']:.1f})")
    print(f"  chunked: {c['statuses']} in p50 {c['ms']['p50']:.1f} ms; /health meanwhile p50 "
          f"{c['health_ms']['p50']:.1f} ms (max {c['health_ms']['max']:.1f})")
    for r in summary.get("tokenizer", {}).get("sizes", []):
        print(f"encode {r['chars']:>6} chars ({r['tokens']} tokens): {r['encode_ms']:.2f} ms "
              f"(GIL held throughout: {r['encode_gil_ms']:.2f} ms)")
    if "tokenizer" in summary:
        print(f"worker thread round trip p50 {summary['tokenizer']['worker_hop_ms']['p50']:.3f} ms")
    ct = summary["control"]
    print(f"{len(long) / 1e6:.2f} MB prompt: {lg['statuses']} in p50 {lg['ms']['p50']:.0f} ms; /health meanwhile "
          f"p50 {lg['health_p50_ms']['p50']:.1f} ms, longest {lg['health_longest_ms']['max']:.1f} ms "
          f"({lg['polls']} polls)")
    print(f"  control (nothing else sent, as long): /health p50 {ct['health_p50_ms']['p50']:.1f} ms, longest "
          f"{ct['health_longest_ms']['max']:.1f} ms ({ct['polls']} polls)")
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, LimitsSettings)
    return p


main = cli.main_for(build_parser, LimitsSettings, measure)

if __name__ == "__main__":
    cli.run(main)
