"""llama.cpp's files of a model, for the llama.cpp rows of the benchmark: the Hugging Face weights converted with the
converter llama.cpp ships (convert_hf_to_gguf.py, vendored in the llama-cpp-python sdist) to F32, then quantized
with llama.cpp's default recipes (what `llama-quantize` runs) to Q8_0 and Q4_0, each checked against PyTorch.

    make llamacpp                                     # once: builds llama-cpp-python 0.3.36 for this CPU
    python convert/export_gguf.py --model llama-small                 # f32, q8_0, q4_0
    make gguf MODEL=gpt2-124m

Reads:  the model (built-in, preset with its seeded random weights, or a Hugging Face folder), saved with its
        tokenizer to a temporary Hugging Face folder; the built-in evaluation text (data/eval.txt) for the checks.
Writes: artifacts/<model>/gguf/<type>/{model.gguf, manifest.json} for each of --types.

Checks (recorded in the manifest): on --check-prompts windows of the evaluation text, the last position's logits of
llama.cpp vs PyTorch FP32 (max |Δ| relative to the largest |logit|) and greedy agreement over --check-tokens tokens.
F32 must match PyTorch (relative max |Δ| within --f32-tolerance), or nothing is written; the quantized files' figures
are recorded as they are (llama.cpp's recipes have no accuracy budget of ours to meet).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("gguf")


@dataclass
class GgufSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    types: str = "f32,q8_0,q4_0"            # comma-separated llama.cpp file types (f32 first: the others come from it)
    check_prompts: int = 2                  # evaluation-text windows compared with PyTorch
    check_tokens: int = 16                  # greedy tokens compared per prompt
    f32_tolerance: float = 1e-3             # F32: max |Δlogits| / max |logit| allowed vs PyTorch
    threads: int = 0                        # llama.cpp threads (0 = every core)


def _check(engine_path: Path, precision: str, ref: dict, s: GgufSettings, max_pos: int) -> dict:
    """llama.cpp's logits and greedy tokens vs the PyTorch reference."""
    import numpy as np

    from lmopt.engines.llamacpp import LlamaCppEngine
    from lmopt.generate import SamplingParams, generate

    eng = LlamaCppEngine(engine_path, precision, s.threads or None, max_positions=max_pos)
    try:
        rel, agree = [], []
        for prompt, logits, tokens in zip(ref["prompts"], ref["logits"], ref["tokens"]):
            ids = np.array([prompt], dtype=np.int64)
            got, _ = eng.prefill(ids, np.ones_like(ids), np.arange(len(prompt))[None])
            rel.append(float(np.abs(got[0] - logits).max() / np.abs(logits).max()))
            out = generate(eng, [prompt], SamplingParams(max_new_tokens=len(tokens))).tokens[0]
            same = next((i for i, (a, b) in enumerate(zip(out, tokens)) if a != b), len(tokens))
            agree.append(same / len(tokens))
        return {"max_rel_dlogits": round(max(rel), 6), "greedy_agreement": round(sum(agree) / len(agree), 4),
                "prompts": len(ref["prompts"]), "tokens_per_prompt": s.check_tokens}
    finally:
        eng.close()


def _reference(model, tok, s: GgufSettings, max_pos: int) -> dict:
    """PyTorch FP32's last-position logits and greedy tokens on windows of the evaluation text."""
    import torch

    from lmopt.data import builtin_text, token_windows

    n = min(32, max_pos - s.check_tokens)
    prompts = [w[:n] for w in token_windows(tok, builtin_text("eval"), s.check_prompts, n, "evaluation text")]
    logits, tokens = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0, -1].float().numpy())
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.check_tokens,
                                 min_new_tokens=s.check_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens.append(out[0, len(p):].tolist())
    return {"prompts": prompts, "logits": logits, "tokens": tokens}


def _legacy_gpt2_keys(config: Path) -> None:
    """The converter reads GPT-2's context from `n_ctx`, a key the published GPT-2 configs carry but transformers no
    longer writes for a config built in code (our presets): add it, equal to n_positions."""
    import json

    d = json.loads(config.read_text())
    if d.get("model_type") == "gpt2" and "n_ctx" not in d:
        d["n_ctx"] = d["n_positions"]
        config.write_text(json.dumps(d, indent=2))


