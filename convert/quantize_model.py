"""Stage 2: INT8 Q/DQ quantization with calibration, an automatic accuracy budget and a fallback check.

    python convert/quantize_model.py --model tiny                        # both INT8 graphs, 1% perplexity budget
    python convert/quantize_model.py --model tiny --max-ppl-increase 0.1 # stricter: the sensitivity sweep picks
                                                                         # which MatMul groups stay FP32
    python convert/quantize_model.py --model tiny --target onnxruntime --method entropy --calib-text my.txt
    python convert/quantize_model.py --model tiny --compare-quantizers  # ModelOpt vs ONNX Runtime for TensorRT
    python convert/quantize_model.py --model tiny --smooth 0.5          # SmoothQuant: down projections INT8 too
    python convert/quantize_model.py --model tiny --smooth auto         # ... alpha per layer group
    python convert/quantize_model.py --model tiny --target onnxruntime-int4                  # 4-bit weights (CPU)
    python convert/quantize_model.py --model tiny --target onnxruntime-int4 --attention gqa  # ... of the fused graph

Reads:  artifacts/<model>/export/fp32/{manifest.json, model.onnx, tokenizer}  (stage 1, hash-checked)
        calibration text: --calib-text FILE or the built-in calibration split (data/calib.txt)
        evaluation text: always the built-in held-out split (data/eval.txt), never the calibration text
Writes: artifacts/<model>/quantize/int8-qdq-trt-<method>/{model.onnx, manifest.json}    for TensorRT (S8S8)
        artifacts/<model>/quantize/int8-cpu-u8s8-<method>/{model.onnx, manifest.json}   for ONNX Runtime CPU (U8S8)
        ... -<method>-sq<alpha|auto>/ with --smooth (not the default graph: engines pick it by variant name)
        artifacts/<model>/quantize/int4-cpu-nbits[-gqa]/{model.onnx, manifest.json}        --target onnxruntime-int4
        artifacts/<model>/quantize/int8-cpu-nbits[-gqa]/{model.onnx, manifest.json}  --target onnxruntime-int8-nbits
        with --compare-quantizers: artifacts/<model>/profile/quantize/quantizer-comparison.json (only that)

Why two INT8 graphs: TensorRT needs symmetric int8 Q/DQ pairs on MatMul inputs; ONNX Runtime's AVX2 CPU kernels
are U8S8 and leave signed-activation MatMuls in float with a DequantizeLinear on every call (docs/quantization.md).

Calibration: N windows x sequence length from the text, each fed as a prefill and as a second half with the KV cache
of its first half (the past_key_values paths need ranges too). Methods minmax / entropy / percentile.
Accuracy budget: when INT8 perplexity rises more than --max-ppl-increase percent over FP32, every MatMul group
(a decoder layer, or the LM head) is kept in FP32 alone and re-scored; the most sensitive groups are then kept in
FP32, fewest first, until the budget holds. If none meets it, exit 1 and write nothing.
Weight-only INT4 (--target onnxruntime-int4; 8-bit: onnxruntime-int8-nbits): every MatMul with a constant weight
becomes MatMulNBits (blocks of --block-size symmetric weights, accuracy_level 4: int8 compute), the LM head
included unless the budget keeps it FP32; no calibration. With --attention gqa the source is stage 1's fused graph
(export_onnx.py --attention gqa, engine ort-gqa), scored through that engine one position at a time; the accuracy
report, budget and sweep are the same.
Kept FP32 by default: Llama's rotary-embedding MatMul (always) and the MLP down projection (its input's outliers;
--int8-down-proj quantizes it too).
Smoothing (--smooth ALPHA | auto; lmopt/smoothing.py, docs/smoothquant.md): before calibration, every MatMul input
channel j is divided by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and the weight row multiplied by it, 1/s folded
into the RMSNorm/LayerNorm weight, the up projection's columns (down projection) or an explicit Mul (counted);
auto picks one alpha from a grid by held-out perplexity, then tries per layer group the neighbouring alphas and no
smoothing (candidates take minmax ranges derived from per-channel statistics: no calibration pass each). The down
projections then run INT8; the budget search starts from the smoothed graph and keeps a group FP32 only where the
smoothed graph misses the budget. The manifest's `smoothing` records alpha per site and layer, what absorbed each
scale, and the same graph's Δppl without smoothing.
Fallback check: ONNX Runtime's optimised graph is saved and its MatMuls counted as INT8 kernels vs float (and their
share of per-token MatMul FLOPs); zero INT8 MatMuls on the variant's own engine is fatal.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, setup_logging, timed

log = get_logger("quantize")

# NVIDIA ModelOpt 0.47's ONNX path (modelopt.onnx.quantization.quantize) has no smoothing for INT8: its int8 mode
# calibrates (max / entropy) and inserts Q/DQ; SmoothQuant (int8_sq) exists only in its PyTorch path, and its ONNX
# activation-aware scaling (awq_*) is for INT4 weight-only. So stage 2 smooths the FP32 graph itself and hands the
# smoothed graph to either quantizer.
MODELOPT_SMOOTHING = ("not used: ModelOpt 0.47's ONNX INT8 path has no smoothing (SmoothQuant is in its PyTorch path "
                      "only; ONNX AWQ is INT4 weight-only), so the FP32 graph is smoothed here before quantization")
TARGETS = ("all", "tensorrt", "onnxruntime", "onnxruntime-int4", "onnxruntime-int8-nbits")
QUANTIZERS = ("ort", "modelopt")


@dataclass
class QuantizeSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    target: str = "all"                # all (both INT8) | tensorrt | onnxruntime | onnxruntime-int4 | ...-int8-nbits
    attention: str = "sdpa"            # source graph: sdpa (optimum's export) | gqa (fused graph; weight-only targets)
    block_size: int = 64               # weight-only targets: weights per block (one scale each; 16..256, power of 2)
    quantizer: str = "ort"             # TensorRT graph made by ONNX Runtime's QDQ quantizer or NVIDIA ModelOpt
    method: str = "minmax"             # calibration: minmax | entropy | percentile
    calib_text: str | None = None      # None = built-in calibration split
    calib_samples: int = 16
    calib_seq_len: int = 128
    eval_samples: int = 64             # held-out windows for perplexity / top-1 / |Δlogits| (64 x 128 = 8,192 tokens)
    eval_seq_len: int = 128
    greedy_prompts: int = 4
    greedy_tokens: int = 32
    max_ppl_increase: float = 1.0      # percent, relative to FP32 perplexity
    max_excluded: int = -1             # most MatMul groups the budget may keep in FP32 (-1 = half of them)
    sweep_granularity: str = "layer"   # layer (decoder layer / LM head) | node (every MatMul)
    exclude: list[str] = field(default_factory=list)   # regexes of MatMul node names forced to stay FP32
    int8_down_proj: bool = False       # also quantize the Llama MLP down projection (kept FP32 by default: outliers)
    smooth: str = ""                   # SmoothQuant alpha in [0, 1], or auto (per layer group); down projections run INT8
    compare_quantizers: bool = False
    speed_check: bool = False  # also time ORT FP32 vs INT8 decode (64 tokens, interleaved) into the CPU manifest
    threads: int = 0


def check_settings(s: QuantizeSettings) -> None:
    from lmopt.quantization import parse_budget

    parse_budget(s.max_ppl_increase)
    for name in ("calib_samples", "calib_seq_len", "eval_samples", "eval_seq_len", "greedy_prompts",
                 "greedy_tokens"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(s, name)})")
    if s.calib_seq_len < 2:
        raise UserError("--calib-seq-len must be >= 2 (a prefill and a KV-cache half are fed)")
    if s.block_size not in (16, 32, 64, 128, 256):
        raise UserError(f"--block-size must be 16, 32, 64, 128 or 256 (got {s.block_size})")
    if s.attention not in ("sdpa", "gqa"):
        raise UserError(f"unknown --attention '{s.attention}' — use sdpa or gqa")
    if s.attention == "gqa" and s.target not in ("onnxruntime-int4", "onnxruntime-int8-nbits"):
        raise UserError("--attention gqa quantizes the fused graph's weights only — use --target onnxruntime-int4 "
                        "or onnxruntime-int8-nbits")
    from lmopt.smoothing import parse_alpha

    if parse_alpha(s.smooth) == "auto" and (s.method != "minmax" or s.quantizer == "modelopt"):
        raise UserError("--smooth auto derives each candidate's ranges from minmax statistics — use --method minmax "
                        "and --quantizer ort, or a fixed alpha")
    if parse_alpha(s.smooth) is not None and (s.target in ("onnxruntime-int4", "onnxruntime-int8-nbits")
                                               or s.compare_quantizers):
        raise UserError("--smooth prepares activations for INT8 Q/DQ graphs — use --target all, tensorrt or "
                        "onnxruntime, without --compare-quantizers")
    if s.quantizer == "modelopt" and s.target == "onnxruntime":
        raise UserError("--quantizer modelopt makes the TensorRT graph only — use --target tensorrt")
    for p in s.exclude:
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"--exclude {p!r} is not a valid regular expression ({e})") from None


def variant_name(target: str, s: QuantizeSettings) -> str:
    from lmopt.quantization import PRESETS

    if PRESETS[target].weight_bits:  # no calibration, so no method
        return PRESETS[target].prefix + ("-gqa" if s.attention == "gqa" else "")
    from lmopt.smoothing import parse_alpha

    q = "-modelopt" if target == "tensorrt" and s.quantizer == "modelopt" else ""
    a = parse_alpha(s.smooth)
    sq = "" if a is None else f"-sq{a if a == 'auto' else format(a, 'g')}"
    return f"{PRESETS[target].prefix}{q}-{s.method}{sq}"


def sweep_groups(names: list[str], granularity: str) -> dict[str, list[str]]:
    """MatMul groups the sensitivity sweep ranks: one per decoder layer (+ LM head), or one per MatMul."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"(?:layers|h)\.(\d+)/", n)
        key = n if granularity == "node" or not m else f"layer {m.group(1)}"
        groups.setdefault(key, []).append(n)
    return groups


