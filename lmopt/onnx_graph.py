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
