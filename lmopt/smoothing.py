"""SmoothQuant-style smoothing of an FP32 ONNX graph before INT8 quantization (stage 2, --smooth).

    sites = find_sites(model, skip)                    # MatMul inputs that can be smoothed, and what absorbs 1/s
    stats = collect_stats(fp32_path, sites, feeds)     # per-channel min/max of those inputs (and what they rescale)
    smoothed, n_mul = apply(model, sites, stats, {site.name: 0.5, ...})   # the FP32 function is unchanged
    ranges = smoothed_ranges(calibration.ranges, sites, stats, alphas, symmetric, model)  # minmax, no rerun

A MatMul Y = X W with a per-tensor INT8 activation scale suffers when a few input channels of X are far larger than
the rest (the SwiGLU product feeding Llama's down projection): those channels set the scale and every other channel
is left a handful of levels. SmoothQuant (Xiao et al., 2023) divides channel j of X by
s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha) and multiplies row j of W by s_j: X W is unchanged, the activation range
shrinks and the weight (quantized per output column) takes the difference. 1/s is folded into what produces X:
    norm    the RMSNorm / LayerNorm weight (and bias) whose output only these MatMuls read (q/k/v, gate/up, LM head)
    linear  the up projection's output columns (and bias) when X = act(gate) * up (the down projection)
    mul     an explicit Mul inserted before the MatMuls when nothing else can absorb it (the attention output
            projection); counted in the manifest because it costs an elementwise op per token.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

# auto: the alphas tried for the whole model, then per layer group around the best (SmoothQuant uses 0.5 for most
# models, 0.75-0.85 for its largest)
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization")


@dataclass
class Site:
    name: str                      # the first MatMul's scope, e.g. /model/layers.0/mlp/down_proj
    group: str                     # sensitivity-sweep group (decoder layer or node name)
    matmuls: list[str]             # MatMul nodes reading `input` (all with a constant 2-D weight)
    weights: list[str]             # their weight initializers, [K, N] each
    input: str                     # the activation tensor smoothed
    channels: int                  # K
    absorber: str                  # norm | linear | mul
    absorber_node: str = ""
    params: list[str] = field(default_factory=list)   # initializers divided by s along the channel axis
    column_params: list[str] = field(default_factory=list)  # [*, K] weights divided by s per column (linear)
    scaled: list[str] = field(default_factory=list)   # other tensors whose channel j smoothing divides by s_j

    def to_dict(self) -> dict:
        return asdict(self)


def group_of(node_name: str) -> str:
    """The sensitivity sweep's group key (quantize_model.sweep_groups, layer granularity)."""
    m = re.search(r"(?:layers|h)\.(\d+)/", node_name)
    return f"layer {m.group(1)}" if m else node_name


