"""The workload `profile/run_nsys_profile.py` profiles: text generation with one engine, warm-up, then measured rounds.

    python -m lmopt.profiling.workload --settings settings.json --wall-out wall.json   # what nsys runs (not by hand)

Reads:  settings.json (a ProfileSettings, written by profile/run_nsys_profile.py); the engine's artifacts (ort: the export or
        quantize manifest; torch: the model itself)
Writes: wall.json — the measured wall time of the steady-state rounds, their decode-step counts and the tokens

The measured rounds run inside one NVTX range `profile` (nsys captures only that range: warm-up stays outside), each
round inside `generate`; the generation loop's own ranges (tokenize, prefill, h2d, d2h, sample, decode_step,
detokenize) sit under it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT_RANGE = "profile"
ROUND_RANGE = "generate"


@dataclass
class ProfileSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    engine: str = "ort"            # ort | torch | trt
    precision: str = "fp32"        # fp32 | fp16 | int8
    device: str = "cpu"            # cpu | cuda
    profiler: str = "auto"  # nsys (Nsight Systems), torch (PyTorch profiler + Chrome trace), auto = nsys if installed
    batch_size: int = 1
    prompt_len: int = 32           # prompt tokens per row
    max_new_tokens: int = 32       # tokens per round (exactly)
    warmup: int = 2                # rounds before the capture range (not profiled)
    repeats: int = 5               # profiled rounds
    threads: int = 0               # engine threads (0 = library default)
    pinned_repeats: int = 30       # copies per mode in the pinned vs pageable comparison (GPU only)
    nsys_timeout: int = 900        # seconds; the nsys agent has been seen spinning after the app exited
    out: str = ""                  # output folder (default artifacts/<model>/profile/<variant>)


def prepare(s):
    """(engine, tokenizer, text prompts, sampling params) for a ProfileSettings."""
    from lmopt.data import builtin_text
    from lmopt.engines import create_engine
    from lmopt.errors import UserError
    from lmopt.generate import SamplingParams
    from lmopt.models import load_tokenizer

    if s.batch_size < 1 or s.prompt_len < 1 or s.max_new_tokens < 2 or s.repeats < 1 or s.warmup < 0:
        raise UserError("need --batch-size >= 1, --prompt-len >= 1, --max-new-tokens >= 2, --repeats >= 1, "
                        "--warmup >= 0")
    engine = create_engine(s.engine, s.model, precision=s.precision, device=s.device, artifacts=s.artifacts,
                           threads=s.threads or None)
    tok = load_tokenizer(s.model)
    text = builtin_text("eval")
    try:  # verbose=False: the whole text is longer than the model's context, which is fine for slicing prompts
        ids = tok(text, verbose=False)["input_ids"]
    except TypeError:  # a tokenizer without the flag
        ids = tok(text)["input_ids"]
    # different real text per row, the same every run
    prompts = [tok.decode(ids[i * 97: i * 97 + s.prompt_len]) for i in range(s.batch_size)]
    # a stop id no model emits: every round runs exactly max_new_tokens (generate_text would add EOS otherwise), so
    # the decode-step count is known and rounds are comparable
    params = SamplingParams(max_new_tokens=s.max_new_tokens, stop_token_ids=(-1,))
    return engine, tok, prompts, params


def run_rounds(engine, tok, prompts, params, rounds: int) -> dict:
    from lmopt.generate import generate_text
    from lmopt.nvtx_ranges import nvtx_range

    walls, steps, tokens = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with nvtx_range(ROUND_RANGE):
            _, out = generate_text(engine, tok, prompts, params)
            engine.synchronize()
        walls.append(time.perf_counter() - t0)
        steps.append(len(out.step_s))
        tokens.append(out.new_tokens)
    return {"round_wall_s": walls, "wall_s": sum(walls), "decode_steps": steps, "new_tokens": tokens}


def warmup_and_measure(s, on_measure=None) -> dict:
    """Warm up outside the `profile` range, then run the measured rounds inside it. `on_measure` is an optional
    context manager (the PyTorch profiler) entered around the measured part only."""
    from contextlib import nullcontext

    from lmopt.nvtx_ranges import nvtx_range

    engine, tok, prompts, params = prepare(s)
    t0 = time.perf_counter()
    run_rounds(engine, tok, prompts, params, s.warmup)
    warm_s = time.perf_counter() - t0
    with on_measure if on_measure is not None else nullcontext():
        with nvtx_range(ROOT_RANGE):
            res = run_rounds(engine, tok, prompts, params, s.repeats)
    res["warmup_s"] = warm_s
    res["engine"] = vars(engine.info)
    engine.close()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", required=True, help="settings JSON written by run_nsys_profile.py")
    p.add_argument("--wall-out", required=True, help="where to write the measured wall times")
    args = p.parse_args(argv)
    s = ProfileSettings(**json.loads(Path(args.settings).read_text()))
    res = warmup_and_measure(s)
    Path(args.wall_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from lmopt.errors import cli_main

    sys.exit(cli_main(main))
