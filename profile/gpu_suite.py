"""GPU figures in one run: PyTorch eager (HF generate, the baseline), PyTorch with a static KV cache
captured in a CUDA graph, and ONNX Runtime CUDA EP FP16 with IO binding, each against the memory-bandwidth floor.

    python profile/gpu_suite.py --models tiny,gpt2-124m,llama-1b --out artifacts/gpu

Reads:  the models (built-in weights, or random-weight presets created on the GPU)
Writes: <out>/gpu-suite-<model>.json  (machine, GPU, driver, CUDA, versions, command, settings, raw samples,
        summary), <out>/onnx/<model>/ (the FP16 ONNX exported on the GPU; large, never committed)

Figures per model: decode ms/token and tokens/s at batch 1, 8, 32 (prompt 128); TTFT at 128 and 2048 prompt tokens
(batch 1); the floor = (weight bytes + KV-cache bytes read per step) / device-to-device copy bandwidth measured in
the same run (bytes read + written); greedy agreement of each engine with PyTorch eager.
Needs an NVIDIA GPU with torch; ONNX rows need onnxruntime-gpu (CUDA 13 build), skipped with the reason otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path


from lmopt.errors import UserError, cli_main
from lmopt.log import add_verbosity_args, get_logger, setup_logging

log = get_logger("gpu_suite")


@dataclass
class GpuSuiteSettings:
    models: str = "tiny,gpt2-124m,llama-1b"
    out: str = "artifacts/gpu"
    batches: str = "1,8,32"
    prompt_len: int = 128
    long_prompt_len: int = 2048
    new_tokens: int = 64
    reps: int = 3                  # timed repetitions per cell, after one warm-up
    engines: str = "torch-generate,torch-cudagraph,ort-cuda"
    parity_tokens: int = 32


# ------------------------------------------------------------------------------------------------------------------
def gpu_info() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}", "torch_cuda": torch.version.cuda}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["driver"], info["max_sm_clock"], info["max_mem_clock"] = [x.strip() for x in q.split(",")]
    except Exception as e:  # nvidia-smi missing: keep going, say so
        info["driver"] = f"unknown ({type(e).__name__})"
    return info


def copy_bandwidth_gbs(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read + written (the floor's denominator)."""
    import torch

    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3) / 1e9


def floor_ms(model, batch: int, ctx: int, bw_gbs: float) -> dict:
    """Bytes one decode step must read: every weight once (the input embedding only B rows unless tied to the
    LM head) plus the KV cache of `ctx` positions; divided by the measured copy bandwidth."""
    from lmopt.models import model_shape

    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        wbytes -= emb.numel() * emb.element_size()
    sh = model_shape(model.config)
    kv = 2 * sh["num_layers"] * sh["num_kv_heads"] * sh["head_dim"] * ctx * batch * emb.element_size()
    total = wbytes + kv
    return {"weight_bytes": wbytes, "kv_bytes": kv, "bytes": total, "floor_ms": total / (bw_gbs * 1e9) * 1e3}


# ------------------------------------------------------------------------------------------------------------------
def prompts_for(tok, vocab: int, batch: int, length: int, seed: int = 0):
    """Token prompts of exactly `length` from the held-out text (real ids exist in every preset's vocabulary)."""
    from lmopt.data import builtin_text

    ids = tok(builtin_text("eval"))["input_ids"]
    out = []
    for b in range(batch):
        start = (b * 997 + seed * 131) % max(1, len(ids) - length)
        row = ids[start:start + length]
        while len(row) < length:
            row = row + ids[: length - len(row)]
        out.append([t % vocab for t in row])
    return out


def time_hf_generate(model, prompts, new_tokens: int, reps: int) -> dict:
    """The baseline as users run it: model.generate with KV cache, greedy. Decode ms/token from the difference
    between generating N tokens and 1 token (the same prefill), so TTFT is not counted in the decode figure."""
    import torch

    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    run(2)
    t1s, tns = [], []
    for _ in range(reps):
        t1s.append(run(1)[0])
        dt, out = run(new_tokens)
        tns.append(dt)
    t1, tn = statistics.median(t1s), statistics.median(tns)
    return {"ttft_ms": t1 * 1e3, "decode_ms_per_token": (tn - t1) / (new_tokens - 1) * 1e3,
            "raw_total_s": tns, "raw_first_s": t1s, "tokens": out[0, len(prompts[0]):].tolist()}


def time_engine(engine, prompts, new_tokens: int, reps: int) -> dict:
    from lmopt.generate import SamplingParams, generate

    p = SamplingParams(max_new_tokens=new_tokens)
    generate(engine, prompts, SamplingParams(max_new_tokens=4))
    ttft, steps, toks = [], [], None
    for _ in range(reps):
        o = generate(engine, prompts, p)
        ttft.append(o.ttft_s)
        steps.append(statistics.median(o.step_s))
        toks = o.tokens[0]
    return {"ttft_ms": statistics.median(ttft) * 1e3, "decode_ms_per_token": statistics.median(steps) * 1e3,
            "raw_ttft_s": ttft, "raw_step_median_s": steps, "tokens": toks}