class _Target:
    """Makes candidate INT8 graphs of one target into a scratch folder and scores them."""

    def __init__(self, target, s, fp32_path, feeds, evaluator, work: Path, calibrations: dict, smoother=None,
                 base_excl: list[str] = ()):
        from lmopt.quantization import PRESETS

        self.target, self.s, self.fp32_path, self.feeds, self.ev = target, s, fp32_path, feeds, evaluator
        self.preset = PRESETS[target]
        self.work, self.calibrations, self.n = work, calibrations, 0
        self.use_modelopt = target == "tensorrt" and s.quantizer == "modelopt"
        self.smoother, self.base_excl = smoother, list(base_excl)

    def calibration(self, smooth: bool = False):
        """Ranges of the FP32 graph, or of the graph smoothed everywhere the base exclusions leave INT8: a MatMul
        input has the same range in every partly smoothed graph whose unsmoothed sites stay FP32, so one
        calibration serves the whole sensitivity sweep."""
        from tqdm import tqdm

        from lmopt.quantization import Calibration

        sym = self.preset.activation_symmetric
        key = (self.s.method, sym, smooth)
        if key not in self.calibrations:
            src = self.fp32_path
            if smooth:
                src = self._save(self.smoother.graph(sym, self.base_excl), f"smoothed-{int(sym)}.onnx")
            with timed(log, f"calibration ({self.s.method}{', smoothed' if smooth else ''}, {len(self.feeds)} "
                            "feeds)"), \
                    tqdm(total=len(self.feeds), desc="calibration", unit="feed", leave=False) as bar:
                self.calibrations[key] = Calibration(src, self.feeds, self.s.method, sym, bar)
        return self.calibrations[key]

    def _save(self, model, name: str) -> Path:
        import onnx

        path = self.work / name
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 31) - (64 << 20),
                  location=name + ".data")
        return path

    def make(self, exclude: list[str], smooth: bool = True, alphas: dict | None = None) -> Path:
        """A candidate graph with `exclude` kept FP32; smoothed (when --smooth) wherever a MatMul is quantized.
        `alphas` (the auto search's candidates): minmax ranges derived from the unsmoothed calibration."""
        self.n += 1
        out = self.work / f"{self.target}-{self.n}.onnx"
        if alphas is not None:
            sym = self.preset.activation_symmetric
            cal = self.calibration()
            cal.quantize(self.preset, exclude, out, self.smoother.graph(sym, exclude, alphas),
                         self.smoother.ranges(cal.ranges, sym, exclude, alphas))
            return out
        smooth = smooth and self.smoother is not None
        if self.preset.weight_bits:
            from lmopt.quantization import nbits_quantize

            nbits_quantize(self.fp32_path, self.preset.weight_bits, exclude, out, self.s.block_size)
        elif self.use_modelopt:
            from tqdm import tqdm

            from lmopt.quantization import modelopt_quantize

            src = self.fp32_path
            if smooth:
                src = self._save(self.smoother.graph(self.preset.activation_symmetric, exclude),
                                 f"smoothed-{self.n}.onnx")
            with tqdm(total=len(self.feeds), desc="ModelOpt calibration", unit="feed", leave=False) as bar:
                modelopt_quantize(src, self.feeds, self.s.method, exclude, out, bar)
        elif smooth:
            self.calibration(True).quantize(self.preset, exclude, out,
                                            self.smoother.graph(self.preset.activation_symmetric, exclude))
        else:
            self.calibration().quantize(self.preset, exclude, out)
        return out


