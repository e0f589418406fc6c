"""Stage 1: export a Hugging Face causal LM to ONNX with KV cache, and prove it matches PyTorch.

    python convert/export_onnx.py --model tiny                # built-in model (default)
    python convert/export_onnx.py --model gpt2-124m           # random-weight preset
    python convert/export_onnx.py --model /path/to/hf_folder  # any local HF model of a supported architecture
    python convert/export_onnx.py --model llama-1b --dtype fp16 --device cuda   # FP16 graph for ONNX Runtime CUDA
    python convert/export_onnx.py --model llama-1b --dtype fp16 --attention gqa --max-len 4096   # fused, fixed KV

Reads:  the model (models/tiny, a preset built on the fly, a local folder, or a hub id from the local cache)
Writes: artifacts/<model>/export/fp32/{model.onnx[, model.onnx_data], config.json, tokenizer files, manifest.json}
        with --dtype fp16: artifacts/<model>/export/fp16/{model.onnx[, model.onnx_data], tokenizer, manifest.json}
        with --attention gqa: artifacts/<model>/export/<dtype>-gqa/{model.onnx[, model.onnx_data], tokenizer, manifest}

The exporter is optimum's (task text-generation-with-past): one merged graph, prefill = zero-length past.
Inputs: input_ids, attention_mask [batch, past+seq], position_ids, past_key_values.N.{key,value}
[batch, kv_heads, past, head_dim]; outputs logits and present.N.{key,value}. Dynamic axes for batch, sequence and
past length are checked by running several shapes. Models over 2 GB are written with external data.

Validation (fatal when out of tolerance, recorded in the manifest either way): max |Δlogits| vs PyTorch for a
prefill and 8 decode steps with the KV cache, greedy tokens identical, and a set of shapes that must run.

--dtype fp16 (the ONNX Runtime CUDA graph): the FP32 export above, then ONNX Runtime's transformer optimizer and
FP16 converter (lmopt.onnx_graph.ort_fp16_graph; KV cache and logits in FP16, only the last position's logits
returned). It is checked on --device's execution provider (CPU EP, or CUDA EP with onnxruntime-gpu) against the
FP32 PyTorch model: last-position logits of a left-padded batch within --fp16-rtol of the largest logit, for the
prefill and the decode steps, and greedy tokens identical.

--attention gqa: not optimum's graph but one built from the weights (lmopt.onnx_gqa): GroupQueryAttention per layer
over a fixed-size KV buffer of --max-len positions, written in place, so ONNX Runtime's CUDA EP can replay the decode
step as a CUDA graph (engine `ort-gqa`). Checked like --dtype fp16, through the engine, on --device.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

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
    dtype: str = "fp32"           # fp32 (every target) | fp16 (ONNX Runtime; TensorRT's FP16 comes from convert_fp16)
    device: str = "cpu"           # where PyTorch runs the export and ONNX Runtime the validation: cpu | cuda
    fp16_rtol: float = 0.01       # --dtype fp16: max |Δlogits| / max |logit| vs FP32 PyTorch
    attention: str = "sdpa"       # sdpa (optimum's export) | gqa (GroupQueryAttention graph, fixed KV buffer)
    max_len: int = 0              # --attention gqa: KV buffer positions (0 = the model's context)


def check_settings(s: ExportSettings) -> None:
    if s.dtype not in ("fp32", "fp16"):
        raise UserError(f"unknown --dtype '{s.dtype}' — use fp32 or fp16")
    if s.device not in ("cpu", "cuda") and not s.device.startswith("cuda:"):
        raise UserError(f"unknown --device '{s.device}' — use cpu or cuda")
    if s.attention not in ("sdpa", "gqa"):
        raise UserError(f"unknown --attention '{s.attention}' — use sdpa (optimum's export) or gqa")
    if s.max_len < 0 or (s.max_len and s.attention != "gqa"):
        raise UserError("--max-len sizes the KV buffer of --attention gqa: give a positive number with --attention gqa")
    if s.dtype == "fp32" and s.device != "cpu" and s.attention == "sdpa":
        raise UserError("the FP32 export is the same on every device — drop --device (or add --dtype fp16)")
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but torch sees no CUDA device — run on a GPU machine or use --device cpu")
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("--device cuda validates on ONNX Runtime's CUDA execution provider, which this "
                            "onnxruntime lacks — pip install onnxruntime-gpu (CUDA 13 build)")


def export(*, settings: ExportSettings) -> dict:
    from lmopt.models import check_supported, load_config, load_model, load_tokenizer, model_shape, resolve

    s = settings
    spec = resolve(s.model)  # before torch loads: a model that cannot be found fails in a second
    import torch

    from lmopt.manifest import file_entry, package_versions
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir

    check_settings(s)
    check_writable(s.artifacts)
    cfg = load_config(s.model)
    check_supported(cfg, s.model)
    if s.threads:
        torch.set_num_threads(s.threads)
    timings: dict[str, float] = {}
    with timed(log, "load model", timings, "load_s"):
        model = load_model(s.model, device=s.device)
        tokenizer = load_tokenizer(s.model)
    shape = model_shape(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %s, %d layers, hidden %d, %d/%d heads, vocab %d, %.1fM params", s.model, shape["model_type"],
             shape["num_layers"], shape["hidden_size"], shape["num_heads"], shape["num_kv_heads"],
             shape["vocab_size"], n_params / 1e6)

    if s.attention == "gqa":
        return export_gqa(model, tokenizer, spec, shape, n_params, timings, s)
    final = stage_dir(s.artifacts, s.model, "export", s.dtype)
    with staging_dir(final) as tmp:
        from optimum.exporters.onnx import onnx_export_from_model

        fp32_dir = tmp / "fp32" if s.dtype == "fp16" else tmp
        with timed(log, "ONNX export", timings, "export_s"):
            onnx_export_from_model(model, fp32_dir, task="text-generation-with-past", opset=s.opset,
                                   do_validation=False, device=s.device)
        tokenizer.save_pretrained(tmp)
        onnx_path = tmp / "model.onnx"
        extra = {}
        if s.dtype == "fp16":
            import shutil

            from lmopt.onnx_graph import last_token_logits, ort_fp16_graph

            with timed(log, "ONNX Runtime optimizer + FP16 conversion", timings, "fp16_s"):
                fused = ort_fp16_graph(fp32_dir / "model.onnx", tmp / "model.full.onnx", shape,
                                       use_gpu=s.device.startswith("cuda"))
                last_token_logits(tmp / "model.full.onnx", onnx_path)
            (tmp / "model.full.onnx").unlink()
            shutil.rmtree(fp32_dir)
            extra["fused_operators"] = fused
            log.info("fused by ONNX Runtime's optimizer: %s", fused or "nothing")
        log.info("Saving ONNX model to %s", final / "model.onnx")
        with timed(log, "validation vs PyTorch", timings, "validate_s"):
            checks = (validate_fp16(model, tokenizer, onnx_path, s) if s.dtype == "fp16"
                      else validate_export(model, tokenizer, onnx_path, s))
        checks.print(log)
        payload = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        manifest = {
            "stage": "export", "variant": s.dtype, "model": model_slug(s.model), "model_spec": s.model,
            "model_kind": spec.kind, "precision": s.dtype,
            "targets": ["onnxruntime", "tensorrt"] if s.dtype == "fp32" else ["onnxruntime"], **extra,
            "model_shape": shape, "parameters": n_params,
            "inputs": {"model": str(spec.path) if spec.path else s.model},
            "outputs": {"onnx": "model.onnx", "files": {n: file_entry(tmp / n) for n in payload}},
            "settings": asdict(s),
            "versions": package_versions("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"),
            "timings_s": timings,
            "validation": checks.to_dict(),
        }
        _finish(tmp, final, manifest, checks, s)
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


def export_gqa(model, tokenizer, spec, shape: dict, n_params: int, timings: dict, s: ExportSettings) -> dict:
    """--attention gqa: the fused graph built from the weights, checked through the ort-gqa engine."""
    from lmopt.engines.ort_gqa import OrtGqaEngine
    from lmopt.manifest import file_entry, package_versions
    from lmopt.onnx_gqa import build_gqa_decoder
    from lmopt.paths import model_slug, stage_dir, staging_dir

    variant = f"{s.dtype}-gqa"
    final = stage_dir(s.artifacts, s.model, "export", variant)
    with staging_dir(final) as tmp:
        with timed(log, "GQA graph build", timings, "export_s"):
            graph = build_gqa_decoder(model, tmp / "model.onnx", dtype=s.dtype, max_len=s.max_len or None)
        tokenizer.save_pretrained(tmp)
        log.info("Saving ONNX model to %s (%s)", final / "model.onnx", graph["op_counts"])
        with timed(log, "validation vs PyTorch", timings, "validate_s"):
            engine = OrtGqaEngine(tmp / "model.onnx", s.dtype, s.device, s.threads or None, variant=variant,
                                  max_len=graph["max_len"], max_positions=shape["max_positions"])
            checks = validate_fp16(model, tokenizer, tmp / "model.onnx", s, engine=engine)
        checks.print(log)
        payload = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        manifest = {
            "stage": "export", "variant": variant, "model": model_slug(s.model), "model_spec": s.model,
            "model_kind": spec.kind, "precision": s.dtype, "targets": ["onnxruntime"], "engine": "ort-gqa",
            "graph": graph, "model_shape": shape, "parameters": n_params,
            "inputs": {"model": str(spec.path) if spec.path else s.model},
            "outputs": {"onnx": "model.onnx", "files": {n: file_entry(tmp / n) for n in payload}},
            "settings": asdict(s),
            "versions": package_versions("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"),
            "timings_s": timings, "validation": checks.to_dict(),
        }
        _finish(tmp, final, manifest, checks, s)
    return manifest


def validate_fp16(model, tokenizer, onnx_path: Path, s: ExportSettings, engine=None):
    """An ONNX Runtime graph (--device's execution provider) vs the FP32 PyTorch model, through the same engine
    interface the benchmark uses: last-position logits of a left-padded batch (prefill and decode steps), then
    greedy tokens. The bar: --fp16-rtol x the largest logit in FP16, --atol in FP32."""
    import numpy as np
    import torch

    from lmopt.data import builtin_text
    from lmopt.engines.ort_engine import OrtEngine
    from lmopt.engines.torch_engine import TorchEngine
    from lmopt.generate import SamplingParams, generate, pad_batch
    from lmopt.models import model_shape
    from lmopt.validate import Checklist

    shape = model_shape(model.config)
    ort_engine = engine or OrtEngine(onnx_path, "fp16", s.device, s.threads or None, variant="fp16",
                                     max_positions=shape["max_positions"])
    pt_engine = TorchEngine.__new__(TorchEngine)  # reuse the loaded FP32 model
    pt_engine.torch, pt_engine.device, pt_engine.model = torch, s.device, model
    pt_engine.info = ort_engine.info

    checks = Checklist(f"{s.dtype.upper()} {s.attention} export validation ({onnx_path.name} on {s.device} vs FP32 "
                       "PyTorch)")
    text_ids = tokenizer(builtin_text("eval"))["input_ids"]
    prompts = [text_ids[:24], text_ids[100:113]]
    ids, mask, pos = pad_batch(prompts, tokenizer.pad_token_id or 0)
    (lo, so), (lt, st) = ort_engine.prefill(ids, mask, pos), pt_engine.prefill(ids, mask, pos)
    scale = float(np.abs(lt).max())
    d_prefill = float(np.abs(lo - lt).max())
    d_decode = 0.0
    nxt, last = lt.argmax(-1), pos[:, -1:].copy()
    for _ in range(s.decode_steps):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        last = last + 1
        (lo, so), (lt, st) = (ort_engine.decode(so, nxt[:, None], mask, last),
                              pt_engine.decode(st, nxt[:, None], mask, last))
        d_decode = max(d_decode, float(np.abs(lo - lt).max()))
        nxt = lt.argmax(-1)
    ort_engine.release(so)
    bar = s.fp16_rtol * scale if s.dtype == "fp16" else s.atol
    what = f"bar {s.fp16_rtol:g} x max |logit| {scale:.3g}" if s.dtype == "fp16" else f"bar --atol {s.atol:g}"
    checks.add(f"prefill last-position max |Δlogits| ({what})", d_prefill <= bar, d_prefill, bar)
    checks.add(f"{s.decode_steps} decode steps max |Δlogits|", d_decode <= bar, d_decode, bar)
    p = SamplingParams(max_new_tokens=s.greedy_tokens)
    g_pt = generate(pt_engine, [text_ids[:16]], p).tokens[0]
    g_ort = generate(ort_engine, [text_ids[:16]], p).tokens[0]
    same = sum(a == b for a, b in zip(g_pt, g_ort))
    checks.add(f"{s.greedy_tokens} greedy tokens identical", g_pt == g_ort, f"{same}/{len(g_pt)}")
    ort_engine.close()
    return checks


def _cache_layers(cache):
    """(key, value) per layer from a transformers Cache object."""
    if hasattr(cache, "layers"):
        return [(l.keys, l.values) for l in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def _finish(tmp: Path, final: Path, manifest: dict, checks, s: ExportSettings) -> None:
    """The manifest is written last, and only for an export that passed its validation (else nothing is kept)."""
    from lmopt.manifest import write_manifest

    if not checks.passed:
        bar = "--fp16-rtol" if s.dtype == "fp16" else "--atol"
        raise UserError(f"export validation failed ({', '.join(c.name for c in checks.checks if not c.passed)}) "
                        f"— nothing written; pass a larger {bar} only if you accept the difference")
    write_manifest(tmp, manifest)
    log.info("export finished: %s", final)


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