# ------------------------------------------------------------------------------------------------------------------
class CudaGraphTorchEngine:
    """PyTorch with a static KV cache: one decode step captured once in a CUDA graph and replayed, so a token costs
    one graph launch instead of hundreds of kernel launches from Python. Batch size and cache length are fixed
    at construction; prefill runs eagerly into the same static cache."""

    def __init__(self, model, batch: int, max_len: int):
        import torch
        from transformers import StaticCache

        self.torch, self.model, self.batch, self.max_len = torch, model, batch, max_len
        self.cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                                 device="cuda", dtype=model.dtype)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
        self.cache_pos = torch.zeros((1,), dtype=torch.long, device="cuda")
        self.graph = None
        self.logits = None

    def _step(self):
        return self.model(input_ids=self.ids, position_ids=self.pos, cache_position=self.cache_pos,
                          past_key_values=self.cache, use_cache=True).logits

    def prefill(self, prompts):
        t = self.torch
        self.cache.reset()
        ids = t.tensor(prompts, device="cuda")
        n = ids.shape[1]
        with t.inference_mode():
            out = self.model(input_ids=ids, position_ids=t.arange(n, device="cuda")[None].expand(len(prompts), -1),
                             cache_position=t.arange(n, device="cuda"), past_key_values=self.cache, use_cache=True)
        self.n = n
        return out.logits[:, -1].argmax(-1)

    def capture(self):
        t = self.torch
        self.cache_pos.fill_(self.n)
        self.pos.fill_(self.n)
        s = t.cuda.Stream()
        s.wait_stream(t.cuda.current_stream())
        with t.inference_mode(), t.cuda.stream(s):
            for _ in range(2):  # warm-up on a side stream, as CUDA-graph capture requires
                self._step()
        t.cuda.current_stream().wait_stream(s)
        self.graph = t.cuda.CUDAGraph()
        with t.inference_mode(), t.cuda.graph(self.graph):
            self.logits = self._step()

    def generate(self, prompts, new_tokens: int):
        """Greedy; returns (tokens of row 0, ttft_s, per-step seconds)."""
        # the static cache's tensors are created under inference_mode; every in-place update must be too
        with self.torch.inference_mode():
            return self._generate(prompts, new_tokens)

    def _generate(self, prompts, new_tokens: int):
        t = self.torch
        t.cuda.synchronize()
        t0 = time.perf_counter()
        nxt = self.prefill(prompts)
        t.cuda.synchronize()
        ttft = time.perf_counter() - t0
        if self.graph is None:
            self.capture()
            self.cache.reset()
            return self._generate(prompts, new_tokens)
        toks, steps = [int(nxt[0])], []
        for i in range(new_tokens - 1):
            ts = time.perf_counter()
            self.ids.copy_(nxt[:, None])
            self.pos.fill_(self.n + i)
            self.cache_pos.fill_(self.n + i)
            self.graph.replay()
            nxt = self.logits[:, -1].argmax(-1)
            toks.append(int(nxt[0]))  # host sync each step, as a streaming server must
            steps.append(time.perf_counter() - ts)
        return toks, ttft, steps


def time_cudagraph(model, prompts, new_tokens: int, reps: int) -> dict:
    eng = CudaGraphTorchEngine(model, len(prompts), len(prompts[0]) + new_tokens + 8)
    eng.generate(prompts, 4)
    ttft, steps, toks = [], [], None
    for _ in range(reps):
        toks, tt, st = eng.generate(prompts, new_tokens)
        ttft.append(tt)
        steps.append(statistics.median(st))
    del eng
    return {"ttft_ms": statistics.median(ttft) * 1e3, "decode_ms_per_token": statistics.median(steps) * 1e3,
            "raw_ttft_s": ttft, "raw_step_median_s": steps, "tokens": toks}


# ------------------------------------------------------------------------------------------------------------------
def export_fp16_onnx(model, folder: Path) -> Path:
    """FP16 ONNX with FP16 KV-cache I/O, exported from the FP16 model on the GPU (optimum), then given a
    last-token logits output (lmopt.onnx_graph)."""
    from optimum.exporters.onnx import onnx_export_from_model

    from lmopt.onnx_graph import last_token_logits

    last = folder / "model.last.onnx"
    if not last.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        # no_post_process: optimum's tied-weight de-duplication fails on >2 GB FP16 graphs; a duplicated
        # embedding costs disk, not speed
        onnx_export_from_model(model, folder, task="text-generation-with-past", device="cuda", do_validation=False,
                               no_post_process=True)
        log.info("exported FP16 ONNX to %s in %.1f s", folder, time.perf_counter() - t)
        last_token_logits(folder / "model.onnx", last)
    return last