def export(*, settings: GgufSettings) -> dict:
    from lmopt.llamacpp import (FILE_TYPES, VERSION, convert_to_gguf, gguf_tensors, gguf_weight_bytes,
                                import_llama_cpp, quantize_gguf, vendor_dir)
    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.models import load_model, load_tokenizer, model_shape
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir

    s = settings
    types = [t.strip().lower() for t in s.types.split(",") if t.strip()]
    known = set(FILE_TYPES.values())
    bad = [t for t in types if t not in known]
    if not types or bad:
        raise UserError(f"--types must list llama.cpp file types from {', '.join(sorted(known))} (got '{s.types}')")
    import_llama_cpp()
    check_writable(s.artifacts)
    precision = {v: k for k, v in FILE_TYPES.items()}
    model = load_model(s.model)
    tok = load_tokenizer(s.model)
    shape = model_shape(model.config)
    timings: dict[str, float] = {}
    manifests = {}
    with tempfile.TemporaryDirectory(prefix="lmopt-gguf-") as work:
        work = Path(work)
        hf = work / "hf"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        _legacy_gpt2_keys(hf / "config.json")
        with timed(log, "PyTorch reference", timings, "reference_s"):
            ref = _reference(model, tok, s, shape["max_positions"])
        del model
        f32 = work / "model-f32.gguf"
        with timed(log, "convert_hf_to_gguf.py --outtype f32", timings, "convert_s"):
            convert_to_gguf(hf, f32, "f32")
        for t in types:
            out = work / f"model-{t}.gguf"
            if t == "f32":
                out = f32
            else:
                with timed(log, f"quantize {t}", timings, f"quantize_{t}_s"):
                    quantize_gguf(f32, out, t, s.threads)
            with timed(log, f"check {t} vs PyTorch", timings, f"check_{t}_s"):
                acc = _check(out, precision[t], ref, s, shape["max_positions"])
            log.info("%s: max |Δlogits| / max |logit| %.2e, greedy agreement %.0f%%", t, acc["max_rel_dlogits"],
                     100 * acc["greedy_agreement"])
            if t == "f32" and acc["max_rel_dlogits"] > s.f32_tolerance:
                raise UserError(f"llama.cpp F32 differs from PyTorch (max |Δlogits| {acc['max_rel_dlogits']:.2e} of the "
                                f"largest logit > --f32-tolerance {s.f32_tolerance}) — nothing written; the converter "
                                "does not support this model faithfully")
            tensors = gguf_tensors(out)
            types_count: dict[str, int] = {}
            for x in tensors.values():
                types_count[x["type"]] = types_count.get(x["type"], 0) + 1
            final = stage_dir(s.artifacts, s.model, "gguf", t)
            with staging_dir(final) as tmp:
                if out == f32:  # the quantized types are made from it
                    shutil.copyfile(out, tmp / "model.gguf")
                else:
                    out.replace(tmp / "model.gguf")
                man = {"stage": "gguf", "variant": t, "model": model_slug(s.model),
                       "model_spec": s.model, "precision": precision[t],
                       "targets": ["llama.cpp"], "file_type": t,
                       "converter": f"llama-cpp-python {VERSION} sdist: vendor/llama.cpp/convert_hf_to_gguf.py"
                                    + ("" if t == "f32" else f" + llama_model_quantize({t})"),
                       "converter_path": str(vendor_dir() / "convert_hf_to_gguf.py"),
                       "outputs": {"gguf": "model.gguf", "files": {"model.gguf": file_entry(tmp / "model.gguf")}},
                       "model_shape": shape, "tensor_types": dict(sorted(types_count.items())),
                       "weight_bytes_per_step": gguf_weight_bytes(tensors),
                       "settings": asdict(s), "versions": {**package_versions("torch", "transformers", "numpy"),
                                                           "llama-cpp-python": VERSION},
                       "timings_s": timings, "check_vs_torch_fp32": acc}
                write_manifest(tmp, man)
            manifests[t] = man
            log.info("Saving GGUF model to %s", final / "model.gguf")
    return manifests


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, GgufSettings)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    t0 = time.time()
    export(settings=cli.settings_from(GgufSettings, args))
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
