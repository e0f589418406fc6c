"""What the serving benchmarks share (profile/perf_analyzer_sweep.py, load_generator.py, serve_bench.py).

Holds what the three scripts must agree on — their settings (so the orchestrator builds them without importing
another script), prompts drawn from the held-out text, the
summary statistics (mean/p50/p90/p95/p99), the self-describing result envelope written under
artifacts/<model>/profile/serving-*.json, and Triton's per-model statistics (to show whether requests were batched).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmopt.errors import UserError

RESULT_PREFIX = "serving-"


# The settings of the two measuring tools live here, beside what they share, so the orchestrator
# (profile/serve_bench.py) can build them without importing another script.
@dataclass
class LoadSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    url: str = "127.0.0.1:8001"          # gRPC; loopback by default so the network is not what is measured
    triton_model: str = "lm_stream"      # served streaming (decoupled) model name
    label: str = "batching-on"           # names the result: serving-stream-<label>.json
    concurrency: str = "1,2,4,8"         # comma list of requests in flight
    prompt_tokens: int = 32
    max_new_tokens: int = 16
    num_prompts: int = 16                # distinct held-out prompts, sent round-robin
    requests: int = 32                   # measured requests per level (upper bound)
    duration_s: float = 60.0             # measured seconds per level (upper bound)
    warmup_requests: int = 1             # per client, before each level's measurement
    request_timeout_s: float = 60.0
    prompt_input: str = "text_input"     # tensor names of the served model ("input_ids": send token ids)
    max_tokens_input: str = "max_tokens"
    tokens_output: str = "token_ids"
    in_process: bool = False             # also time the same engine in-process at concurrency 1 (serving overhead)
    engine: str = "ort"                  # engine/precision the server runs, for --in-process
    precision: str = "fp32"              # precision the server runs (for --in-process)
    device: str = "cpu"                  # device the server's engine runs on, for --in-process
    threads: int = 0                     # in-process engine threads (0 = library default); match the server's


@dataclass
class PerfAnalyzerSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    url: str = "127.0.0.1:8001"           # gRPC endpoint; loopback so the network is not what is measured
    triton_model: str = "lm"              # the non-streaming (dynamically batched) model
    label: str = "batching-on"            # names the result: serving-pa-<label>.json
    concurrency: str = "1,2,4,8"          # comma list; empty = skip the concurrency sweep
    request_rate: str = ""                # comma list of requests/s; empty = skip the request-rate sweep
    prompt_tokens: int = 32
    max_new_tokens: int = 16
    num_prompts: int = 16                 # distinct prompts in the input-data file, sent round-robin
    prompt_input: str = "text_input"      # name of the model's prompt input tensor
    max_tokens_input: str = "max_tokens"  # name of the model's max-tokens input
    measurement_requests: int = 40        # count_windows: requests per measurement window
    stability_percentage: float = 100.0   # a shared 2-core machine rarely meets perf_analyzer's default 10 %
    max_trials: int = 6
    timeout_s: float = 300.0              # per perf_analyzer run


def held_out_prompts(model: str, n: int, prompt_tokens: int) -> list[str]:
    """`n` prompts of about `prompt_tokens` tokens each: consecutive windows of the held-out eval text, decoded.

    Realistic inputs matter: perf_analyzer's random data would be out-of-vocabulary ids or random bytes.
    """
    from lmopt.data import builtin_text, token_windows
    from lmopt.models import load_tokenizer

    if n <= 0 or prompt_tokens <= 0:
        raise UserError(f"need at least one prompt of at least one token (got {n} x {prompt_tokens})")
    tok = load_tokenizer(model)
    windows = token_windows(tok, builtin_text("eval"), n, prompt_tokens, "the held-out eval text (data/eval.txt)")
    return [tok.decode(w, skip_special_tokens=True) for w in windows]


def result_path(artifacts: str | os.PathLike, model: str, name: str) -> Path:
    from lmopt.paths import model_slug

    return Path(artifacts) / model_slug(model) / "profile" / f"{RESULT_PREFIX}{name}.json"


def write_result(path: Path, kind: str, settings: dict, samples: Any, summary: Any, extra: dict | None = None) -> Path:
    """The serving benchmarks' result file: lmopt.results' envelope, written atomically."""
    from lmopt import results

    doc = results.envelope(kind, settings=settings, summary=summary, samples=samples,
                           versions=results.versions("tritonclient", "nvidia-pytriton", "onnxruntime", "numpy"),
                           **(extra or {}))
    return results.write_json(path, doc)


def model_stats(url: str, model: str) -> dict[str, int]:
    """Triton's cumulative counters for one model: requests (inference_count) and model executions.

    execution_count < inference_count means the dynamic batcher grouped requests into one execute() call.
    """
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        st = c.get_inference_statistics(model_name=model, as_json=True)
    m = st["model_stats"][0]
    return {"inference_count": int(m.get("inference_count", 0)), "execution_count": int(m.get("execution_count", 0)),
            "success_count": int(m.get("inference_stats", {}).get("success", {}).get("count", 0))}


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float | int | None]:
    d = {k: after[k] - before[k] for k in before}
    d["requests_per_execution"] = round(d["inference_count"] / d["execution_count"], 3) if d["execution_count"] else None
    return d


def wait_ready(url: str, model: str, timeout_s: float) -> None:
    """Wait until the server answers and `model` is ready, or fail with what to run."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with grpcclient.InferenceServerClient(url) as c:
                if c.is_server_live() and c.is_model_ready(model):
                    return
                last = f"model {model} not ready"
        except InferenceServerException as e:
            last = str(e).splitlines()[0][:120]
        time.sleep(0.3)
    raise UserError(f"no ready Triton model '{model}' at {url} ({last}) — start the server first: "
                    "bash serve/run_triton.sh (or run make serve-bench, which starts it)")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` right now (all bound at once, so none repeats)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def newest_repository(artifacts: str | os.PathLike, model: str) -> Path | None:
    """The model repository serve/make_model_repository.py wrote last for `model` (None when there is none)."""
    from lmopt.manifest import list_variants
    from lmopt.paths import stage_dir

    v = list_variants(artifacts, model, "serve")
    if not v:
        return None
    best = max(v, key=lambda k: v[k].get("created", ""))
    return stage_dir(artifacts, model, "serve", best) / "model_repository"