def find_sites(model, skip: list[str] = ()) -> list[Site]:
    """Every activation tensor read as input A by MatMuls with a constant 2-D weight, none of them in `skip`."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def const(name, ndim=None):
        return name in inits and (ndim is None or len(inits[name].dims) == ndim)

    by_input: dict[str, list] = {}
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and const(n.input[1], 2) and not const(n.input[0]):
            by_input.setdefault(n.input[0], []).append(n)
    sites = []
    for x, mms in by_input.items():
        if any(m.name in skip for m in mms):
            continue
        k = int(inits[mms[0].input[1]].dims[0])
        site = Site(name=mms[0].name.rsplit("/", 1)[0], group=group_of(mms[0].name), matmuls=[m.name for m in mms],
                    weights=[m.input[1] for m in mms], input=x, channels=k, absorber="mul")
        # Shape nodes read only the shape, which smoothing keeps
        only_mms = x not in outputs and all(c in mms or c.op_type == "Shape" for c in consumers.get(x, []))
        p = producer.get(x)
        if only_mms and p is not None:
            _absorber(site, p, inits, producer, consumers, outputs, k)
        sites.append(site)
    return sites


def _source(name, inits, producer):
    """The initializer behind `name`: itself, or what an Identity passes on (exporters deduplicate equal weights,
    e.g. a fresh model's all-ones norm weights, into one initializer and Identity nodes)."""
    p = producer.get(name)
    while name not in inits and p is not None and p.op_type == "Identity":
        name = p.input[0]
        p = producer.get(name)
    return name if name in inits else None


def _vec(name, inits, k, producer=None) -> bool:
    src = _source(name, inits, producer or {})
    return src is not None and [int(d) for d in inits[src].dims] == [k]


def _absorber(site, p, inits, producer, consumers, outputs, k) -> None:
    def only_feeds(tensor, node):
        return tensor not in outputs and [c.name for c in consumers.get(tensor, [])] == [node.name]

    if p.op_type == "Mul":
        a, b = p.input
        vec = [i for i in (a, b) if _vec(i, inits, k, producer)]
        if len(vec) == 1:                         # RMSNorm's last op: weight * normalised x
            site.absorber, site.absorber_node, site.params = "norm", p.name, vec
            return
        if not vec:                               # SwiGLU: act(gate) * up -> scale the up projection's columns
            for t in (b, a):
                q = producer.get(t)
                bias = None
                if q is not None and q.op_type == "Add" and only_feeds(t, p):
                    bias = next((i for i in q.input if _vec(i, inits, k, producer)), None)
                    other = next((i for i in q.input if i != bias), None)
                    if bias is None or other is None:
                        continue
                    t2, q = other, producer.get(other)
                    if q is None or not only_feeds(t2, producer[t]):
                        continue
                elif not only_feeds(t, p):
                    continue
                if q is not None and q.op_type == "MatMul" and q.input[1] in inits and \
                        len(inits[q.input[1]].dims) == 2 and int(inits[q.input[1]].dims[1]) == k:
                    site.absorber, site.absorber_node = "linear", q.name
                    site.column_params = [q.input[1]]
                    site.params = [bias] if bias else []
                    site.scaled = [q.output[0]] + ([t] if bias else [])   # the up projection's output (+ bias)
                    return
    elif p.op_type == "Add":                      # decomposed LayerNorm: (x * gamma) + beta
        beta = next((i for i in p.input if _vec(i, inits, k, producer)), None)
        other = next((i for i in p.input if i != beta), None)
        q = producer.get(other) if other else None
        if beta and q is not None and q.op_type == "Mul" and only_feeds(other, p):
            gamma = [i for i in q.input if _vec(i, inits, k, producer)]
            if len(gamma) == 1:
                site.absorber, site.absorber_node, site.params = "norm", p.name, gamma + [beta]
                site.scaled = [other]
    elif p.op_type in _NORM_OPS:
        params = [i for i in p.input[1:3] if i and _vec(i, inits, k, producer)]
        if params and len(p.output) >= 1:
            site.absorber, site.absorber_node, site.params = "norm", p.name, params


# --- statistics ------------------------------------------------------------------------------------------------------

def collect_stats(fp32_path, sites: list[Site], feeds: list[dict]) -> dict:
    """Per-channel min and max over every calibration feed of each site's input (and of the tensors between the
    absorber and it, which smoothing also rescales)."""
    import onnx

    from .engines.ort_engine import make_session

    model = onnx.load(str(fp32_path))
    have = {o.name for o in model.graph.output}
    names = list(dict.fromkeys(n for s in sites for n in [s.input, *s.scaled]))
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="lmopt-smooth-") as d:
        aug = Path(d) / "stats.onnx"
        onnx.save(model, str(aug), save_as_external_data=model.ByteSize() > (1 << 31) - (64 << 20))
        sess = make_session(aug)
    lo = {n: None for n in names}
    hi = {n: None for n in names}
    for f in feeds:
        outs = sess.run(names, f)
        for n, x in zip(names, outs):
            x = x.reshape(-1, x.shape[-1])
            mn, mx = x.min(0), x.max(0)
            lo[n] = mn if lo[n] is None else np.minimum(lo[n], mn)
            hi[n] = mx if hi[n] is None else np.maximum(hi[n], mx)
    del sess
    return {n: {"min": lo[n], "max": hi[n]} for n in names}