def run_model(name: str, s: GpuSuiteSettings, bw: float, out_dir: Path) -> dict:
    import torch

    from lmopt.models import load_model, load_tokenizer, model_shape

    engines = s.engines.split(",")
    model = load_model(name, dtype="float16", device="cuda")
    tok = load_tokenizer(name)
    shape = model_shape(model.config)
    vocab = min(shape["vocab_size"], len(tok))
    res: dict = {"model": name, "model_shape": shape,
                 "parameters": sum(p.numel() for p in model.parameters()), "rows": [], "skipped": {}}
    batches = [int(b) for b in s.batches.split(",")]
    ort_engine = None
    if "ort-cuda" in engines:
        try:
            import onnxruntime as ort

            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            from lmopt.engines.ort_engine import OrtEngine

            path = export_fp16_onnx(model, out_dir / "onnx" / name)
            ort_engine = OrtEngine(path, "fp16", "cuda", variant="fp16-gpu-export",
                                   max_positions=shape["max_positions"])
        except Exception as e:
            res["skipped"]["ort-cuda"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log.warning("ort-cuda skipped: %s", res["skipped"]["ort-cuda"])

    # warm the GPU clocks and the allocator before the first timed cell (the first cell otherwise reads high)
    warm = prompts_for(tok, vocab, 1, s.prompt_len)
    for _ in range(3):
        time_hf_generate(model, warm, 16, 1)
    cells = [(b, s.prompt_len) for b in batches] + [(1, s.long_prompt_len)]
    for batch, plen in cells:
        if plen + s.new_tokens > shape["max_positions"]:
            res["skipped"][f"b{batch}/p{plen}"] = f"prompt {plen} + {s.new_tokens} exceeds context {shape['max_positions']}"
            continue
        prompts = prompts_for(tok, vocab, batch, plen)
        fl = floor_ms(model, batch, plen + s.new_tokens // 2, bw)
        base = None
        for eng in engines:
            try:
                if eng == "torch-generate":
                    r = time_hf_generate(model, prompts, s.new_tokens, s.reps)
                elif eng == "torch-cudagraph":
                    r = time_cudagraph(model, prompts, s.new_tokens, s.reps)
                elif eng == "ort-cuda":
                    if ort_engine is None:
                        continue
                    r = time_engine(ort_engine, prompts, s.new_tokens, s.reps)
                else:
                    raise UserError(f"unknown engine {eng}")
            except torch.cuda.OutOfMemoryError as e:
                res["skipped"][f"{eng}/b{batch}/p{plen}"] = f"out of memory: {str(e)[:200]}"
                torch.cuda.empty_cache()
                continue
            except UserError:
                raise
            except Exception as e:
                res["skipped"][f"{eng}/b{batch}/p{plen}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                log.exception("%s failed at batch %d prompt %d", eng, batch, plen)
                continue
            row = {"engine": eng, "precision": "fp16", "batch": batch, "prompt_len": plen,
                   "new_tokens": s.new_tokens, **{k: v for k, v in r.items() if k != "tokens"}}
            row["tokens_per_s"] = batch * 1e3 / r["decode_ms_per_token"]
            row["floor_ms"] = fl["floor_ms"]
            row["ratio_to_floor"] = r["decode_ms_per_token"] / fl["floor_ms"]
            n = s.parity_tokens
            if base is None and eng == "torch-generate":
                base = r["tokens"][:n]
            if base is not None:
                got = r["tokens"][:n]
                row["greedy_agreement_vs_torch"] = sum(a == b for a, b in zip(base, got)) / max(1, len(base))
            row["floor"] = fl
            res["rows"].append(row)
            log.info("%-16s %-12s b=%-3d p=%-5d ttft %.2f ms, decode %.3f ms/token (%.0f tok/s), %.1fx floor",
                     name, eng, batch, plen, r["ttft_ms"], r["decode_ms_per_token"], row["tokens_per_s"],
                     row["ratio_to_floor"])
    del model, ort_engine
    torch.cuda.empty_cache()
    return res


def run_suite(*, settings: GpuSuiteSettings) -> list[Path]:
    try:
        import torch
    except ImportError:
        raise UserError("torch is not installed — this suite needs PyTorch with CUDA") from None
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU visible to torch — run this on a machine with an NVIDIA GPU")
    from lmopt.manifest import machine_info, now_iso, package_versions

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    g = gpu_info()
    log.info("GPU %s, driver %s, copy bandwidth %.0f GB/s (read+write)", g["name"], g.get("driver"), bw)
    written = []
    for name in settings.models.split(","):
        t = time.perf_counter()
        res = run_model(name, settings, bw, out)
        doc = {"kind": "gpu-suite", "created": now_iso(), "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
               "machine": machine_info(), "gpu": g, "copy_bandwidth_gbs": bw, "settings": asdict(settings),
               "versions": package_versions("torch", "transformers", "optimum", "optimum-onnx", "onnx",
                                            "onnxruntime", "onnxruntime-gpu"),
               "elapsed_s": time.perf_counter() - t, **res}
        path = out / f"gpu-suite-{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
        log.info("Saving results to %s", path)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GpuSuiteSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    add_verbosity_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    run_suite(settings=GpuSuiteSettings(**{f.name: getattr(args, f.name) for f in fields(GpuSuiteSettings)}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
