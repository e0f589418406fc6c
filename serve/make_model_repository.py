"""Stage 4a: generate a Triton model repository that serves the pipeline's engine (never hand-edited).

    python serve/make_model_repository.py --model tiny                       # ORT on CPU, the fastest precision built
    python serve/make_model_repository.py --model tiny --slots 16 --max-queue 64   # in-flight batching capacity
    python serve/make_model_repository.py --model tiny --precision fp32
    python serve/make_model_repository.py --model tiny --engine torch --precision fp16 --device cuda   # KIND_GPU
    python serve/make_model_repository.py --model llama-1b --engine compiled --device cuda --slots 64 --capture-kv 256
    python serve/make_model_repository.py --model llama-1b --engine compiled --device cuda --gpus all  # every GPU
    python serve/make_model_repository.py --model llama-1b --engine compiled --device cuda --slots 256 \
        --kv-layout paged --kv-memory-fraction 0.5              # paged KV + prefix caching (docs/paged_kv.md)

Reads:  the ONNX graph of the chosen precision via its manifest (artifacts/<model>/export/fp32 or
        artifacts/<model>/quantize/<variant>), found with lmopt.artifacts.find_onnx; the tokenizer of --model
Writes: artifacts/<model>/serve/<engine>-<precision>-<cpu|gpu>/
          model_repository/lm/{config.pbtxt, 1/model.py}          one response per request
          model_repository/lm_stream/{config.pbtxt, 1/model.py}   decoupled streaming
          model_repository/lm_empty/{config.pbtxt, 1/model.py}    decoupled, no engine: Triton's own floor
          README.md                                               model names, inputs, outputs (stable API)
          manifest.json                                           written last

Model names and tensors (stable; serve/client and profile/ depend on them):
  lm, lm_stream   inputs  text_input STRING [1]; optional max_tokens INT32 [1], temperature FP32 [1],
                          top_k INT32 [1], top_p FP32 [1], seed INT64 [1], stop STRING [1],
                          ignore_eos BOOL [1]
                  outputs text_output STRING [1], token_ids INT64 [-1], finish_reason INT32 [1] (last response)
                  (max_batch_size > 0, so clients send shape [1, 1] per input; the generate endpoints add it)
  lm_empty        the same tensors; streams max_tokens responses of token id 0 at once, no engine (KIND_CPU): what
                  Triton itself costs per request and per streamed response, the floor of the serving overhead
Both models run lmopt.scheduler (in-flight batching: requests join and leave the running batch at every decode
step) over lmopt.engines.create_engine(engine, model, precision) inside the Python backend; settings travel in
config.pbtxt `parameters`. A request beyond --slots running + --max-queue waiting gets an error starting with
"server busy: " (UNAVAILABLE). --batching static keeps the previous per-execute batches (for comparisons).
Start it with serve/run_triton.sh.

--precision auto (ONNX Runtime): the candidates are FP32 and the CPU INT8 graph when stage 2 built one (it exists
only when it met its accuracy budget); a quick speed check (ms per token, batch 1, in process) picks the faster.
The manifest's "choice" records the candidates, their measured speed and accuracy, and the reason.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging

log = get_logger("serve-repo")

TEMPLATE = Path(__file__).resolve().parent / "templates" / "model.py"
MODELS = ("lm", "lm_stream", "lm_empty")


@dataclass
class RepoSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    engine: str = "ort"              # ort | torch | trt
    precision: str = "auto"          # auto = the faster of fp32 and the INT8 graph (when built), by a quick speed check
    device: str = "cpu"              # cpu -> KIND_CPU; cuda -> KIND_GPU (DLPack outputs, engine on the GPU)
    instances: int = 1               # model instances per model (per GPU with --gpus)
    gpus: str = ""                   # with --device cuda: all = every GPU nvidia-smi lists here, or a list 0,1,...; one instance group entry per GPU, each instance with its own engine and scheduler ("" = Triton's placement)
    batching: str = "inflight"       # inflight (lmopt.scheduler) | static (one generation per execute() batch)
    slots: int = 8                   # in-flight: requests generating at once (KV-cache slots)
    max_queue: int = 32              # in-flight: requests waiting for a slot; beyond that "server busy: "
    prefill_chunk: int = 256         # in-flight: prompt tokens prefilled per step while other requests decode
    decode_wait_ratio: float = 1.0   # in-flight: while requests decode, a step's prefill takes at most this many times a decode-only step (the chunk adapts; 0 = chunks of --prefill-chunk regardless); docs/serving.md
    cancel_poll_ms: float = 10.0     # in-flight: ask Triton whether a request was cancelled at most this often (0 = every step; each ask is a round trip to the server process)
    max_batch_size: int = 8          # Triton's dynamic batcher (lm; lm_stream too when --batching static)
    queue_delay_us: int = 2000       # how long the dynamic batcher waits to fill a batch
    max_tokens_cap: int = 256        # requests asking for more are refused with an error naming the cap
    default_max_tokens: int = 32
    threads: int = 0                 # intra-op threads of the engine (0 = library default)
    output_transport: str = "auto"   # auto | dlpack | numpy (auto = DLPack whenever torch is importable)
    gil_switch_us: int = 200         # the model process's Python thread switch interval (sys.setswitchinterval; Python's default is 5000): how long a thread waiting for the interpreter lock (the sender, the scheduler) can be kept waiting by another (0 = Python's default)
    first_token_pause_us: int = 50   # in-flight streaming: after a step that produced first tokens, the scheduler sleeps this long (while at most 4 requests decode) so the sender thread sends them at once (0 = never)
    capture_kv: int = 256            # compiled engine: at load, capture every decode batch bucket at this KV length (0 = on first use, stalling live requests while it compiles)
    max_len: int = 0                 # compiled engine: positions per KV-cache slot (0 = the model's context, at most 4096)
    decode_kernels: str = "inductor" # compiled engine: inductor (torch.compile'd step) | fused (lmopt.engines.kernels for decode batches of up to 8 rows; docs/compiled_engine.md)
    weight_quant: str = ""           # compiled engine: weight-only quantization ("" none | int4 tinygemm | int4g, with --decode-kernels fused)
    kv_layout: str = "contiguous"    # compiled engine: contiguous (one slot of --max-len positions per request) | paged (blocks: admission by free blocks, prefix caching, preemption; docs/paged_kv.md)
    kv_block_size: int = 16          # paged: positions per KV block
    kv_num_blocks: int = 0           # paged: blocks in the pool (0 = --kv-memory-fraction of free GPU memory, or the memory --slots contiguous slots would take)
    kv_memory_fraction: float = 0.0  # paged, on a GPU: share of the GPU memory free after loading the weights that the pool takes (0 = --kv-num-blocks)
    prefix_cache: bool = True        # paged: reuse the cached blocks of a prompt's longest cached prefix (--no-prefix-cache: off)
    paged_attention: str = "gather"  # paged decode attention: gather (copy the blocks, then SDPA) | triton (a kernel that reads through the block table, GPU only)


def resolve_precision(s: RepoSettings) -> tuple[str, dict]:
    """(precision, choice record for the manifest)."""
    if s.precision != "auto":
        return s.precision, {"precision": s.precision, "reason": "--precision given"}
    if s.engine != "ort":
        p = "fp16" if s.device.startswith("cuda") else "fp32"
        return p, {"precision": p, "reason": f"default for --engine {s.engine} on {s.device}"}
    from lmopt.artifacts import find_onnx

    cands: dict[str, dict] = {"fp32": {"accuracy": "reference"}}
    try:
        _, man = find_onnx(s.artifacts, s.model, "int8", "onnxruntime")
        cands["int8"] = {"accuracy": man.get("accuracy", {}),
                         "budget_pct": man.get("settings", {}).get("max_ppl_increase")}
    except UserError:
        log.info("no INT8 graph for ONNX Runtime (make quantize) — serving fp32")
        return "fp32", {"precision": "fp32", "candidates": cands, "reason": "the only ONNX Runtime graph built"}
    for p, c in cands.items():
        c["ms_per_token"] = _speed_check(s, p)
        log.info("speed check: ort %s %.2f ms/token", p, c["ms_per_token"])
    best = min(cands, key=lambda p: cands[p]["ms_per_token"])
    other = next(p for p in cands if p != best)
    reason = (f"fastest measured here: {cands[best]['ms_per_token']:.2f} ms/token vs {other} "
              f"{cands[other]['ms_per_token']:.2f} (batch 1, in process); the INT8 graph met its accuracy budget")
    return best, {"precision": best, "candidates": cands, "reason": reason}


def _speed_check(s: RepoSettings, precision: str, tokens: int = 24, repeats: int = 3) -> float:
    """Milliseconds per decode token of the ORT engine at batch 1 (best of `repeats`, after a warm-up)."""
    from lmopt.engines import create_engine
    from lmopt.generate import SamplingParams, generate

    eng = create_engine("ort", s.model, precision, device=s.device, artifacts=s.artifacts,
                        threads=s.threads or None)
    try:
        p = SamplingParams(max_new_tokens=tokens, stop_token_ids=(-1,))
        generate(eng, [[1] * 16], SamplingParams(max_new_tokens=2, stop_token_ids=(-1,)))
        best = min(sum(generate(eng, [[1] * 16], p).step_s) / (tokens - 1) for _ in range(repeats))
    finally:
        eng.close()
    return round(best * 1e3, 3)


def resolve_gpus(spec: str, device: str) -> list[int]:
    """The GPU indices of --gpus: [] (Triton's placement), "all" (every GPU nvidia-smi lists) or "0,1,..."."""
    spec = spec.strip()
    if not spec:
        return []
    if device != "cuda":
        raise UserError(f"--gpus {spec} places instances on GPUs — add --device cuda")
    if spec == "all":
        n = count_gpus()
        if n == 0:
            raise UserError("--gpus all: nvidia-smi lists no GPU here — give the indices instead (--gpus 0,1)")
        return list(range(n))
    try:
        ids = [int(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"--gpus '{spec}' is not all or a list of GPU indices like 0,1") from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise UserError(f"--gpus '{spec}': GPU indices must be >= 0 and distinct")
    return ids


def count_gpus() -> int:
    """GPUs nvidia-smi lists on this machine (0 when there is no driver)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def instance_group(count: int, kind: str, gpus: list[int]) -> str:
    """Triton's instance_group: one entry per GPU when GPUs are given (count instances on each)."""
    if not gpus:
        return f"instance_group [ {{ count: {count} kind: {kind} }} ]"
    rows = ",\n".join(f"  {{ count: {count} kind: {kind} gpus: [ {i} ] }}" for i in gpus)
    return f"instance_group [\n{rows}\n]"


def config_pbtxt(name: str, s: RepoSettings, precision: str, decoupled: bool, params: dict[str, str],
                 gpus: list[int] = ()) -> str:
    kind = "KIND_GPU" if s.device.startswith("cuda") else "KIND_CPU"
    what = ("decoupled streaming: token responses as tokens come (several share one under load), then an empty response flagged final" if decoupled
            else "one response per request with the full generated text")
    p = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    if params.get("engine") == "empty":
        how = "no engine: execute() sends max_tokens responses of token id 0, then FINAL (Triton's own floor)"
    elif s.batching == "static":
        how = (f'lmopt.generate over create_engine("{s.engine}", "{s.model}", "{precision}") on {s.device}; Triton\'s '
               "dynamic batcher groups requests and each execute() runs its group as one generation")
    else:
        how = (f'lmopt.scheduler (in-flight batching, {s.slots} slots, queue {s.max_queue}) over create_engine('
               f'"{s.engine}", "{s.model}", "{precision}") on {s.device}')
    if s.batching == "static" or not decoupled:
        batcher = f"dynamic_batching {{\n  max_queue_delay_microseconds: {s.queue_delay_us}\n}}\n"
    else:  # execute() only hands requests over: waiting in Triton's batcher would only add latency
        batcher = "# no dynamic batching: execute() hands each request to the scheduler, which batches per step\n"
    return f"""# Generated by serve/make_model_repository.py — edit the script, not this file.
# {name}: {what}.
# Runs {how}.
name: "{name}"
backend: "python"
max_batch_size: {s.max_batch_size}
{batcher}model_transaction_policy {{ decoupled: {"true" if decoupled else "false"} }}

input [
  # the prompt: text, or token ids already tokenized by the client (exactly one of the two per request)
  {{ name: "text_input"  data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "input_ids"   data_type: TYPE_INT64  dims: [ -1 ] optional: true allow_ragged_batch: true }},
  # optional sampling settings; absent = greedy, default_max_tokens, no stop string
  {{ name: "max_tokens"  data_type: TYPE_INT32  dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32   dims: [ 1 ] optional: true }},
  {{ name: "top_k"       data_type: TYPE_INT32  dims: [ 1 ] optional: true }},
  {{ name: "top_p"       data_type: TYPE_FP32   dims: [ 1 ] optional: true }},
  {{ name: "seed"        data_type: TYPE_INT64  dims: [ 1 ] optional: true }},
  {{ name: "stop"        data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "ignore_eos"  data_type: TYPE_BOOL   dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "token_ids"   data_type: TYPE_INT64  dims: [ -1 ] }},
  # a request's last response only: index in lmopt.detokenize.FINISH_REASONS (stop, length, cancelled, error)
  {{ name: "finish_reason" data_type: TYPE_INT32 dims: [ 1 ] }},
  # request parameter "logprobs" = k: each token's log-probability, and the k most likely ids and theirs (row-major)
  {{ name: "logprobs"        data_type: TYPE_FP32  dims: [ -1 ] }},
  {{ name: "top_logprob_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "top_logprobs"    data_type: TYPE_FP32  dims: [ -1 ] }}
]
# request parameters (not tensors): "grammar" (string: a lmopt.grammar spec, structured output) and "logprobs" (int)

# {kind} from --device; each instance loads its own engine{" (and runs its own scheduler) on its GPU" if gpus else ""}.
{instance_group(s.instances, kind, gpus)}

# Settings model.py reads (all strings).
{p}
"""


def make_repository(*, settings: RepoSettings) -> dict:
    from lmopt.artifacts import find_onnx, find_trt_engines, onnx_file
    from lmopt.engines import ENGINES, PRECISIONS
    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.models import load_tokenizer, resolve
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir

    s = settings
    if s.engine not in ENGINES:
        raise UserError(f"unknown --engine '{s.engine}' — use one of {', '.join(ENGINES)}")
    if s.precision != "auto" and s.precision not in PRECISIONS:
        raise UserError(f"unknown --precision '{s.precision}' — use auto or one of {', '.join(PRECISIONS)}")
    if s.device not in ("cpu", "cuda"):
        raise UserError(f"unknown --device '{s.device}' — use cpu or cuda")
    if s.output_transport not in ("auto", "dlpack", "numpy"):
        raise UserError(f"unknown --output-transport '{s.output_transport}' — use auto, dlpack or numpy")
    if s.batching not in ("inflight", "static"):
        raise UserError(f"unknown --batching '{s.batching}' — use inflight or static")
    if s.decode_wait_ratio < 0:
        raise UserError(f"--decode-wait-ratio must be >= 0 (got {s.decode_wait_ratio:g})")
    if s.decode_kernels not in ("inductor", "fused"):
        raise UserError(f"unknown --decode-kernels '{s.decode_kernels}' — use inductor or fused")
    if s.weight_quant not in ("", "int8", "int8mm", "int4", "int4g"):
        raise UserError(f"unknown --weight-quant '{s.weight_quant}' — use int4, int4g, int8 or leave it empty")
    if (s.decode_kernels != "inductor" or s.weight_quant) and s.engine != "compiled":
        raise UserError("--decode-kernels and --weight-quant are options of the compiled engine — add --engine compiled")
    _check_kv(s)
    if s.max_queue < 0 or s.cancel_poll_ms < 0:
        raise UserError(f"--max-queue and --cancel-poll-ms must be >= 0 (got {s.max_queue}, {s.cancel_poll_ms:g})")
    for name in ("capture_kv", "max_len", "gil_switch_us", "first_token_pause_us"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(s, name)})")
    for name in ("instances", "max_batch_size", "max_tokens_cap", "default_max_tokens", "slots", "prefill_chunk"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(s, name)})")
    if s.default_max_tokens > s.max_tokens_cap:
        raise UserError(f"--default-max-tokens {s.default_max_tokens} is above --max-tokens-cap {s.max_tokens_cap}")
    gpus = resolve_gpus(s.gpus, s.device)
    check_writable(s.artifacts)
    precision, choice = resolve_precision(s)
    inputs = {}
    if s.engine == "ort":
        folder, man = find_onnx(s.artifacts, s.model, precision, "onnxruntime")
        inputs["onnx"] = file_entry(onnx_file(folder, man))
        inputs["onnx_manifest"] = str(folder / "manifest.json")
    elif s.engine == "trt":
        if s.device != "cuda":
            raise UserError("TensorRT engines run on the GPU — add --device cuda")
        # the server picks the engine of the installed TensorRT version (TrtEngine.from_artifacts); here we only
        # check that stage 3 produced one of this precision, through the manifests
        found = find_trt_engines(s.artifacts, s.model, precision)
        inputs["engine_manifests"] = [str(stage_dir(s.artifacts, s.model, "engine", v) / "manifest.json")
                                      for v in sorted(found)]
    tok = load_tokenizer(s.model)  # fails here, with one line, rather than inside the server

    extra = (f"-{s.weight_quant}" if s.weight_quant else "") + ("-fused" if s.decode_kernels == "fused" else "") \
        + ("-paged" if s.kv_layout == "paged" else "")
    variant = f"{s.engine}-{precision}{extra}-{'gpu' if s.device == 'cuda' else 'cpu'}"
    final = stage_dir(s.artifacts, s.model, "serve", variant)
    model = resolve(s.model)  # a local folder by its absolute path: the server resolves it from another folder
    params = {"artifacts": str(Path(s.artifacts).resolve()),
              "model": str(model.path) if model.kind == "local" else s.model,
              "engine": s.engine, "precision": precision, "device": s.device, "threads": str(s.threads),
              "max_tokens_cap": str(s.max_tokens_cap), "default_max_tokens": str(s.default_max_tokens),
              "output_transport": s.output_transport, "batching": s.batching, "slots": str(s.slots),
              "max_queue": str(s.max_queue), "prefill_chunk": str(s.prefill_chunk),
              "decode_wait_ratio": str(s.decode_wait_ratio),
              "cancel_poll_ms": f"{s.cancel_poll_ms:g}", "capture_kv": str(s.capture_kv), "max_len": str(s.max_len),
              "decode_kernels": s.decode_kernels, "weight_quant": s.weight_quant, "kv_layout": s.kv_layout,
              "kv_block_size": str(s.kv_block_size), "kv_num_blocks": str(s.kv_num_blocks),
              "kv_memory_fraction": f"{s.kv_memory_fraction:g}", "prefix_cache": "1" if s.prefix_cache else "0",
              "paged_attention": s.paged_attention,
              "gil_switch_us": str(s.gil_switch_us), "first_token_pause_us": str(s.first_token_pause_us)}
    empty = RepoSettings(**{**asdict(s), "device": "cpu", "instances": 1, "batching": "inflight"})
    empty_params = {"engine": "empty", "default_max_tokens": str(s.default_max_tokens),
                    "output_transport": s.output_transport}
    with staging_dir(final) as tmp:
        repo = tmp / "model_repository"
        for name in MODELS:
            (repo / name / "1").mkdir(parents=True)
            shutil.copy(TEMPLATE, repo / name / "1" / "model.py")
            cfg = (config_pbtxt(name, empty, precision, True, empty_params) if name == "lm_empty" else
                   config_pbtxt(name, s, precision, name == "lm_stream", params, gpus))
            (repo / name / "config.pbtxt").write_text(cfg)
            log.info("Saving %s", final / "model_repository" / name / "config.pbtxt")
        (tmp / "README.md").write_text(_readme(s, precision, variant, choice))
        manifest = {
            "stage": "serve", "variant": variant, "model": model_slug(s.model), "model_spec": s.model,
            "precision": precision, "engine": s.engine, "device": s.device, "choice": choice,
            "batching": s.batching,
            "instance_kind": "KIND_GPU" if s.device == "cuda" else "KIND_CPU", "gpus": gpus,
            "models": {"lm": {"decoupled": False}, "lm_stream": {"decoupled": True},
                       "lm_empty": {"decoupled": True, "engine": "empty"}},
            "inputs": inputs, "outputs": {"model_repository": "model_repository"},
            "tokenizer_vocab": len(tok), "settings": asdict(s),
            "versions": package_versions("nvidia-pytriton", "tritonclient", "onnxruntime", "torch"),
        }
        write_manifest(tmp, manifest)
    log.info("model repository: %s (start it with: bash serve/run_triton.sh %s)", final / "model_repository",
             final / "model_repository")
    return manifest