def quantize(*, settings: QuantizeSettings) -> dict:
    """Build the INT8 variants of `settings.target`; returns {variant: manifest}. Nothing is written unless every
    requested variant meets the accuracy budget and runs MatMuls in INT8."""
    from lmopt.data import builtin_text, read_text, token_windows
    from lmopt.artifacts import find_onnx, onnx_file
    from lmopt.engines.ort_engine import make_session
    from lmopt.manifest import file_entry, package_versions, write_manifest
    from lmopt.paths import check_writable, stage_dir, staging_dir
    from lmopt.quantization import (ALWAYS_EXCLUDE, OUTLIER_EXCLUDE, PRESETS, Evaluator, accuracy_table,
                                    calibration_feeds, int8_coverage, matmul_nodes, pick_nodes, qdq_coverage)
    from lmopt.smoothing import parse_alpha
    from lmopt.validate import Checklist

    s = settings
    check_settings(s)
    check_writable(s.artifacts)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if s.attention == "gqa":
        from lmopt.manifest import list_variants

        src_man = list_variants(s.artifacts, s.model, "export").get("fp32-gqa")
        if src_man is None:
            model_arg = "" if s.model == "tiny" else f" --model {s.model}"
            raise UserError(f"no fp32-gqa graph under {stage_dir(s.artifacts, s.model, 'export', '')} — run: python "
                            f"convert/export_onnx.py{model_arg} --dtype fp32 --attention gqa")
        src_folder = stage_dir(s.artifacts, s.model, "export", "fp32-gqa")
    else:
        src_folder, src_man = find_onnx(s.artifacts, s.model, "fp32")
    fp32_path = onnx_file(src_folder, src_man)     # size + sha256 against the export manifest
    shape = src_man.get("model_shape", {})
    calib_text, calib_source = read_text(s.calib_text, "calib")
    if not calib_text.strip():
        raise UserError(f"calibration text {calib_source} is empty — pass a text file with at least "
                        f"{s.calib_samples * s.calib_seq_len} tokens, or omit --calib-text")
    import onnx
    from transformers import AutoTokenizer

    fp32_session = make_session(fp32_path, threads=s.threads or None)   # a corrupt graph fails here, in one line
    tokenizer = AutoTokenizer.from_pretrained(str(src_folder))

    calib_windows = token_windows(tokenizer, calib_text, s.calib_samples, s.calib_seq_len, f"calibration text "
                                  f"({calib_source})")
    eval_windows = token_windows(tokenizer, builtin_text("eval"), s.eval_samples, s.eval_seq_len, "evaluation text")
    prompts = [w[:16] for w in eval_windows[: s.greedy_prompts]]
    targets = ["tensorrt", "onnxruntime"] if s.target == "all" else [s.target]
    feeds = []
    if any(not PRESETS[t].weight_bits for t in targets):
        with timed(log, "calibration feeds (prefill + KV cache)", timings, "calibration_feeds_s"):
            feeds = calibration_feeds(fp32_session, calib_windows)
    with timed(log, "FP32 reference (perplexity, greedy tokens)", timings, "fp32_reference_s"):
        ev = Evaluator(fp32_path, eval_windows, prompts, s.greedy_tokens, shape.get("max_positions", 2048),
                       gqa_max_len=src_man.get("graph", {}).get("max_len"))
    noise = ev.noise()
    log.info("FP32 perplexity on %d held-out tokens: %.4f (95%% interval %s, ±%.2f%%: %s)",
             sum(len(w) for w in eval_windows), ev.ref_ppl, noise["ppl_fp32_interval"],
             noise["ppl_fp32_halfwidth_pct"], noise["method"])

    names = matmul_nodes(onnx.load(str(fp32_path), load_external_data=False))
    forced = pick_nodes(names, [ALWAYS_EXCLUDE.pattern])
    user = pick_nodes(names, s.exclude)
    if s.exclude and not user:
        raise UserError(f"--exclude {' '.join(s.exclude)} matches no MatMul/Gemm node — node names look like "
                        f"{names[0]!r}")
    alpha = parse_alpha(s.smooth)
    # smoothing is the answer to the down projection's outliers: with it they run INT8 like the rest
    outliers = [] if s.int8_down_proj or alpha is not None else pick_nodes(names, [OUTLIER_EXCLUDE.pattern])
    base_excl = sorted(set(forced) | set(outliers) | set(user))
    if s.compare_quantizers:
        return compare_quantizers(s, fp32_path, feeds, ev, base_excl, shape, src_man)
    smoother = None
    if alpha is not None:
        from lmopt.smoothing import Smoother

        with timed(log, f"smoothing statistics ({len(feeds)} feeds)", timings, "smoothing_stats_s"):
            smoother = Smoother(fp32_path, feeds, sorted(set(forced) | set(user)), alpha)
        log.info("smoothing: %d sites (%s)", len(smoother.sites), ", ".join(
            f"{k}: {sum(x.absorber == k for x in smoother.sites)}" for k in ("norm", "linear", "mul")))

    results = {}
    calibrations: dict = {}
    with tempfile.TemporaryDirectory(prefix="lmopt-quant-") as work:
        for target in targets:
            t0 = time.perf_counter()
            tg = _Target(target, s, fp32_path, feeds, ev, Path(work), calibrations, smoother, base_excl)
            if alpha == "auto":
                with timed(log, f"{target}: alpha search"):
                    alpha_search(tg, base_excl, ev)
            res = budget_search(tg, names, base_excl, ev, s)
            if smoother is not None:
                sym = PRESETS[target].activation_symmetric
                with timed(log, f"{target}: the same graph without smoothing"):
                    plain = ev.delta_pct(ev.ppl(tg.make(res["exclude"], smooth=False)))
                res["smoothing"] = {**smoother.report(sym, res["exclude"]),
                                    "ppl_increase_pct_without_smoothing": round(plain, 4),
                                    "modelopt": MODELOPT_SMOOTHING}
                log.info("%s: %d sites smoothed (%d explicit Mul); Δppl without smoothing %+.3f%%", target,
                         res["smoothing"]["sites_smoothed"], res["smoothing"]["explicit_muls"], plain)
            coverage = {"onnxruntime": int8_coverage(res["path"], shape, s.eval_seq_len),
                        "tensorrt": qdq_coverage(res["path"], shape, s.eval_seq_len)}
            with timed(log, f"{target}: accuracy report"):
                acc = ev.full(res["path"])
            res.update(accuracy=acc, coverage=coverage, seconds=round(time.perf_counter() - t0, 2))
            if s.speed_check and target == "onnxruntime":
                from lmopt.quantization import decode_speed

                with timed(log, "speed check (ORT FP32 vs INT8 decode)"):
                    res["speed"] = decode_speed(fp32_path, res["path"], eval_windows[0][:32], 64, 3,
                                                s.threads or None, shape.get("max_positions", 2048))
                log.info("decode ms/token: FP32 %.2f, INT8 %.2f (%.2fx)", res["speed"]["median_ms"]["fp32"],
                         res["speed"]["median_ms"]["int8"], res["speed"]["int8_speedup"])
            results[target] = res

        rows = {"fp32": {"ppl": round(ev.ref_ppl, 4), "ppl_increase_pct": 0.0, "top1_agreement": 1.0,
                         "max_abs_dlogits": 0.0, "greedy_agreement": 1.0}}
        for t, r in results.items():
            rows[variant_name(t, s)] = r["accuracy"]
            if "smoothing" in r:   # the same exclusions without smoothing: what smoothing buys
                p = r["smoothing"]["ppl_increase_pct_without_smoothing"]
                rows[f"  {t}, unsmoothed"] = {"ppl": round(ev.ref_ppl * (1 + p / 100), 4), "ppl_increase_pct": p}
        print(accuracy_table(rows), flush=True)
        for t, r in results.items():
            nz = r["accuracy"]["noise"]
            print(f"{variant_name(t, s)}: Δppl {r['accuracy']['ppl_increase_pct']:+.3f}%, 95% interval "
                  f"[{nz['ppl_increase_pct_interval'][0]:+.3f}, {nz['ppl_increase_pct_interval'][1]:+.3f}]% "
                  f"(budget {s.max_ppl_increase}%; {nz['method']})", flush=True)

        failures = []
        checklists = {}
        for target, r in results.items():
            own = r["coverage"][PRESETS[target].targets[0]]
            bits = PRESETS[target].weight_bits
            ck = Checklist(f"quantize validation ({variant_name(target, s)} vs FP32)")
            ck.add("perplexity increase % within budget", r["accuracy"]["ppl_increase_pct"] <= s.max_ppl_increase,
                   r["accuracy"]["ppl_increase_pct"], s.max_ppl_increase,
                   f"{len(r['budget_exclusions'])} group(s) kept FP32 by the budget")
            ck.add(f"MatMuls running {f'{bits}-bit MatMulNBits' if bits else 'INT8'} on {target}",
                   own["matmuls_int8"] > 0,
                   f"{own['matmuls_int8']}/{own['matmuls_int8'] + own['matmuls_float']}", None,
                   f"{100 * own['int8_flop_fraction']:.1f}% of MatMul FLOPs per token")
            ck.print(log)
            checklists[target] = ck
            if not r["met"]:
                failures.append(f"{target}: best Δppl {r['accuracy']['ppl_increase_pct']:+.3f}% > budget "
                                f"{s.max_ppl_increase}% with {len(r['budget_exclusions'])} group(s) in FP32 "
                                f"(at most {r['max_excluded']} allowed)")
            elif own["matmuls_int8"] == 0:
                failures.append(f"{target}: no MatMul runs in INT8 (all fell back to float)")
        if failures:
            raise UserError("no INT8 model written — " + "; ".join(failures) + " — raise --max-ppl-increase or "
                            "--max-excluded, or try --method entropy/percentile")

        # a quantizer that edits its input would silently invalidate stage 1 (ModelOpt did): a bug, so a traceback
        src_entry = src_man.get("outputs", {}).get("files", {}).get(fp32_path.name)
        if src_entry and file_entry(fp32_path)["sha256"] != src_entry["sha256"]:
            raise RuntimeError(f"{fp32_path} changed during quantization")
        manifests = {}
        for target, r in results.items():
            variant = variant_name(target, s)
            final = stage_dir(s.artifacts, s.model, "quantize", variant)
            with staging_dir(final) as tmp:
                model_out = tmp / "model.onnx"
                Path(r["path"]).replace(model_out)
                log.info("Saving ONNX model to %s", final / "model.onnx")
                payload = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
                manifest = {
                    "stage": "quantize", "variant": variant, "model": src_man.get("model", s.model),
                    "model_spec": s.model,
                    "precision": "int4" if PRESETS[target].weight_bits == 4 else "int8",
                    "targets": list(PRESETS[target].targets),
                    "engine": "ort-gqa" if s.attention == "gqa" else "ort",
                    **({"graph": src_man["graph"]} if s.attention == "gqa" else {}),
                    # the pipeline's own choice per precision+target; other methods/quantizers are for comparison
                    "default": s.method == QuantizeSettings.method and s.quantizer == QuantizeSettings.quantizer
                    and target != "onnxruntime-int8-nbits"    # the U8S8 graph stays ort's int8
                    and alpha is None,                        # smoothed graphs are picked by variant name

                    "quantizer": "modelopt" if (target == "tensorrt" and s.quantizer == "modelopt")
                    else "onnxruntime.quantization MatMulNBitsQuantizer" if PRESETS[target].weight_bits
                    else "onnxruntime.quantization QDQQuantizer",
                    "preset": asdict(PRESETS[target]),
                    "outputs": {"onnx": "model.onnx", "files": {n: file_entry(tmp / n) for n in payload}},
                    "model_shape": shape,
                    "inputs": {"onnx": file_entry(fp32_path), "export_manifest": str(src_folder / "manifest.json"),
                               "calibration_text": calib_source, "evaluation_text": "builtin:eval"},
                    "settings": asdict(s),
                    "versions": package_versions("onnx", "onnxruntime", "nvidia-modelopt", "transformers"),
                    "timings_s": {**timings, f"{target}_total_s": r["seconds"],
                                  "stage_total_s": round(time.perf_counter() - t_start, 2)},
                    "validation": checklists[target].to_dict(),
                    "accuracy": r["accuracy"],
                    "exclusions": {"always": forced, "outliers": outliers, "user": user,
                                   "budget": r["budget_exclusions"],
                                   "all": r["exclude"]},
                    "sensitivity": r["sweep"],
                    "int8_fallback": r["coverage"],
                    "fp32_matmuls": r["exclude"],
                    "int8_flop_share": {k: v["int8_flop_fraction"] for k, v in r["coverage"].items()},
                    "smoothing": r.get("smoothing"),
                    "speed_check": r.get("speed"),
                }
                write_manifest(tmp, manifest)
            manifests[variant] = manifest
            log.info("%s: %s", variant, final)
    return manifests


