"""The served engine's per-step timeline under load: where a step of the Triton model's engine loop goes (engine calls
vs the loop's own host work) and what the sender thread spends per response, read off the model's metrics port
around a closed-loop load of `streams` concurrent gRPC streams (docs/serving.md, "What a GPU run should record").

    bash serve/run_triton.sh artifacts/tiny/serve/ort-fp32-cpu/model_repository --background --pid-file /tmp/t.pid
    python profile/served_timeline.py --model tiny --streams 16 --requests 4

Reads:  a running Triton server (--grpc-port, --metrics-port) serving lm_stream (make serve-repo)
Writes: artifacts/<model>/profile/served-timeline-<streams>.json (or --out): the timeline (steps, step ms, host ms per
        step, engine share, send ms per response, responses and tokens per step), client-side tokens/s
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("served_timeline")


@dataclass
class TimelineSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    streams: int = 16                # concurrent gRPC streams, each sending its requests one after the other
    requests: int = 4                # requests per stream
    max_new_tokens: int = 64
    prompt: str = "def f("
    out: str = ""


def run_timeline(*, settings: TimelineSettings) -> dict:
    from lmopt import results as R
    from lmopt.paths import model_slug
    from lmopt.triton_client import GenRequest, GrpcStream, scrape_metrics, served_timeline

    s = settings
    if s.streams < 1 or s.requests < 1 or s.max_new_tokens < 1:
        raise UserError("--streams, --requests and --max-new-tokens must be >= 1")
    url = f"http://{s.host}:{s.metrics_port}/metrics"
    try:
        before = scrape_metrics(url)
    except OSError as e:
        raise UserError(f"no Triton metrics at {url} ({e}) — start the server first (serve/run_triton.sh)") from None
    tokens, errors = [0] * s.streams, []

    def client(i: int) -> None:
        try:
            with GrpcStream(f"{s.host}:{s.grpc_port}") as st:
                for _ in range(s.requests):
                    for piece in st.generate(GenRequest(prompt=s.prompt, max_tokens=s.max_new_tokens)):
                        tokens[i] += len(piece.token_ids)
        except Exception as e:  # noqa: BLE001  (recorded: a failed stream makes the run invalid)
            errors.append(str(e).splitlines()[0])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(s.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(0.5)   # the counters are pushed when the scheduler goes idle
    tl = served_timeline(before, scrape_metrics(url))
    if errors:
        raise UserError(f"{len(errors)} streams failed during the run: {errors[0]}")
    summary = dict(tl, tokens_per_s=round(sum(tokens) / wall, 1), wall_s=round(wall, 3), tokens=sum(tokens))
    log.info("%d streams: %.1f tokens/s; step %.3f ms (host %.3f ms, engine share %.2f), send %.3f ms per response, "
             "%.2f responses and %.2f tokens per step", s.streams, summary["tokens_per_s"], tl["step_ms"] or 0,
             tl["host_ms_per_step"] or 0, tl["engine_share"] or 0, tl["send_ms_per_response"] or 0,
             tl["responses_per_step"] or 0, tl["tokens_per_step"] or 0)
    doc = R.envelope("served-timeline", settings=asdict(s), summary=summary)
    out = s.out or Path(s.artifacts) / model_slug(s.model) / "profile" / f"served-timeline-{s.streams}.json"
    log.info("Saving %s", R.write_json(out, doc))
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, TimelineSettings)
    return p


main = cli.main_for(build_parser, TimelineSettings, run_timeline)

if __name__ == "__main__":
    cli.run(main)