def _check_kv(s: RepoSettings) -> None:
    """The KV-cache settings (the engine checks them again; here they fail before anything is written)."""
    if s.kv_layout not in ("contiguous", "paged"):
        raise UserError(f"unknown --kv-layout '{s.kv_layout}' — use contiguous or paged")
    if s.kv_layout == "paged" and s.engine != "compiled":
        raise UserError("--kv-layout paged is an option of the compiled engine — add --engine compiled "
                        "(the other engines keep contiguous KV)")
    if s.kv_layout == "paged" and s.decode_kernels == "fused":
        raise UserError("the fused decode kernels read the contiguous KV cache — drop --decode-kernels fused or "
                        "use --kv-layout contiguous")
    if s.paged_attention not in ("gather", "triton"):
        raise UserError(f"unknown --paged-attention '{s.paged_attention}' — use gather or triton")
    if s.kv_layout != "paged" and (s.kv_num_blocks or s.kv_memory_fraction or s.paged_attention != "gather"):
        raise UserError("--kv-num-blocks, --kv-memory-fraction and --paged-attention are settings of the paged KV "
                        "cache — add --kv-layout paged")
    if s.kv_block_size < 1 or s.kv_num_blocks < 0 or not 0 <= s.kv_memory_fraction < 1:
        raise UserError(f"--kv-block-size must be >= 1, --kv-num-blocks >= 0 and --kv-memory-fraction in [0, 1) "
                        f"(got {s.kv_block_size}, {s.kv_num_blocks}, {s.kv_memory_fraction:g})")
    if s.kv_memory_fraction and s.device != "cuda":
        raise UserError("--kv-memory-fraction is a share of free GPU memory — on the CPU give --kv-num-blocks")