def alpha_search(tg: _Target, base_excl: list[str], ev) -> dict:
    """--smooth auto: one alpha for every site from the grid (scored by held-out perplexity), then per layer group
    the neighbouring alphas and no smoothing, each kept where it lowers Δppl. Candidates take minmax ranges derived
    from the per-channel statistics (lmopt.smoothing.smoothed_ranges), so a candidate costs a quantization and a
    perplexity pass, not a calibration."""
    from tqdm import tqdm

    from lmopt.smoothing import ALPHA_GRID

    sm, sym = tg.smoother, tg.preset.activation_symmetric
    groups: dict[str, list[str]] = {}
    for site in sm.sites:
        groups.setdefault(site.group, []).append(site.name)
    every = [n for names in groups.values() for n in names]
    t0 = time.perf_counter()
    bar = tqdm(total=len(ALPHA_GRID) + 3 * len(groups), desc=f"alpha search ({tg.target})", unit="graph",
               leave=False)

    def score(alphas: dict) -> float:
        d = ev.delta_pct(ev.ppl(tg.make(base_excl, alphas=alphas)))
        bar.update()
        return round(d, 4)

    uniform = {a: score({n: a for n in every}) for a in ALPHA_GRID}
    a0 = min(uniform, key=uniform.get)
    cur, best = {n: a0 for n in every}, uniform[a0]
    per_group = {}
    i = ALPHA_GRID.index(a0)
    for g, names in groups.items():
        tried = {str(a0): best}
        for a in [ALPHA_GRID[j] for j in (i - 1, i + 1) if 0 <= j < len(ALPHA_GRID)] + [None]:
            d = score({**cur, **{n: a for n in names}})
            tried[str(a)] = d
            if d < best:
                best, cur = d, {**cur, **{n: a for n in names}}
        per_group[g] = {"alpha": cur[names[0]], "ppl_increase_pct": tried}
    bar.close()
    log.info("%s: alpha search: one alpha %s %+.3f%%; per layer group %+.3f%%", tg.target, a0, uniform[a0], best)
    out = {"grid": list(ALPHA_GRID), "uniform_ppl_increase_pct": {str(a): d for a, d in uniform.items()},
           "uniform_best": a0, "per_group": per_group, "ppl_increase_pct": best,
           "ranges": "minmax, derived from per-channel statistics", "seconds": round(time.perf_counter() - t0, 2),
           "scored_on": "the held-out evaluation text, as the sensitivity sweep is"}
    sm.fix(sym, cur, out)
    return out


