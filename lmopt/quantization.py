"""Quantization helpers shared by convert/quantize_model.py and convert/convert_fp16.py.

    presets           INT8 Q/DQ presets per target engine (TensorRT: S8S8 symmetric; ONNX Runtime CPU: U8S8)
    calibration_feeds prefill + KV-cache feeds from N token windows (ModelOpt needs the prefill first)
    Calibration       calibrate once, quantize many times with different exclusions (the sensitivity sweep)
    Evaluator         FP32 reference once; ppl, top-1 agreement, max |Δlogits|, greedy agreement of a candidate
    int8_coverage     MatMuls that really run in INT8 after ONNX Runtime's graph optimisation, and their FLOP share
    qdq_coverage      MatMuls whose both inputs come from DequantizeLinear (what TensorRT fuses into INT8 GEMMs)
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import UserError


def parse_budget(value) -> float:
    """--max-ppl-increase as a float (percent); a word instead of a number, a negative number or NaN is the user's
    mistake, not a traceback."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--max-ppl-increase must be a number (percent), got {value!r}") from None
    if not budget >= 0:  # also NaN
        raise UserError(f"--max-ppl-increase must be a percentage >= 0 (got {value})")
    return budget


def add_budget_flag(p, default: float) -> None:
    """--max-ppl-increase of convert_fp16.py and quantize_model.py, parsed as it is read (a word is a one-line
    error, through lmopt.cli.run)."""
    p.add_argument("--max-ppl-increase", default=str(default), type=parse_budget,
                   help="accuracy budget: max perplexity increase over FP32, in percent")


@dataclass(frozen=True)
class QuantPreset:
    prefix: str                  # variant name prefix; the calibration method is appended
    targets: tuple[str, ...]     # engines this graph is made for (manifest "targets")
    activation_type: str         # "int8" | "uint8"
    activation_symmetric: bool
    note: str
    weight_bits: int = 0         # 4 or 8: weight-only block quantization (MatMulNBits), no activation quantization


PRESETS: dict[str, QuantPreset] = {
    # TensorRT 11 only accepts symmetric INT8 Q/DQ (zero point 0) and fuses DQ->MatMul<-DQ into INT8 GEMMs;
    # per-channel symmetric weights keep the weight error per output column (optimum's AutoQuantizationConfig.tensorrt()).
    "tensorrt": QuantPreset("int8-qdq-trt", ("tensorrt",), "int8", True,
                            "S8S8: symmetric int8 activations, per-channel symmetric int8 weights, Q/DQ on "
                            "MatMul/Gemm inputs (TensorRT's explicit-quantization contract)"),
    # ONNX Runtime's AVX2 (no VNNI) CPU kernels are U8S8: with uint8 asymmetric activations every Q/DQ MatMul fuses
    # into QLinearMatMul/MatMulInteger; signed activations leave MatMuls float with DequantizeLinear on every call
    # (ENVIRONMENT.md: 5-10x slower than FP32 on a Llama shape).
    "onnxruntime": QuantPreset("int8-cpu-u8s8", ("onnxruntime",), "uint8", False,
                               "U8S8: asymmetric uint8 activations, per-channel symmetric int8 weights (the "
                               "layout ONNX Runtime's CPU kernels fuse)"),
    # weight-only block quantization: MatMulNBits with blocks of symmetric int4 weights and one float scale each;
    # accuracy_level 4 quantizes the activations to int8 on the fly (per block) and runs int8 dot products
    "onnxruntime-int4": QuantPreset("int4-cpu-nbits", ("onnxruntime",), "float", False,
                                    "MatMulNBits: 4-bit symmetric weights in blocks (--block-size), accuracy_level 4 "
                                    "(int8 compute); no calibration", weight_bits=4),
    "onnxruntime-int8-nbits": QuantPreset("int8-cpu-nbits", ("onnxruntime",), "float", False,
                                          "MatMulNBits: 8-bit symmetric weights in blocks (--block-size), "
                                          "accuracy_level 4 (int8 compute); no calibration", weight_bits=8),
}
WEIGHT_ONLY_TARGETS = tuple(t for t, p in PRESETS.items() if p.weight_bits)
# 64 keeps the built-in model's 4-bit perplexity within the 1% budget with as many MatMuls kept FP32 as blocks of 32
# (LM head and two more) and decodes llama-small ~1.2x faster; blocks of 128, faster still, missed the budget there
# (docs/ENVIRONMENT.md)
NBITS_BLOCK = 64
NBITS_ACCURACY_LEVEL = 4
METHODS = ("minmax", "entropy", "percentile")
INT8_MATMUL_OPS = {"QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                   "QAttention", "MatMulNBits"}   # (coverage counts MatMulNBits' 4-bit weights as quantized too)
FLOAT_MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul"}
# Llama's rotary embedding computes positions x inv_freq with a MatMul; a static scale clamps every position past
# the calibration length (ENVIRONMENT.md), so it is never quantized.
ALWAYS_EXCLUDE = re.compile(r"rotary_emb")
# The Llama MLP's down projection reads the SwiGLU product, whose few large channels set a per-tensor activation scale
# that leaves every other channel a handful of levels. On the built-in model, quantizing these 4 MatMuls alone took
# top-1 agreement with FP32 from 95.9% to 93.7% and greedy agreement from 85% to 50% (minmax; docs/quantization.md), so
# they stay FP32 unless asked (--int8-down-proj). Other architectures have no node of this name.
OUTLIER_EXCLUDE = re.compile(r"mlp/down_proj/")


def matmul_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]


