"""What structured output costs the decode loop: the in-process scheduler (lmopt.scheduler) over the compiled engine
at the Llama-1B shape (FP16, CUDA graphs), requests with a JSON schema against the same requests without.

    python profile/structured_gpu.py --out results/nvidia-h200/llama-1b/structured-overhead.json     # on a GPU
    python profile/structured_gpu.py --smoke --out /tmp/structured-smoke.json                       # CPU check
    bash profile/gpu_all.sh OUTDIR structured                                                       # the same, in the GPU suite

Two cells, their variants interleaved round by round (ABAB..., then BABA...) in one process, so drift hits both:
  itl_1       one stream: inter-token latency of a request with a JSON schema vs the same request without (greedy;
              target <= 1.10x). A third variant, unconstrained with pipelining off, splits the cost into the
              pipelined device-fed path a grammar row cannot take (docs/structured_output.md) and the mask itself.
  tok_s_64    64 streams, closed loop (a finished request is replaced at once): tokens/s with half the requests
              constrained vs all unconstrained (target >= 0.85x).
Every constrained output that ended with "stop" is parsed and checked against the schema (jsonschema when installed):
`valid` counts them (with the schema's minItems, few end before max_new_tokens; validity is what CI tests). The loop's host time per step (step wall time not in engine calls) is recorded per variant.

Reads:  the model (a preset is made with seeded random weights; its tokenizer is the built-in one)
Writes: --out (default artifacts/<model>/profile/structured-overhead.json): card, versions, settings, per-round raw
        figures, summary with the two ratios and whether each meets its target
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("structured_gpu")

# what an API client asks for: nested objects, an enum, arrays. At least 16 orders (~30 tokens each): every
# constrained request runs to max_new_tokens like the unconstrained ones (ignore_eos), so both variants do the same
# work per request (a document a random-weight model closed early would mean more prefills, not mask cost)
SCHEMA = {
    "type": "object",
    "properties": {
        "orders": {"type": "array", "minItems": 16, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "status": {"enum": ["open", "paid", "shipped"]},
                           "customer": {"type": "object",
                                        "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                                        "required": ["name", "city"], "additionalProperties": False},
                           "items": {"type": "array", "items": {"type": "string"}}},
            "required": ["id", "status", "customer", "items"], "additionalProperties": False}},
    },
    "required": ["orders"],
    "additionalProperties": False,
}
TARGETS = {"itl_ratio_1": 1.10, "tok_s_ratio_64": 0.85}


@dataclass
class StructuredSettings:
    model: str = "llama-1b"
    engine: str = "compiled"
    precision: str = "fp16"
    device: str = "cuda"
    streams: int = 64              # concurrent requests of the throughput cell (and KV-cache slots)
    prompt_len: int = 64           # prompt tokens per request
    max_new_tokens: int = 128
    rounds: int = 4                # rounds; each runs every variant of both cells once
    itl_requests: int = 4          # one-stream requests per variant and round
    duration_s: float = 6.0        # measured seconds per throughput variant and round (after a 1 s warm-up)
    smoke: bool = False            # CPU check: the built-in model, compiled engine fp32, 4 streams, short cells
    out: str = ""


def _smoke(s: StructuredSettings) -> StructuredSettings:
    return replace(s, model="tiny", precision="fp32", device="cpu", streams=4, prompt_len=16, max_new_tokens=24,
                   rounds=1, itl_requests=1, duration_s=0.5)


def _prompts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = len(tok)
    return [rng.integers(1, vocab, length).tolist() for _ in range(n)]


def _check(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return isinstance(doc, dict)
    try:
        jsonschema.validate(doc, SCHEMA)
        return True
    except jsonschema.ValidationError:
        return False


class _Variant:
    """One scheduler configuration over the shared engine."""

    def __init__(self, name: str, constrained: str, pipeline: bool | None = None):
        self.name, self.constrained, self.pipeline = name, constrained, pipeline   # constrained: none | half | all


def _params(s: StructuredSettings, spec: str | None, eos):
    from lmopt.generate import SamplingParams

    return SamplingParams(max_new_tokens=s.max_new_tokens, stop_token_ids=(eos,) if spec else (-1,), grammar=spec)


def _itl_round(eng, tok, s, v: _Variant, spec: str, seed: int) -> dict:
    from lmopt.scheduler import Scheduler

    sched = Scheduler(eng, tokenizer=tok, max_queue=4, pipeline=v.pipeline)
    gaps, tokens, valid, stopped = [], 0, 0, 0
    try:
        for ids in _prompts(tok, s.itl_requests, s.prompt_len, seed):
            times: list[float] = []
            r = sched.submit(ids, _params(s, spec if v.constrained != "none" else None, tok.eos_token_id),
                             on_event=lambda ev, times=times: times.append(time.perf_counter()) if not ev.finished
                             else None)
            r.result(300)
            gaps += [b - a for a, b in zip(times, times[1:])]
            tokens += len(times)
            if v.constrained != "none" and r.finish_reason == "stop":
                stopped += 1
                valid += _check(r.text)
        st = sched.stats()
    finally:
        sched.close()
    return {"itl_ms": [g * 1e3 for g in gaps], "tokens": tokens, "stopped": stopped, "valid": valid,
            "host_ms_per_step": (st["step_seconds"] - st["engine_seconds"]) / max(st["steps"], 1) * 1e3}


def _throughput_round(eng, tok, s, v: _Variant, spec: str, seed: int) -> dict:
    """Closed loop: each request's final event submits its successor (on the scheduler's output thread), so nothing
    polls beside the loop; the window's tokens and steps come from the scheduler's counters."""
    from lmopt.scheduler import Scheduler

    sched = Scheduler(eng, tokenizer=tok, max_queue=s.streams, pipeline=v.pipeline)
    prompts = _prompts(tok, s.streams, s.prompt_len, seed)
    counts = {"stopped": 0, "valid": 0}
    running = [True]
    live: dict = {}

    def launch(i: int) -> None:
        constrained = v.constrained == "all" or (v.constrained == "half" and i % 2 == 0)
        pieces: list[str] = []

        def on_event(ev) -> None:
            pieces.append(ev.text)
            if not ev.finished:
                return
            if constrained and ev.finish_reason == "stop":
                counts["stopped"] += 1
                counts["valid"] += _check("".join(pieces))
            if running[0]:
                launch(i)

        live[i] = sched.submit(prompts[i], _params(s, spec if constrained else None, tok.eos_token_id),
                               on_event=on_event)

    try:
        for i in range(s.streams):
            launch(i)
        time.sleep(1.0)                      # warm-up: every stream decoding
        t0, st0 = time.perf_counter(), sched.stats()
        time.sleep(s.duration_s)
        t1, st1 = time.perf_counter(), sched.stats()
        running[0] = False
        for r in list(live.values()):
            r.cancel()
    finally:
        sched.close()
    steps = max(st1["steps"] - st0["steps"], 1)
    return {"tok_s": (st1["tokens"] - st0["tokens"]) / (t1 - t0), "steps": steps, **counts,
            "host_ms_per_step": ((st1["step_seconds"] - st0["step_seconds"]) -
                                 (st1["engine_seconds"] - st0["engine_seconds"])) / steps * 1e3,
            "mean_batch": (st1["tokens"] - st0["tokens"]) / steps}


def run_structured(*, settings: StructuredSettings) -> dict:
    from lmopt import results as R
    from lmopt.engines import create_engine
    from lmopt.grammar import json_schema_spec
    from lmopt.models import load_tokenizer
    from lmopt.paths import model_slug

    s = _smoke(settings) if settings.smoke else settings
    if s.rounds < 1 or s.streams < 2:
        raise UserError("--rounds must be >= 1 and --streams >= 2")
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU visible to torch — run on a GPU machine, or pass --smoke for the CPU check")
        card = torch.cuda.get_device_name()
    else:
        card = "cpu"
    tok = load_tokenizer(s.model)
    max_len = s.prompt_len + s.max_new_tokens + 16
    t0 = time.perf_counter()
    eng = create_engine(s.engine, s.model, s.precision, device=s.device, num_slots=s.streams, max_len=max_len)
    if eng.capabilities.capture:
        eng.capture(list(eng.capabilities.batch_buckets), max_len)
    log.info("%s %s %s on %s: ready in %.0f s (%d slots)", s.engine, s.model, s.precision, card,
             time.perf_counter() - t0, eng.num_slots)
    spec = json_schema_spec(SCHEMA)
    itl_vs = [_Variant("plain", "none"), _Variant("schema", "all"), _Variant("plain-host-fed", "none", False)]
    tps_vs = [_Variant("all-plain", "none"), _Variant("half-schema", "half")]
    raw = {"itl_1": {v.name: [] for v in itl_vs}, "tok_s_64": {v.name: [] for v in tps_vs}}
    try:
        _itl_round(eng, tok, replace(s, itl_requests=1), itl_vs[1], spec, 0)   # warm-up: grammar, shapes
        _throughput_round(eng, tok, replace(s, duration_s=0.5), tps_vs[1], spec, 0)
        for k in range(s.rounds):
            for v in (itl_vs if k % 2 == 0 else itl_vs[::-1]):
                res = _itl_round(eng, tok, s, v, spec, 100 + k)
                raw["itl_1"][v.name].append(res)
                log.info("round %d itl %-15s p50 %.3f ms (%d tokens, host %.3f ms/step)", k, v.name,
                         statistics.median(res["itl_ms"]) if res["itl_ms"] else float("nan"), res["tokens"],
                         res["host_ms_per_step"])
            for v in (tps_vs if k % 2 == 0 else tps_vs[::-1]):
                res = _throughput_round(eng, tok, s, v, spec, 200 + k)
                raw["tok_s_64"][v.name].append(res)
                log.info("round %d %d streams %-12s %.0f tok/s (batch %.1f, host %.3f ms/step)", k, s.streams,
                         v.name, res["tok_s"], res["mean_batch"], res["host_ms_per_step"])
    finally:
        eng.close()
    itl = {n: R.stats([x for r in rs for x in r["itl_ms"]]) for n, rs in raw["itl_1"].items()}
    tps = {n: statistics.median(r["tok_s"] for r in rs) for n, rs in raw["tok_s_64"].items()}
    itl_ratio = itl["schema"]["p50"] / itl["plain"]["p50"] if itl["plain"]["p50"] else None
    tps_ratio = tps["half-schema"] / tps["all-plain"] if tps["all-plain"] else None
    constrained = [r for rs in (raw["itl_1"]["schema"], raw["tok_s_64"]["half-schema"]) for r in rs]
    summary = {
        "card": card, "itl_ms_1": itl, "tok_s_64": {n: round(v, 1) for n, v in tps.items()},
        "itl_ratio_1": round(itl_ratio, 4) if itl_ratio else None,
        "itl_ratio_1_host_fed": (round(itl["schema"]["p50"] / itl["plain-host-fed"]["p50"], 4)
                                 if itl["plain-host-fed"]["p50"] else None),
        "tok_s_ratio_64": round(tps_ratio, 4) if tps_ratio else None,
        "targets": TARGETS,
        "meets": {"itl_ratio_1": itl_ratio is not None and itl_ratio <= TARGETS["itl_ratio_1"],
                  "tok_s_ratio_64": tps_ratio is not None and tps_ratio >= TARGETS["tok_s_ratio_64"]},
        "constrained_outputs": {"stopped": sum(r["stopped"] for r in constrained),
                                "valid": sum(r["valid"] for r in constrained)},
        "host_ms_per_step": {n: round(statistics.median(r["host_ms_per_step"] for r in rs), 4)
                             for cell in raw.values() for n, rs in cell.items()},
    }
    log.info("ITL at 1 stream: schema / plain p50 = %s (target <= %.2f); %d streams: half-schema / all-plain "
             "tok/s = %s (target >= %.2f); constrained outputs that stopped: %d, valid: %d", summary["itl_ratio_1"],
             TARGETS["itl_ratio_1"], s.streams, summary["tok_s_ratio_64"], TARGETS["tok_s_ratio_64"],
             summary["constrained_outputs"]["stopped"], summary["constrained_outputs"]["valid"])
    doc = R.envelope("structured_overhead", settings=asdict(s), schema_under_test=SCHEMA,
                     versions=R.versions("torch", "llguidance", "transformers"), summary=summary, samples=raw)
    out = s.out or f"artifacts/{model_slug(s.model)}/profile/structured-overhead.json"
    R.write_json(out, doc)
    log.info("Saving the result to %s", out)
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, StructuredSettings)
    return p


main = cli.main_for(build_parser, StructuredSettings, run_structured)

if __name__ == "__main__":
    cli.run(main)