def budget_search(tg: _Target, names: list[str], base_excl: list[str], ev, s: QuantizeSettings) -> dict:
    """Full INT8 first; if it breaks the budget, a leave-one-group-in-FP32 sweep ranks the groups and the most
    sensitive are kept in FP32, fewest first, until the budget holds."""
    from tqdm import tqdm

    with timed(log, f"{tg.target}: quantize + score"):
        path = tg.make(base_excl)
        ppl = ev.ppl(path)
    d = ev.delta_pct(ppl)
    log.info("%s: quantized perplexity %.4f (%+.3f%% vs FP32 %.4f; budget %.3f%%)", tg.target, ppl, d, ev.ref_ppl,
             s.max_ppl_increase)
    groups = sweep_groups([n for n in names if n not in base_excl], s.sweep_granularity)
    max_excl = len(groups) // 2 if s.max_excluded < 0 else min(s.max_excluded, len(groups))
    out = {"path": path, "exclude": base_excl, "budget_exclusions": [], "met": d <= s.max_ppl_increase,
           "max_excluded": max_excl,
           "sweep": {"ran": False, "reason": "full INT8 met the budget", "full_int8_ppl_increase_pct": round(d, 4)}}
    if out["met"]:
        return out
    if max_excl == 0:
        out["sweep"] = {"ran": False, "reason": "--max-excluded 0", "full_int8_ppl_increase_pct": round(d, 4)}
        return out

    table = []
    t0 = time.perf_counter()
    for g, members in tqdm(groups.items(), desc=f"sensitivity sweep ({tg.target})", unit="group"):
        p = ev.ppl(tg.make(base_excl + members))
        table.append({"group": g, "nodes": len(members), "ppl_with_group_fp32": round(p, 4),
                      "ppl_increase_pct": round(ev.delta_pct(p), 4)})
    table.sort(key=lambda r: r["ppl_increase_pct"])   # most sensitive first: keeping it FP32 helps most
    steps = []
    best = (d, path, [])
    for k in range(1, max_excl + 1):
        chosen = [r["group"] for r in table[:k]]
        excl = base_excl + [n for g in chosen for n in groups[g]]
        p_path = tg.make(excl)
        dk = ev.delta_pct(ev.ppl(p_path))
        steps.append({"kept_fp32": chosen, "ppl_increase_pct": round(dk, 4)})
        log.info("%s: %d group(s) in FP32 (%s): %+.3f%%", tg.target, k, ", ".join(chosen), dk)
        if dk < best[0]:
            best = (dk, p_path, chosen)
        if dk <= s.max_ppl_increase:
            best = (dk, p_path, chosen)
            out.update(path=p_path, exclude=excl, budget_exclusions=chosen, met=True)
            break
    else:
        out.update(path=best[1], budget_exclusions=best[2],
                   exclude=base_excl + [n for g in best[2] for n in groups[g]])
    out["sweep"] = {"ran": True, "granularity": s.sweep_granularity, "full_int8_ppl_increase_pct": round(d, 4),
                    "table": table, "steps": steps, "chosen_exclusions": out["budget_exclusions"],
                    "seconds": round(time.perf_counter() - t0, 2)}
    return out


