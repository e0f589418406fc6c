"""Stage 1: export a Hugging Face causal LM to ONNX with KV cache, and prove it matches PyTorch.

    python convert/export_onnx.py --model tiny                # built-in model (default)
    python convert/export_onnx.py --model gpt2-124m           # random-weight preset
    python convert/export_onnx.py --model /path/to/hf_folder  # any local HF model of a supported architecture

Reads:  the model (models/tiny, a preset built on the fly, a local folder, or a hub id from the local cache)
Writes: artifacts/<model>/export/fp32/{model.onnx[, model.onnx_data], config.json, tokenizer files, manifest.json}

The exporter is optimum's (task text-generation-with-past): one merged graph, prefill = zero-length past.
Inputs: input_ids, attention_mask [batch, past+seq], position_ids, past_key_values.N.{key,value}
[batch, kv_heads, past, head_dim]; outputs logits and present.N.{key,value}. Dynamic axes for batch, sequence and
past length are checked by running several shapes. Models over 2 GB are written with external data.

Validation (fatal when out of tolerance, recorded in the manifest either way): max |Δlogits| vs PyTorch for a
prefill and 8 decode steps with the KV cache, greedy tokens identical, and a set of shapes that must run.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("export")


@dataclass
class ExportSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    opset: int = 18
    atol: float = 1e-4            # max |Δlogits| accepted vs PyTorch
    decode_steps: int = 8         # decode steps with KV cache compared logit by logit
    greedy_tokens: int = 32       # greedy tokens that must be identical
    threads: int = 0              # ONNX Runtime / torch threads (0 = library default)


def export(*, settings: ExportSettings) -> dict:
    import torch

    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.models import check_supported, load_config, load_model, load_tokenizer, model_shape, resolve
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir

    s = settings
    spec = resolve(s.model)
    check_writable(s.artifacts)
    cfg = load_config(s.model)
    check_supported(cfg, s.model)
    if s.threads:
        torch.set_num_threads(s.threads)
    timings: dict[str, float] = {}
    with timed(log, "load model", timings, "load_s"):
        model = load_model(s.model)
        tokenizer = load_tokenizer(s.model)
    shape = model_shape(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %s, %d layers, hidden %d, %d/%d heads, vocab %d, %.1fM params", s.model, shape["model_type"],
             shape["num_layers"], shape["hidden_size"], shape["num_heads"], shape["num_kv_heads"],
             shape["vocab_size"], n_params / 1e6)

    final = stage_dir(s.artifacts, s.model, "export", "fp32")
    with staging_dir(final) as tmp:
        from optimum.exporters.onnx import onnx_export_from_model

        with timed(log, "ONNX export", timings, "export_s"):
            onnx_export_from_model(model, tmp, task="text-generation-with-past", opset=s.opset, do_validation=False)
        tokenizer.save_pretrained(tmp)
        onnx_path = tmp / "model.onnx"
        log.info("Saving ONNX model to %s", final / "model.onnx")
        with timed(log, "validation vs PyTorch", timings, "validate_s"):
            checks = validate_export(model, tokenizer, onnx_path, s)
        checks.print(log)
        payload = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        manifest = {
            "stage": "export", "variant": "fp32", "model": model_slug(s.model), "model_spec": s.model,
            "model_kind": spec.kind, "precision": "fp32", "targets": ["onnxruntime", "tensorrt"],
            "model_shape": shape, "parameters": n_params,
            "inputs": {"model": str(spec.path) if spec.path else s.model},
            "outputs": {"onnx": "model.onnx", "files": {n: file_entry(tmp / n) for n in payload}},
            "settings": asdict(s),
            "versions": package_versions("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"),
            "timings_s": timings,
            "validation": checks.to_dict(),
        }
        if not checks.passed:
            raise UserError(f"export validation failed ({', '.join(c.name for c in checks.checks if not c.passed)}) "
                            "— nothing written; pass a larger --atol only if you accept the difference")
        write_manifest(tmp, manifest)
    log.info("export finished: %s", final)
    return manifest


def validate_export(model, tokenizer, onnx_path: Path, s: ExportSettings):
    """ORT vs PyTorch: logits of a prefill + decode steps, greedy tokens, and shapes that must run."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    from lmopt.data import builtin_text
    from lmopt.engines.ort_engine import OrtEngine
    from lmopt.engines.torch_engine import TorchEngine
    from lmopt.generate import SamplingParams, generate, pad_batch
    from lmopt.models import model_shape
    from lmopt.validate import Checklist

    shape = model_shape(model.config)
    ort_engine = OrtEngine(onnx_path, "fp32", "cpu", s.threads or None, max_positions=shape["max_positions"])
    pt_engine = TorchEngine.__new__(TorchEngine)  # reuse the loaded model instead of loading it again
    pt_engine.torch, pt_engine.device, pt_engine.model = torch, "cpu", model
    pt_engine.info = ort_engine.info

    checks = Checklist(f"export validation ({onnx_path.name} vs PyTorch)")
    vocab = shape["vocab_size"]
    text_ids = tokenizer(builtin_text("eval"))["input_ids"]
    # ids of the real text are in range for every preset (the built-in tokenizer is smaller than any preset vocab)
    prompts = [text_ids[:24], text_ids[100:113]]
    ids, mask, pos = pad_batch(prompts, tokenizer.pad_token_id or 0)

    def torch_logits(ids, mask, pos, past):
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), out.past_key_values

    # prefill: compare every position that is not padding
    sess = ort_engine.session
    feeds = ort_engine._feeds(ids, mask, pos)
    empty = np.zeros((len(prompts), ort_engine.kv_heads, 0, ort_engine.head_dim), dtype=np.float32)
    feeds.update({n: empty for n in ort_engine.past_names})
    outs = sess.run(None, feeds)
    ref, past = torch_logits(ids, mask, pos, DynamicCache())
    real = mask.astype(bool)
    d_prefill = float(np.abs(outs[0][real] - ref[real]).max())
    ort_past = outs[1:]
    d_decode = 0.0
    last = pos[:, -1].copy()
    nxt = ref[:, -1].argmax(-1)
    for _ in range(s.decode_steps):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        last += 1
        step_ids, step_pos = nxt[:, None].astype(np.int64), last[:, None].copy()
        f = ort_engine._feeds(step_ids, mask, step_pos)
        f.update(zip(ort_engine.past_names, ort_past))
        o = sess.run(None, f)
        r, past = torch_logits(step_ids, mask, step_pos, past)
        d_decode = max(d_decode, float(np.abs(o[0] - r).max()))
        ort_past = o[1:]
        nxt = r[:, -1].argmax(-1)
    checks.add("prefill max |Δlogits|", d_prefill <= s.atol, d_prefill, s.atol)
    checks.add(f"{s.decode_steps} decode steps with KV cache max |Δlogits|", d_decode <= s.atol, d_decode, s.atol)

    # greedy tokens
    p = SamplingParams(max_new_tokens=s.greedy_tokens)
    prompt = [text_ids[:16]]
    g_pt = generate(pt_engine, prompt, p).tokens[0]
    g_ort = generate(ort_engine, prompt, p).tokens[0]
    same = sum(a == b for a, b in zip(g_pt, g_ort))
    checks.add(f"{s.greedy_tokens} greedy tokens identical", g_pt == g_ort and len(g_pt) == s.greedy_tokens,
               f"{same}/{len(g_pt)}")

    # dynamic axes: batch 1 and 4, prompt 1 and 64, past 0 and 100 all run and agree with PyTorch
    worst, ran = 0.0, []
    rng = np.random.default_rng(0)
    for batch, past_len, seq in [(1, 0, 1), (4, 0, 64), (1, 100, 1), (4, 100, 64)]:
        total = past_len + seq
        toks = rng.integers(0, min(vocab, len(tokenizer)), size=(batch, total)).astype(np.int64)
        m = np.ones((batch, total), np.int64)
        ps = np.arange(total, dtype=np.int64)[None].repeat(batch, 0)
        if past_len:
            _, pkv = torch_logits(toks[:, :past_len], m[:, :past_len], ps[:, :past_len], DynamicCache())
            ort_past = [t.numpy() for layer in _cache_layers(pkv) for t in layer]
        else:
            pkv = DynamicCache()
            ort_past = [np.zeros((batch, ort_engine.kv_heads, 0, ort_engine.head_dim), np.float32)] * len(
                ort_engine.past_names)
        f = ort_engine._feeds(toks[:, past_len:], m, ps[:, past_len:])
        f.update(zip(ort_engine.past_names, ort_past))
        o = sess.run(None, f)
        r, _ = torch_logits(toks[:, past_len:], m, ps[:, past_len:], pkv)
        if o[0].shape != r.shape:
            raise UserError(f"ONNX output shape {o[0].shape} != PyTorch {r.shape} for batch {batch}, past {past_len}, "
                            f"seq {seq} — the dynamic axes are wrong")
        worst = max(worst, float(np.abs(o[0] - r).max()))
        ran.append(f"b{batch}/past{past_len}/seq{seq}")
    checks.add("dynamic shapes run and match (" + ", ".join(ran) + ")", worst <= s.atol, worst, s.atol)
    ort_engine.close()
    return checks


def _cache_layers(cache):
    """(key, value) per layer from a transformers Cache object."""
    if hasattr(cache, "layers"):
        return [(l.keys, l.values) for l in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, ExportSettings)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = cli.settings_from(ExportSettings, args)
    t0 = time.time()
    export(settings=settings)
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