def pick_nodes(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    pats = [re.compile(p) for p in patterns]
    return [n for n in names if any(p.search(n) for p in pats)]


# --- calibration data ---------------------------------------------------------------------------------------------

def _io_names(session):
    ins = [i.name for i in session.get_inputs()]
    past = [n for n in ins if n.startswith("past_key_values.")]
    p0 = next(i for i in session.get_inputs() if i.name == past[0])
    return ins, past, int(p0.shape[1]), int(p0.shape[3])


def make_feed(ins, past_names, kv_heads, head_dim, ids: np.ndarray, past: list[np.ndarray] | None, past_len: int):
    b, s = ids.shape
    f = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + s), np.int64)}
    if "position_ids" in ins:
        f["position_ids"] = np.arange(past_len, past_len + s, dtype=np.int64)[None].repeat(b, 0)
    if past is None:
        past = [np.zeros((b, kv_heads, 0, head_dim), np.float32)] * len(past_names)
    f.update(zip(past_names, past))
    return f


def calibration_feeds(fp32_session, windows: list[list[int]]) -> list[dict]:
    """For each window: a prefill of the whole window (empty past), and the window's second half fed with the KV
    cache of its first half, so the past_key_values paths (Concat -> attention MatMuls) see real ranges.
    All prefills come first: ModelOpt's first feed must be a prefill (else its GEMV rule skips every MatMul)."""
    ins, past_names, kvh, hd = _io_names(fp32_session)
    prefills, with_past = [], []
    for w in windows:
        ids = np.asarray(w, np.int64)[None]
        prefills.append(make_feed(ins, past_names, kvh, hd, ids, None, 0))
        half = max(1, ids.shape[1] // 2)
        outs = fp32_session.run(None, make_feed(ins, past_names, kvh, hd, ids[:, :half], None, 0))
        with_past.append(make_feed(ins, past_names, kvh, hd, ids[:, half:], outs[1:], half))
    return prefills + with_past


class FeedReader:
    """onnxruntime CalibrationDataReader protocol plus get_first() (ModelOpt reads the first feed for shapes)."""

    def __init__(self, feeds: list[dict], progress=None):
        self.feeds, self.i, self.progress = feeds, 0, progress

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        if self.progress is not None:
            self.progress.update(1)
        return self.feeds[self.i - 1]

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int):
        self.feeds = self.feeds[start_index:end_index]


# --- ONNX Runtime static QDQ quantizer: calibrate once, quantize per exclusion set -----------------------------------