def smoothed_ranges(ranges, sites: list[Site], stats: dict, alphas: dict, symmetric: bool, model):
    """MinMax calibration ranges of a smoothed graph from those of the unsmoothed one: a smoothed MatMul input is
    X / s, whose per-tensor range follows from X's per-channel min/max (the same feeds), so the alpha search needs
    no calibration pass per candidate. Other quantized tensors are unchanged by smoothing."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    data = dict(ranges.data)
    for site in sites:
        a = alphas.get(site.name)
        if a is None:
            continue
        st = stats[site.input]
        s = scales(np.maximum(np.abs(st["min"]), np.abs(st["max"])), weight_absmax(model, site), a)
        name = site.input if site.absorber != "mul" else f"{site.name}/smooth_output_0"
        # a calibrator records every input and output of the MatMuls: the up projection's output is one of them
        for tensor, src in [(name, site.input)] + [(x, x) for x in site.scaled]:
            if tensor != name and tensor not in data:
                continue
            lo, hi = float((stats[src]["min"] / s).min()), float((stats[src]["max"] / s).max())
            if symmetric:
                lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
            data[tensor] = TensorData(lowest=np.array([lo], np.float32), highest=np.array([hi], np.float32))
    return TensorsData(ranges.calibration_method, data)


def weight_absmax(model, site: Site) -> np.ndarray:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    return np.max([np.abs(numpy_helper.to_array(inits[w])).max(1) for w in site.weights], axis=0)


def scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (SmoothQuant eq. 4); dead channels keep s = 1."""
    s = np.power(np.maximum(act_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1 - alpha)
    s = np.where((act_absmax > 0) & (w_absmax > 0), s, 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


# --- the rewrite ---------------------------------------------------------------------------------------------------

def apply(model, sites: list[Site], stats: dict, alphas: dict):
    """A copy of `model` with every site whose alpha is not None smoothed; returns (model, explicit Muls added)."""
    import copy

    import onnx
    from onnx import numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    nodes = {n.name: n for n in g.node}

    producer = {o: n for n in g.node for o in n.output}

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[_source(name, inits, producer)])

    def update(name: str, arr: np.ndarray, node_names: list[str]) -> None:
        """Write an initializer; one read by other nodes too (or through an Identity) gets a private copy: what
        other nodes read never changes."""
        if name not in inits or users.get(name, 0) > len(node_names):
            new = f"{name}_smoothed"
            g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), new))
            for nn in node_names:
                n = nodes[nn]
                for j, i in enumerate(n.input):
                    if i == name:
                        n.input[j] = new
        else:
            inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))

    explicit = 0
    inserts = {}
    for site in sites:
        alpha = alphas.get(site.name)
        if alpha is None:
            continue
        st = stats[site.input]
        absmax = np.maximum(np.abs(st["min"]), np.abs(st["max"]))
        s = scales(absmax, weight_absmax(m, site), alpha)
        for w, mm in zip(site.weights, site.matmuls):
            update(w, value(w) * s[:, None], [mm])
        if site.absorber == "norm":
            for p in site.params:
                update(p, value(p) / s, [site.absorber_node])
        elif site.absorber == "linear":
            add = None
            for p in site.column_params:
                update(p, value(p) / s[None, :], [site.absorber_node])
            for p in site.params:   # the up projection's bias (its Add node reads it)
                add = next(n.name for n in g.node if n.op_type == "Add" and p in n.input)
                update(p, value(p) / s, [add])
        else:
            inv = f"{site.name}/smooth_inv_scale"
            out = f"{site.name}/smooth_output_0"
            g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            inserts[site.matmuls[0]] = onnx.helper.make_node("Mul", [site.input, inv], [out],
                                                             name=f"{site.name}/SmoothMul")
            for mm in site.matmuls:
                nodes[mm].input[0] = out
            vi = next((v for v in g.value_info if v.name == site.input), None)
            if vi is not None:   # the quantizer skips a tensor whose type it cannot infer
                nv = copy.deepcopy(vi)
                nv.name = out
                g.value_info.append(nv)
            explicit += 1
    if inserts:   # each explicit Mul right before the first MatMul it feeds (the graph stays topologically sorted)
        order = []
        for n in g.node:
            if n.name in inserts:
                order.append(inserts[n.name])
            order.append(n)
        order = [copy.deepcopy(n) for n in order]
        del g.node[:]
        g.node.extend(order)
    return m, explicit


