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
    overhead_requests: int = 0           # requests per path of that comparison (0 = --requests)
    engine: str = "ort"                  # engine/precision the server runs, for --in-process
    precision: str = "fp32"              # precision the server runs (for --in-process)
    device: str = "cpu"                  # device the server's engine runs on, for --in-process
    threads: int = 0                     # in-process engine threads (0 = library default); match the server's
    # the workload (docs/serving_benchmark.md): fixed = held-out windows of prompt_tokens, max_new_tokens each, EOS
    # ends a request; random = seeded lengths prompt_tokens and max_new_tokens +- length_spread, prompts cut from the
    # held-out text; corpus = the same lengths, prompts cut from the built-in texts and chat-formatted
    workload: str = "fixed"
    length_spread: float = 0.25          # random/corpus: lengths uniform in mean * (1 +- spread)
    seed: int = 0                        # random/corpus: lengths, cut points and open-loop arrivals
    ignore_eos: bool = False             # EOS does not end a request: every request runs to its max_tokens
    request_rate: str = ""               # comma list of open-loop Poisson rates (requests/s), after the sweep
    rate_requests: int = 0               # requests per open-loop rate (0 = --requests)
    objective_ttft_ms: float = 200.0     # goodput: a request is good with TTFT <= this ...
    objective_itl_ms: float = 25.0       # ... and its own ITL p99 <= this; a level meets the objective by its p99s
    backend: str = "triton"              # triton (gRPC stream) | openai (--openai-url) | inprocess (lmopt.scheduler)
    openai_url: str = ""                 # the OpenAI endpoint in front of the same server (backend openai)
    endpoint_levels: str = ""            # also: at these levels, OpenAI endpoint vs gRPC stream, interleaved
    in_process_levels: str = ""          # also: the same request stream through lmopt.scheduler in this process
    ceiling: bool = False                # also: the engine's ceiling for this workload (in-process, no server)
    warm_short: bool = False             # before the sweep: the shortest prompts at 1, 2, 4 streams, untimed
    ready_timeout_s: float = 10.0        # how long to wait for the server to be ready (after the in-process engine)
    slots: int = 0                       # in-process engine/scheduler as the server runs them (0 = engine default)
    max_len: int = 0
    capture_kv: int = 0
    prefill_chunk: int = 256
    max_queue: int = 256
    kv_layout: str = "contiguous"        # in-process compiled engine's KV cache as the server's (docs/paged_kv.md)
    kv_block_size: int = 16
    kv_num_blocks: int = 0
    kv_memory_fraction: float = 0.0
    prefix_cache: bool = True
    paged_attention: str = "gather"


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


@dataclass
class WorkItem:
    """One request of a workload: its prompt (token ids, and the text they decode to) and its output length."""
    prompt_ids: list
    prompt: str
    max_tokens: int


WORKLOADS = ("fixed", "random", "corpus")


def _lengths(rng, mean: int, spread: float, n: int) -> list[int]:
    lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return [rng.randint(lo, hi) for _ in range(n)]


def build_workload(model: str, kind: str, n: int, prompt_tokens: int, max_new_tokens: int, spread: float = 0.25,
                   seed: int = 0) -> list[WorkItem]:
    """`n` requests of workload `kind` (WORKLOADS), the same for the same arguments.

    fixed:  `n` consecutive held-out windows of `prompt_tokens` tokens, `max_new_tokens` each (the older benchmarks)
    random: seeded prompt lengths uniform in prompt_tokens * (1 +- spread), cut at seeded offsets from the held-out
            eval text (real tokens, so the model sees text), output lengths likewise around max_new_tokens
    corpus: the same lengths; each prompt a cut of the built-in texts (eval then calibration split) as the content of
            one chat message, formatted with the tokenizer's chat template (lmopt.chat): what a chat client sends
    """
    import random

    from lmopt.data import builtin_text
    from lmopt.models import load_tokenizer

    if kind not in WORKLOADS:
        raise UserError(f"unknown workload '{kind}' — use one of {', '.join(WORKLOADS)}")
    if n <= 0 or prompt_tokens <= 0 or max_new_tokens <= 0:
        raise UserError(f"a workload needs requests, prompt and output lengths > 0 (got {n}, {prompt_tokens}, "
                        f"{max_new_tokens})")
    if not 0 <= spread < 1:
        raise UserError(f"--length-spread must be in [0, 1) (got {spread})")
    tok = load_tokenizer(model)
    if kind == "fixed":
        prompts = held_out_prompts(model, n, prompt_tokens)
        return [WorkItem(tok(p)["input_ids"], p, max_new_tokens) for p in prompts]
    rng = random.Random(seed)
    ins, outs = _lengths(rng, prompt_tokens, spread, n), _lengths(rng, max_new_tokens, spread, n)
    text = builtin_text("eval") + ("\n" + builtin_text("calib") if kind == "corpus" else "")
    ids = tok(text)["input_ids"]
    if len(ids) <= max(ins) + 1:
        raise UserError(f"the built-in text has {len(ids)} tokens, too few for prompts of {max(ins)} — lower "
                        "--prompt-tokens")
    items = []
    for n_in, n_out in zip(ins, outs):
        if kind == "random":
            start = rng.randrange(0, len(ids) - n_in)
            cut = ids[start:start + n_in]
            items.append(WorkItem(cut, tok.decode(cut, skip_special_tokens=True), n_out))
            continue
        from lmopt.chat import render_chat
        from lmopt.models import encode

        # the template adds tokens of its own: cut the content so the whole prompt is about n_in tokens
        overhead = len(encode(tok, render_chat(tok, [{"role": "user", "content": "x"}]), add_special_tokens=False))
        body = max(1, n_in - overhead + 1)
        start = rng.randrange(0, len(ids) - body)
        content = tok.decode(ids[start:start + body], skip_special_tokens=True)
        prompt = render_chat(tok, [{"role": "user", "content": content}])
        items.append(WorkItem(encode(tok, prompt, add_special_tokens=False), prompt, n_out))
    return items


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