class Calibration:
    """Tensor ranges from one calibration pass, reused by every `quantize` call of the sensitivity sweep."""

    def __init__(self, fp32_path: Path, feeds: list[dict], method: str, symmetric: bool, progress=None):
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

        self.fp32_path = Path(fp32_path)
        self.model = load_model_with_shape_infer(self.fp32_path)
        cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[method]
        extra = {"symmetric": symmetric}
        if method == "percentile":
            extra["percentile"] = 99.999
        with tempfile.TemporaryDirectory(prefix="lmopt-calib-") as d:
            # the calibrator reads the model from disk; keep its copy next to the augmented graph
            cal = create_calibrator(self.fp32_path, ["MatMul", "Gemm"],
                                    augmented_model_path=os.path.join(d, "augmented.onnx"),
                                    calibrate_method=cm, extra_options=extra)
            cal.collect_data(FeedReader(feeds, progress))
            self.ranges = cal.compute_data()
            del cal

    def quantize(self, preset: QuantPreset, exclude: list[str], out_path: Path, model=None, ranges=None) -> None:
        """Q/DQ graph of the calibrated model (or of `model`: the same graph with other weights, e.g. smoothed only
        where a MatMul is quantized, whose quantized tensors have the ranges calibrated here)."""
        import copy

        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

        act = QuantType.QInt8 if preset.activation_type == "int8" else QuantType.QUInt8
        q = QDQQuantizer(copy.deepcopy(self.model if model is None else model), True, False, QuantType.QInt8, act,
                         self.ranges if ranges is None else ranges, [],
                         list(exclude), ["MatMul", "Gemm"],
                         {"ActivationSymmetric": preset.activation_symmetric, "WeightSymmetric": True})
        q.quantize_model()
        q.model.save_model_to_file(str(out_path), False)


def nbits_quantize(fp32_path: Path, bits: int, exclude: list[str], out_path: Path,
                   block_size: int = NBITS_BLOCK) -> None:
    """Weight-only block quantization of every MatMul with a constant weight (not in `exclude`) to MatMulNBits."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a node
    model = onnx.load(str(fp32_path))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                       accuracy_level=NBITS_ACCURACY_LEVEL, bits=bits)
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=cfg)
    q.process()
    big = q.model.model.ByteSize() > (1 << 31) - (64 << 20)
    q.model.save_model_to_file(str(out_path), big)


def modelopt_quantize(fp32_path: Path, feeds: list[dict], method: str, exclude: list[str], out_path: Path,
                      progress=None) -> None:
    """NVIDIA ModelOpt ONNX PTQ (made for TensorRT), run on CPU: see ENVIRONMENT.md for the arguments."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise UserError("ModelOpt is not installed — pip install nvidia-modelopt==0.47.0 (without the [onnx] extra)") \
            from None
    import logging

    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mo_method = {"minmax": "max", "entropy": "entropy"}.get(method)
    if mo_method is None:
        raise UserError(f"ModelOpt has no '{method}' calibration — use --method minmax or entropy with "
                        "--quantizer modelopt")
    import shutil

    # ModelOpt rewrites the model it is given in place (seen: the export's model.onnx changed size after a run),
    # so it quantizes a private copy and the stage-1 artifact stays what its manifest says
    with tempfile.TemporaryDirectory(prefix="lmopt-modelopt-") as d:
        src = Path(fp32_path)
        for f in src.parent.iterdir():
            if f.name.startswith(src.name):
                shutil.copy2(f, Path(d) / f.name)
        quantize(str(Path(d) / src.name), quantize_mode="int8", calibration_data_reader=FeedReader(feeds, progress),
                 calibration_method=mo_method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                 op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=list(exclude) or None,
                 output_path=str(out_path), log_level="WARNING")


# --- accuracy --------------------------------------------------------------------------------------------------------

def is_gqa_graph(session) -> bool:
    """The fused GroupQueryAttention decoder of lmopt.onnx_gqa (seqlens_k input), not optimum's graph."""
    return any(i.name == "seqlens_k" for i in session.get_inputs())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


NOISE_RESAMPLES = 2000