def compare_quantizers(s, fp32_path, feeds, ev, base_excl, shape, src_man) -> dict:
    """TensorRT graph from ModelOpt vs ONNX Runtime's QDQ quantizer: accuracy, time, what ORT runs in INT8."""
    from lmopt.manifest import file_entry
    from lmopt.results import envelope, versions, write_json
    from lmopt.paths import stage_dir
    from lmopt.quantization import PRESETS, Calibration, int8_coverage, modelopt_quantize, qdq_coverage

    rows = {}
    with tempfile.TemporaryDirectory(prefix="lmopt-cmp-") as work:
        for q in QUANTIZERS:
            out = Path(work) / f"{q}.onnx"
            t0 = time.perf_counter()
            if q == "ort":
                Calibration(fp32_path, feeds, s.method, True).quantize(PRESETS["tensorrt"], base_excl, out)
            else:
                modelopt_quantize(fp32_path, feeds, s.method, base_excl, out)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            ev.ppl(out)
            t_eval = time.perf_counter() - t1
            rows[q] = {"quantize_s": round(dt, 2), "accuracy": ev.full(out),
                       "ort_cpu_ppl_eval_s": round(t_eval, 3),
                       "int8_on_onnxruntime_cpu": int8_coverage(out, shape, s.eval_seq_len),
                       "int8_on_tensorrt_graph": qdq_coverage(out, shape, s.eval_seq_len),
                       "bytes": Path(out).stat().st_size}
            log.info("%s: %.1f s, Δppl %+.3f%%, ORT INT8 MatMuls %d/%d", q, dt, rows[q]["accuracy"]["ppl_increase_pct"],
                     rows[q]["int8_on_onnxruntime_cpu"]["matmuls_int8"],
                     rows[q]["int8_on_onnxruntime_cpu"]["matmuls_int8"]
                     + rows[q]["int8_on_onnxruntime_cpu"]["matmuls_float"])
    result = envelope("quantizer-comparison", settings=asdict(s),
                      versions=versions("onnx", "onnxruntime", "nvidia-modelopt"),
                      model=src_man.get("model", s.model), model_shape=shape, input=file_entry(fp32_path),
                      preset=asdict(PRESETS["tensorrt"]), excluded=base_excl,
                      note="ort_cpu_ppl_eval_s times the same perplexity pass on ONNX Runtime CPU; ModelOpt's graph "
                           "keeps MatMuls float with DequantizeLinear on ORT CPU, which is fine for TensorRT",
                      quantizers=rows)
    path = write_json(stage_dir(s.artifacts, s.model, "profile", "quantize") / "quantizer-comparison.json", result)
    log.info("Saving result to %s", path)
    return result


def build_parser() -> argparse.ArgumentParser:
    from lmopt.quantization import add_budget_flag

    p = cli.parser(__doc__)
    d = QuantizeSettings()
    cli.add_settings(p, QuantizeSettings, help={
        "compare_quantizers": 'only measure ModelOpt vs ONNX Runtime for the TensorRT graph; write a result JSON',
    }, choices={"target": TARGETS, "quantizer": QUANTIZERS, "method": ("minmax", "entropy", "percentile"),
                "sweep_granularity": ("layer", "node")},
        skip=("calib_text", "max_ppl_increase", "max_excluded", "exclude"))
    p.add_argument("--calib-text", default=d.calib_text, help="UTF-8 calibration text (default: built-in split)")
    add_budget_flag(p, d.max_ppl_increase)
    p.add_argument("--max-excluded", type=int, default=d.max_excluded,
                   help="most MatMul groups the budget may keep in FP32 (-1: half of them)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="regex of MatMul/Gemm node names to keep in FP32 (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    settings = cli.settings_from(QuantizeSettings, args)
    t0 = time.time()
    quantize(settings=settings)
    log.info("done in %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    cli.run(main)