def _readme(s: RepoSettings, precision: str, variant: str, choice: dict) -> str:
    if s.batching == "static":
        lm = f"non-streaming, dynamic batching (max batch {s.max_batch_size}), one generation per batch"
        st = "decoupled, dynamic batching, one generation per batch"
    else:
        lm = f"non-streaming, in-flight batching ({s.slots} slots, queue {s.max_queue})"
        st = "decoupled, in-flight batching: joins the running batch at the next step"
    return f"""# Triton model repository `{variant}` (generated by serve/make_model_repository.py)

Engine: `{s.engine}` {precision} on {s.device}; model `{s.model}` ({choice.get("reason", "")}).
Start: `bash serve/run_triton.sh <this folder>/model_repository`.

| model | kind | responses |
|---|---|---|
| `lm` | {lm} | one, full text |
| `lm_stream` | {st} | one per token, then an empty one flagged final |
| `lm_empty` | decoupled, no engine (Triton's own cost per request and response) | max_tokens responses of token 0 |

Busy: more than {s.slots} running + {s.max_queue} waiting requests get an error starting with `server busy: `
(code UNAVAILABLE: HTTP 503, gRPC UNAVAILABLE); retry later. Metrics port: `lm_scheduler_slots_in_use`,
`lm_scheduler_queue_length`, `lm_scheduler_decode_batch_size`, `lm_scheduler_steps_total`, `lm_scheduler_tokens_total`,
and the latency histograms `lm_time_to_first_token_seconds`, `lm_inter_token_latency_seconds`,
`lm_request_time_per_output_token_seconds`, `lm_e2e_request_latency_seconds`, `lm_request_queue_time_seconds`.

Inputs (batch dim first, `[1, 1]` per request): `text_input` STRING; optional `max_tokens` INT32 (1..{s.max_tokens_cap},
default {s.default_max_tokens}), `temperature` FP32 (0 = greedy), `top_k` INT32, `top_p` FP32, `seed` INT64, `stop` STRING,
`ignore_eos` BOOL (true: the end-of-sequence token does not end the request; benchmarks use it for fixed lengths).
Request parameters: `grammar` (string: `{{"type": "json_object"}}` or `{{"type": "json_schema", "schema": {{...}}}}`; the
output follows it; docs/structured_output.md) and `logprobs` (int k, 0..20).
Outputs: `text_output` STRING, `token_ids` INT64 `[-1]`, `finish_reason` INT32 (last response: 0 stop, 1 length,
2 cancelled, 3 error); with `logprobs`: `logprobs` FP32 (one per token), `top_logprob_ids` INT64 and `top_logprobs`
FP32 (k per token, most likely first).
HTTP generate: `POST /v2/models/lm/generate` and `/v2/models/lm_stream/generate_stream` with
`{{"text_input": "...", "max_tokens": 16}}`.
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, RepoSettings)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = cli.settings_from(RepoSettings, args)
    t0 = time.time()
    make_repository(settings=settings)
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