class Evaluator:
    """Held-out windows and greedy prompts scored once with the FP32 graph; candidates are compared against it."""

    def __init__(self, fp32_path: Path, windows: list[list[int]], prompts: list[list[int]], greedy_tokens: int,
                 max_positions: int, session_kwargs: dict | None = None, gqa_max_len: int | None = None):
        self.gqa_max_len = gqa_max_len or max_positions   # KV buffer positions of a fused GQA graph
        self.windows = [np.asarray(w, np.int64)[None] for w in windows]
        self.prompts, self.greedy_tokens, self.max_positions = prompts, greedy_tokens, max_positions
        ref = self._logits(fp32_path, {})
        self.ref_logits = ref
        self.ref_window_nll = self._window_nll(ref)
        self.ref_nll = self._nll(ref)
        self.ref_ppl = math.exp(self.ref_nll)
        self.ref_greedy = self._greedy(fp32_path, {})

    def _session(self, path, session_kwargs):
        from .engines.ort_engine import make_session

        return make_session(path, **session_kwargs)

    def _logits(self, path, session_kwargs) -> list[np.ndarray]:
        sess = self._session(path, session_kwargs)
        if is_gqa_graph(sess):
            del sess
            return self._gqa_logits(path, session_kwargs)
        ins, past_names, kvh, hd = _io_names(sess)
        out = [sess.run(["logits"], make_feed(ins, past_names, kvh, hd, w, None, 0))[0][0].astype(np.float32)
               for w in self.windows]
        del sess
        return out

    def _gqa_logits(self, path, session_kwargs) -> list[np.ndarray]:
        """Every position's logits of a fused GQA graph (which returns the last position only): the window's first
        token as a prefill, then one decode step per token (teacher forcing) through the ort-gqa engine."""
        eng = self._gqa_engine(path, session_kwargs)
        out = []
        for w in self.windows:
            ids = w[:, :1]
            lg, st = eng.prefill(ids, np.ones_like(ids), np.zeros_like(ids))
            rows = [lg[0]]
            for t in range(1, w.shape[1]):
                lg, st = eng.decode(st, w[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]], np.int64))
                rows.append(lg[0])
            eng.release(st)
            out.append(np.stack(rows).astype(np.float32))
        eng.close()
        return out

    def _gqa_engine(self, path, session_kwargs):
        from .engines.ort_gqa import OrtGqaEngine

        return OrtGqaEngine(path, "fp32", "cpu", session_kwargs.get("threads"), variant="candidate",
                            max_len=self.gqa_max_len, max_positions=self.max_positions)

    def _window_nll(self, logits: list[np.ndarray]) -> np.ndarray:
        """Summed next-token NLL of each window (row) and its number of predictions (column 1)."""
        out = np.zeros((len(self.windows), 2))
        for i, (lg, w) in enumerate(zip(logits, self.windows)):
            lp = _log_softmax(lg[:-1])
            tgt = w[0, 1:]
            out[i] = -float(lp[np.arange(len(tgt)), tgt].sum()), len(tgt)
        return out

    def _nll(self, logits: list[np.ndarray]) -> float:
        per = self._window_nll(logits)
        return float(per[:, 0].sum() / per[:, 1].sum())

    def noise(self, cand_window_nll: np.ndarray | None = None, resamples: int = NOISE_RESAMPLES,
              seed: int = 0) -> dict:
        """How far the perplexity figures would move on another evaluation text of the same size: a bootstrap over
        the evaluation windows (resampled with replacement, 95% percentile interval). `ppl_fp32_*` is the FP32
        perplexity's own spread; `ppl_increase_pct_*` (given a candidate's per-window NLL) is the spread of the
        paired difference the budget is checked on — both graphs scored on the same resampled windows."""
        ref = self.ref_window_nll
        n = len(ref)
        idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
        tokens = ref[idx, 1].sum(1)
        ref_ppl = np.exp(ref[idx, 0].sum(1) / tokens)
        lo, hi = np.percentile(ref_ppl, [2.5, 97.5])
        out = {"method": f"bootstrap over the {n} evaluation windows ({resamples} resamples, seed {seed}), 95% "
                         "percentile interval",
               "ppl_fp32_interval": [round(float(lo), 4), round(float(hi), 4)],
               "ppl_fp32_halfwidth_pct": round(float(50.0 * (hi - lo) / self.ref_ppl), 4)}
        if cand_window_nll is not None:
            d = 100.0 * (np.exp((cand_window_nll[idx, 0].sum(1) - ref[idx, 0].sum(1)) / tokens) - 1.0)
            dlo, dhi = np.percentile(d, [2.5, 97.5])
            out.update(ppl_increase_pct_interval=[round(float(dlo), 4), round(float(dhi), 4)],
                       ppl_increase_pct_halfwidth=round(float((dhi - dlo) / 2), 4))
        return out

    def _greedy(self, path, session_kwargs) -> list[list[int]]:
        from .engines.ort_engine import OrtEngine
        from .generate import SamplingParams, generate

        sess = self._session(path, session_kwargs)
        gqa = is_gqa_graph(sess)
        del sess
        eng = self._gqa_engine(path, session_kwargs) if gqa else \
            OrtEngine(path, max_positions=self.max_positions, session_kwargs=session_kwargs or None)
        out = generate(eng, self.prompts, SamplingParams(max_new_tokens=self.greedy_tokens)).tokens
        eng.close()
        return out

    def ppl(self, path, session_kwargs: dict | None = None) -> float:
        return math.exp(self._nll(self._logits(path, session_kwargs or {})))

    def delta_pct(self, ppl: float) -> float:
        return 100.0 * (ppl - self.ref_ppl) / self.ref_ppl

    def full(self, path, session_kwargs: dict | None = None) -> dict:
        """The accuracy table of a candidate graph vs FP32."""
        kw = session_kwargs or {}
        lg = self._logits(path, kw)
        per = self._window_nll(lg)
        ppl = math.exp(float(per[:, 0].sum() / per[:, 1].sum()))
        top1 = [np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in zip(lg, self.ref_logits)]
        dmax = max(float(np.abs(a - b).max()) for a, b in zip(lg, self.ref_logits))
        g = self._greedy(path, kw)
        same = sum(x == y for a, b in zip(g, self.ref_greedy) for x, y in zip(a, b))
        total = sum(len(b) for b in self.ref_greedy)
        prefix = []
        for a, b in zip(g, self.ref_greedy):
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            prefix.append(k)
        return {"ppl_fp32": round(self.ref_ppl, 4), "ppl": round(ppl, 4),
                "ppl_increase_pct": round(self.delta_pct(ppl), 4),
                "top1_agreement": round(float(np.mean(top1)), 4), "max_abs_dlogits": round(dmax, 5),
                "greedy_tokens": self.greedy_tokens, "greedy_prompts": len(self.prompts),
                "greedy_agreement": round(same / max(total, 1), 4),
                "greedy_identical_prefix": prefix,
                "eval_tokens": int(sum(w.shape[1] for w in self.windows)),
                "eval_windows": len(self.windows), "noise": self.noise(per)}


