"""Text in, text out through any engine: the shared generation loop (lmopt.generate) on the command line.

    python serve/client/generate.py --prompt "def read_file(" --max-new-tokens 32
    python serve/client/generate.py --engine ort --precision int8 --prompt "The" --prompt "import" --temperature 0.8 --seed 1
    python serve/client/generate.py --engine trt --precision fp16 --device cuda --prompt "The" --stream

Reads:  the model (torch engine) or the ONNX/TensorRT artifacts its manifests name (ort: artifacts/<model>/export/fp32
        or artifacts/<model>/quantize/<variant>; trt: the stage-3 engine), the model's tokenizer.
Writes: nothing; prints each prompt's completion (or, with --json, one JSON object with token ids, texts, finish
        reasons and timings, for scripts and tests).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
from dataclasses import dataclass, field


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging

log = get_logger("generate")


@dataclass
class GenerateSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    engine: str = "torch"           # torch, ort or trt
    precision: str = "fp32"         # fp32, int8 or fp16
    device: str = "cpu"             # cpu or cuda
    prompt: list[str] = field(default_factory=lambda: ["The built-in function"])
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False        # generate exactly max_new_tokens (benchmarks, parity checks)
    stream: bool = False            # print each token as it is generated
    json: bool = False              # print one JSON object (token ids, texts, timings)
    threads: int = 0                # intra-op threads (0 = library default)


def run_generate(*, settings: GenerateSettings) -> dict:
    from lmopt.engines import ENGINES, create_engine
    from lmopt.generate import SamplingParams, generate_text
    from lmopt.models import load_tokenizer

    s = settings
    # cheap checks first, before any model or session is loaded
    if s.engine not in ENGINES:
        raise UserError(f"unknown engine '{s.engine}' — use one of {', '.join(ENGINES)}")
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, seed=s.seed, stop_strings=tuple(s.stop))
    params.check()
    if s.ignore_eos:
        params.stop_token_ids = (-1,)  # a stop id no token has: generate_text then adds no EOS stop
    engine = create_engine(s.engine, s.model, precision=s.precision, device=s.device, artifacts=s.artifacts,
                           threads=s.threads or None)
    tok = load_tokenizer(s.model)

    on_token = None
    if s.stream:
        def on_token(row: int, token: int):
            print(f"[{row}] {tok.decode([token])!r}", flush=True)
    texts, out = generate_text(engine, tok, s.prompt, params, on_token=on_token)
    engine.close()
    result = {"engine": s.engine, "precision": s.precision, "device": s.device, "variant": engine.info.variant,
              "prompts": s.prompt, "texts": texts, "tokens": out.tokens, "finish_reasons": out.finish_reasons,
              "prompt_lengths": out.prompt_lengths, "ttft_s": out.ttft_s, "total_s": out.total_s,
              "new_tokens": out.new_tokens}
    if s.json:
        print(json.dumps(result))
    else:
        for p, t, r in zip(s.prompt, texts, out.finish_reasons):
            print(f"{p}{t}\n  [{r}]")
        log.info("%d tokens in %.3f s (TTFT %.1f ms)", out.new_tokens, out.total_s, out.ttft_s * 1e3)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    d = GenerateSettings()
    cli.add_settings(p, GenerateSettings, skip=("prompt", "seed", "stop"))
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt text; repeat for a batch (default: {d.prompt[0]!r})")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (same seed, same engine, same text)")
    p.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    d = GenerateSettings()
    args.prompt = args.prompt or d.prompt
    args.stop = args.stop or d.stop
    settings = cli.settings_from(GenerateSettings, args)
    run_generate(settings=settings)
    return 0


if __name__ == "__main__":
    cli.run(main)
