"""Small ONNX graph edits that do not touch the weights.

`last_token_logits(src, dst)`: a copy of an exported decoder graph whose `logits` output holds only the last
position ([batch, 1, vocab]). Prefill of a 2048-token prompt with a 128k vocabulary otherwise materialises and copies
a [1, 2048, 128256] tensor (0.5 GB in FP16) to read one row. The copy references the same external-data file, so
it must stay in the source folder.
"""
from __future__ import annotations

from pathlib import Path


def last_token_logits(src: str | Path, dst: str | Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("the edited graph must sit next to the source (shared external data)")
    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    out = next(o for o in g.output if o.name == "logits")
    # rename the producer's output, then slice [:, -1:, :] into a new tensor called "logits"
    full = "logits_all_positions"
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = full
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
              (("_ll_start", -1), ("_ll_end", 2**62), ("_ll_axis", 1))]
    g.initializer.extend(consts)
    g.node.append(helper.make_node("Slice", [full, "_ll_start", "_ll_end", "_ll_axis"], ["logits"],
                                   name="last_token_logits"))
    dims = out.type.tensor_type.shape.dim
    dims[1].ClearField("dim_param")
    dims[1].dim_value = 1
    onnx.save(m, str(dst))
    return dst


def ort_fp16_graph(src: str | Path, dst: str | Path, shape: dict, use_gpu: bool = True) -> dict:
    """FP16 graph for ONNX Runtime from the FP32 export: ONNX Runtime's transformer optimizer fuses what it
    recognises (LayerNorm/RMSNorm, residual Add + norm into SkipLayerNormalization, GELU), then its FP16 converter
    turns the whole graph, KV-cache inputs and outputs included, into FP16 with type-consistent casts.

    Converting the FP32 graph avoids the mixed-type graph optimum writes from an FP16 PyTorch GPT-2 (a
    LayerNormalization bound to float and float16 at once, which ONNX Runtime refuses to load: docs/ENVIRONMENT.md,
    "ONNX Runtime CUDA"). Returns the optimizer's fused-operator counts (recorded in the manifest).
    `dst` must not be `src`; a graph over 2 GB is written with external data next to it."""
    from onnxruntime.transformers.optimizer import optimize_model

    src, dst = Path(src), Path(dst)
    # "gpt2" is the decoder fusion set of ONNX Runtime's optimizer; it applies to Llama graphs too (RMSNorm ->
    # SimplifiedLayerNormalization). Attention is left as exported: its fusions match ONNX Runtime's own exporters'
    # patterns, not optimum's SDPA subgraph (see docs/ENVIRONMENT.md).
    opt = optimize_model(str(src), model_type="gpt2", num_heads=shape["num_heads"], hidden_size=shape["hidden_size"],
                         opt_level=0, use_gpu=use_gpu)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.convert_float_to_float16(keep_io_types=False, use_symbolic_shape_infer=True)
    big = sum(t.ByteSize() for t in opt.model.graph.initializer) > (1 << 31) - (64 << 20)
    opt.save_model_to_file(str(dst), use_external_data_format=big)
    return fused