def accuracy_table(rows: dict[str, dict]) -> str:
    cols = [("ppl", "ppl"), ("ppl_increase_pct", "Δppl %"), ("top1_agreement", "top-1 agree"),
            ("max_abs_dlogits", "max |Δlogits|"), ("greedy_agreement", "greedy agree")]
    head = f"{'graph':<28}" + "".join(f"{c[1]:>15}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<28}" + "".join(f"{r.get(k, ''):>15}" for k, _ in cols))
    return "\n".join(lines)


# --- what really runs in INT8 ----------------------------------------------------------------------------------------

def _init_shapes(graph) -> dict[str, tuple]:
    return {i.name: tuple(i.dims) for i in graph.initializer}


def _attn_flops(shape: dict, ctx: int) -> int:
    # QK^T and A.V at decode: 2 * heads * head_dim * ctx each; heads/head_dim from the export manifest
    hd = shape.get("head_dim") or shape["hidden_size"] // shape["num_heads"]
    return 2 * shape["num_heads"] * hd * ctx


def int8_coverage(path: Path, shape: dict, ctx: int = 128) -> dict:
    """Save ONNX Runtime's optimised graph (CPU EP) and count the MatMuls that run as INT8 kernels vs float.
    FLOPs are per decoded token: weight MatMuls 2*K*N, attention MatMuls at a context of `ctx` tokens."""
    import onnx

    from .engines.ort_engine import make_session

    with tempfile.TemporaryDirectory(prefix="lmopt-opt-") as d:
        opt = Path(d) / "optimized.onnx"
        make_session(path, optimized_model_path=str(opt))
        g = onnx.load(str(opt)).graph
    inits = _init_shapes(g)
    wpos = {"QLinearMatMul": 3, "QGemm": 3, "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "MatMul": 1,
            "Gemm": 1, "FusedMatMul": 1, "DynamicQuantizeMatMul": 1}
    counts = {"int8": 0, "float": 0}
    flops = {"int8": 0, "float": 0}
    ops: dict[str, int] = {}
    for n in g.node:
        kind = "int8" if n.op_type in INT8_MATMUL_OPS else "float" if n.op_type in FLOAT_MATMUL_OPS else None
        if kind is None:
            continue
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        counts[kind] += 1
        if n.op_type == "MatMulNBits":  # its weight is a packed [N, blocks, bytes] blob: K and N are attributes
            a = {x.name: x.i for x in n.attribute}
            flops[kind] += 2 * a["K"] * a["N"]
            continue
        w = n.input[wpos.get(n.op_type, 1)] if len(n.input) > wpos.get(n.op_type, 1) else ""
        if w in inits and len(inits[w]) >= 2:
            flops[kind] += 2 * int(np.prod(inits[w][-2:]))
        elif w in inits:  # a 1-D/scalar operand (rotary inv_freq): negligible work
            flops[kind] += 2 * int(np.prod(inits[w]) or 1)
        else:
            flops[kind] += _attn_flops(shape, ctx)
    return {**_coverage("onnxruntime CPUExecutionProvider (graph after ORT optimisation)", counts, flops, ctx),
            "op_types": dict(sorted(ops.items()))}


