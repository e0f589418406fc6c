"""Does a long prompt arriving stall the running streams? The in-process scheduler (lmopt.scheduler) with `streams`
requests decoding; a prompt of `prompt_len` tokens arrives; the running streams' inter-token latency while it is
prefilled, against the same streams at the same point without it. Rounds alternate the two (and each policy), so
machine noise hits both alike.

    python profile/long_prompt_itl.py --model tiny                       # the CPU row (built-in model, ORT FP32)
    python profile/long_prompt_itl.py --model tiny --rounds 3 --out /tmp/itl.json

Policies: `bounded` = the scheduler's default (a step's prefill takes at most decode_wait_ratio x a decode-only step;
the chunk adapts), `chunk-only` = decode_wait_ratio 0 (chunks of max_prefill_chunk tokens, the policy before the time
bound). ITL of a step = the wall time of a scheduler step that decoded every running stream (each got one token);
the window with the long prompt runs from the step that admitted it to its first token; the window without it is
as many steps at the same point of an identical run.

Reads:  artifacts/<model>/export/fp32 (make export)
Writes: artifacts/<model>/profile/long-prompt-itl.json (or --out): per policy ITL p50/p99 with and without the long
        prompt and their ratio, the long prompt's TTFT, the chunks it was prefilled in; raw step times
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt.log import get_logger

log = get_logger("long_prompt_itl")


@dataclass
class LongPromptSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    engine: str = "ort"
    threads: int = 1
    streams: int = 16                # requests decoding when the long prompt arrives
    prompt_len: int = 440            # tokens of the long prompt
    max_prefill_chunk: int = 256     # the engine's prefill chunk limit
    decode_wait_ratio: float = 1.0   # the bounded policy's ratio
    rounds: int = 4                  # rounds; each runs every policy with and without the long prompt
    out: str = ""


def _one(eng, s: LongPromptSettings, ratio: float, with_prompt: bool, seed: int) -> dict:
    import numpy as np

    from lmopt.engines.slotted import create_slot_engine
    from lmopt.generate import SamplingParams
    from lmopt.scheduler import Scheduler

    rng = np.random.default_rng(seed)
    vocab = eng.info.vocab_size
    long_ids = rng.integers(1, vocab, s.prompt_len).tolist()
    stream_ids = [rng.integers(1, vocab, 4).tolist() for _ in range(s.streams)]
    new = min(eng.info.max_positions - 8, 400)
    sched = Scheduler(create_slot_engine(eng, num_slots=s.streams + 1, max_prefill_chunk=s.max_prefill_chunk),
                      max_queue=4, decode_wait_ratio=ratio)
    try:
        # the costs the bound needs are measured on this run's own steps: one prefill alone, then decode-only steps
        sched.submit(rng.integers(1, vocab, s.max_prefill_chunk).tolist(),
                     SamplingParams(max_new_tokens=1, stop_token_ids=(-1,))).result(60)
        streams = [sched.submit(ids, SamplingParams(max_new_tokens=new, stop_token_ids=(-1,))) for ids in stream_ids]
        deadline = time.time() + 60
        while sched.stats()["tokens"] < 1 + s.streams * 20 and time.time() < deadline:
            time.sleep(0.001)
        t0 = time.perf_counter()
        ttft = chunks = None
        if with_prompt:
            r = sched.submit(long_ids, SamplingParams(max_new_tokens=1, stop_token_ids=(-1,))).result(120)
            end, ttft = r.first_token_at, (r.first_token_at - r.submitted_at) * 1e3
        else:
            n0 = sched.stats()["steps"]
            while sched.stats()["steps"] < n0 + 40 and time.time() < deadline:
                time.sleep(0.001)
            end = time.perf_counter()
        while not any(st[0] > end for st in list(sched.timeline)) and time.time() < deadline + 60:
            time.sleep(0.001)    # the step that gave the first token is in the timeline once the next one ends
        for x in streams:
            x.cancel()
        steps = [st for st in list(sched.timeline) if st[0] + st[1] >= t0 and st[0] <= end]
    finally:
        sched.close()
    itl = [wall * 1e3 for _, wall, _, rows, _ in steps if rows >= s.streams]
    if with_prompt:
        chunks = [pf for *_, pf in steps if pf]
    return {"itl_ms": itl, "ttft_ms": ttft, "chunks": chunks}


def run_long_prompt(*, settings: LongPromptSettings) -> dict:
    from lmopt import results as R
    from lmopt.engines import create_engine
    from lmopt.paths import model_slug

    s = settings
    policies = {"bounded": s.decode_wait_ratio, "chunk-only": 0.0}
    eng = create_engine(s.engine, s.model, "fp32", artifacts=s.artifacts, threads=s.threads or None)
    raw = {p: {"with": [], "without": []} for p in policies}
    try:
        _one(eng, s, s.decode_wait_ratio, True, 0)   # warm-up: the engine's first shapes are slow
        for k in range(s.rounds):
            order = [(p, w) for p in policies for w in (True, False)]
            for p, w in (order if k % 2 == 0 else order[::-1]):
                res = _one(eng, s, policies[p], w, 1000 + k)
                raw[p]["with" if w else "without"].append(res)
                log.info("round %d %s %s: ITL p99 %.2f ms over %d steps%s", k, p, "with" if w else "without",
                         R.percentile(res["itl_ms"], 99) or 0, len(res["itl_ms"]),
                         f", TTFT {res['ttft_ms']:.0f} ms, chunks {res['chunks']}" if w else "")
    finally:
        eng.close()
    summary = {}
    for p, d in raw.items():
        with_ = [x for r in d["with"] for x in r["itl_ms"]]
        without = [x for r in d["without"] for x in r["itl_ms"]]
        a, b = R.stats(with_), R.stats(without)
        summary[p] = {"decode_wait_ratio": policies[p], "itl_ms_with_long_prompt": a, "itl_ms_without": b,
                      "itl_p99_ratio": round(a["p99"] / b["p99"], 3) if a["p99"] and b["p99"] else None,
                      "itl_p50_ratio": round(a["p50"] / b["p50"], 3) if a["p50"] and b["p50"] else None,
                      "itl_max_ratio": round(a["max"] / b["max"], 3) if a["max"] and b["max"] else None,
                      # each round's with/without p99 ratio (the two ran back to back), median over rounds: one
                      # round hit by a neighbour's burst does not decide it
                      "itl_p99_ratio_median_of_rounds": R.percentile(
                          [R.percentile(w["itl_ms"], 99) / R.percentile(o["itl_ms"], 99)
                           for w, o in zip(d["with"], d["without"]) if w["itl_ms"] and o["itl_ms"]], 50),
                      "steps_with_long_prompt": a["count"],
                      "long_prompt_ttft_ms": R.stats([r["ttft_ms"] for r in d["with"]]),
                      "chunks": [r["chunks"] for r in d["with"]]}
        log.info("%s: ITL p99 %.2f ms with the long prompt (%d steps), %.2f ms without (x%s, median of rounds x%.2f); "
                 "p50 x%s; max x%s; its TTFT p50 %.0f ms", p, a["p99"], a["count"], b["p99"], summary[p]["itl_p99_ratio"],
                 summary[p]["itl_p99_ratio_median_of_rounds"],
                 summary[p]["itl_p50_ratio"], summary[p]["itl_max_ratio"], summary[p]["long_prompt_ttft_ms"]["p50"])
    try:
        import os

        load = os.getloadavg()
    except OSError:
        load = None
    doc = R.envelope("long-prompt-itl", settings=asdict(s), summary=summary, samples=raw,
                     versions=R.versions("onnxruntime", "numpy"), load_average=load)
    out = s.out or Path(s.artifacts) / model_slug(s.model) / "profile" / "long-prompt-itl.json"
    # where it goes in the repository: results/<machine>/<model>/long-prompt-itl.json (R.machine_tag)
    log.info("Saving %s", R.write_json(out, doc))
    return doc


def build_parser():
    p = cli.parser(__doc__)
    cli.add_settings(p, LongPromptSettings)
    return p


main = cli.main_for(build_parser, LongPromptSettings, run_long_prompt)

if __name__ == "__main__":
    cli.run(main)