# --- one stage run ---------------------------------------------------------------------------------------------------

def parse_alpha(value: str) -> float | str | None:
    """--smooth: '' (off), 'auto', or an alpha in [0, 1]."""
    from .errors import UserError

    if value in ("", None):
        return None
    if value == "auto":
        return "auto"
    try:
        a = float(value)
    except ValueError:
        a = float("nan")
    if not 0.0 <= a <= 1.0:
        raise UserError(f"--smooth must be an alpha between 0 and 1 or 'auto' (got {value!r})")
    return a


class Smoother:
    """Sites and activation statistics once per stage run; smoothed graphs per activation scheme (the auto search
    picks alphas for the target's own quantizer: symmetric int8 for TensorRT, asymmetric uint8 for ONNX Runtime)."""

    def __init__(self, fp32_path, feeds: list[dict], skip: list[str], alpha):
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

        self.alpha = alpha
        self.model = load_model_with_shape_infer(fp32_path)   # shapes kept: QDQQuantizer reads them
        self.sites = find_sites(self.model, skip)
        self.stats = collect_stats(fp32_path, self.sites, feeds)
        self.chosen: dict[bool, dict] = {}    # auto: {symmetric: {site: alpha}} once the search has run
        self.search_log: dict[bool, dict] = {}

    def fix(self, symmetric: bool, alphas: dict, log: dict) -> None:
        self.chosen[symmetric], self.search_log[symmetric] = dict(alphas), log

    def alphas(self, symmetric: bool, exclude=(), alphas: dict | None = None) -> dict:
        """Alpha per site; a site whose MatMuls all stay FP32 is left as it is (its input is not quantized)."""
        ex = set(exclude)
        if alphas is None:
            if self.alpha == "auto" and symmetric not in self.chosen:
                raise RuntimeError("--smooth auto: the alpha search has not run for this target")
            alphas = self.chosen[symmetric] if self.alpha == "auto" else {s.name: self.alpha for s in self.sites}
        return {s.name: (None if all(m in ex for m in s.matmuls) else alphas.get(s.name)) for s in self.sites}

    def graph(self, symmetric: bool, exclude=(), alphas: dict | None = None):
        return apply(self.model, self.sites, self.stats, self.alphas(symmetric, exclude, alphas))[0]

    def ranges(self, ranges, symmetric: bool, exclude=(), alphas: dict | None = None):
        return smoothed_ranges(ranges, self.sites, self.stats, self.alphas(symmetric, exclude, alphas), symmetric,
                               self.model)

    def report(self, symmetric: bool, exclude=()) -> dict:
        """What the manifest records: alpha per site and per layer group, explicit Muls, what absorbed each 1/s."""
        alphas = self.alphas(symmetric, exclude)
        sites = []
        per_layer: dict[str, dict] = {}
        for s in self.sites:
            a = alphas[s.name]
            row = {"site": s.name, "group": s.group, "matmuls": s.matmuls, "absorber": s.absorber,
                   "absorbed_by": s.absorber_node or None, "alpha": a}
            sites.append(row)
            per_layer.setdefault(s.group, {})[s.name.rsplit("/", 1)[-1]] = a
        return {"alpha": self.alpha, "search": self.search_log.get(symmetric),
                "activation_scheme": "symmetric int8" if symmetric else "asymmetric uint8",
                "sites_smoothed": sum(a is not None for a in alphas.values()), "sites": sites,
                "alpha_per_layer": per_layer,
                "explicit_muls": sum(1 for s in self.sites if s.absorber == "mul" and alphas[s.name] is not None),
                "absorbed": {k: sum(1 for s in self.sites if s.absorber == k and alphas[s.name] is not None)
                             for k in ("norm", "linear")}}