def _coverage(engine: str, counts: dict, flops: dict, ctx: int) -> dict:
    """MatMuls and per-token MatMul FLOPs in INT8 vs float, as the manifests' int8_fallback records them."""
    total = counts["int8"] + counts["float"]
    ftotal = flops["int8"] + flops["float"]
    return {"engine": engine, "matmuls_int8": counts["int8"], "matmuls_float": counts["float"],
            "int8_ratio": round(counts["int8"] / total, 4) if total else 0.0,
            "flops_per_token_int8": flops["int8"], "flops_per_token_float": flops["float"],
            "int8_flop_fraction": round(flops["int8"] / ftotal, 4) if ftotal else 0.0,
            "attention_context_for_flops": ctx}


def qdq_coverage(path: Path, shape: dict, ctx: int = 128) -> dict:
    """In the saved Q/DQ graph: MatMul/Gemm nodes with DequantizeLinear on both inputs (TensorRT runs those as INT8
    GEMMs) vs the rest. FLOPs per decoded token as in int8_coverage."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = _init_shapes(g)
    counts = {"int8": 0, "float": 0}
    flops = {"int8": 0, "float": 0}
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        srcs = [producer.get(i) for i in n.input[:2]]
        kind = "int8" if all(s is not None and s.op_type == "DequantizeLinear" for s in srcs) else "float"
        counts[kind] += 1
        w = n.input[1]
        if srcs[1] is not None and srcs[1].op_type == "DequantizeLinear":
            w = srcs[1].input[0]
        dims = inits.get(w)
        if dims is not None:
            flops[kind] += 2 * int(np.prod(dims[-2:] if len(dims) >= 2 else dims) or 1)
        else:
            flops[kind] += _attn_flops(shape, ctx)
    return _coverage("TensorRT (Q/DQ pairs on both MatMul inputs in the graph)", counts, flops, ctx)


def decode_speed(fp32_path: Path, int8_path: Path, prompt: list[int], new_tokens: int = 64, rounds: int = 3,
                 threads: int | None = None, max_positions: int = 2048) -> dict:
    """A quick ONNX Runtime CPU check that the INT8 graph decodes faster than FP32: batch 1, greedy, rounds
    interleaved in one process (the shared CPU's load drifts; a ratio from alternating runs survives it).
    The benchmark of record is profile/benchmark.py."""
    import statistics

    from .engines.ort_engine import OrtEngine
    from .generate import SamplingParams, generate

    engines = {"fp32": OrtEngine(fp32_path, "fp32", threads=threads, max_positions=max_positions),
               "int8": OrtEngine(int8_path, "int8", threads=threads, max_positions=max_positions)}
    for e in engines.values():  # warm-up: first runs allocate and pick kernels
        generate(e, [prompt], SamplingParams(max_new_tokens=4))
    samples: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for k, e in engines.items():
            out = generate(e, [prompt], SamplingParams(max_new_tokens=new_tokens))
            samples[k].append(1000 * statistics.median(out.step_s))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"what": "median ms per decode step, ONNX Runtime CPU, batch 1, greedy",
            "prompt_tokens": len(prompt), "new_tokens": new_tokens, "rounds": rounds, "threads": threads,
            "samples_ms": {k: [round(x, 3) for x in v] for k, v in samples.items()},
            "median_ms": {k: round(v, 3) for k, v in med.items()},
            "int8_speedup": round(med["fp32"] / med["int8"], 3)}
