"""A fused decoder graph for ONNX Runtime, built from the Hugging Face weights: attention is one
`com.microsoft.GroupQueryAttention` node per layer over a fixed-size KV buffer.

    build_gqa_decoder(model, "model.onnx", dtype="fp16", max_len=2048)

Why not the optimum export: its attention is an SDPA subgraph that ONNX Runtime's transformer optimizer does not
fuse, and its KV cache grows by a Concat every step, so shapes change and the decode step cannot be replayed as an
ONNX Runtime CUDA graph (docs/ENVIRONMENT.md, "ONNX Runtime CUDA"). Here:

- GroupQueryAttention (GQA) takes the packed QKV projection, applies rotary embeddings itself (Llama; `do_rotary`,
  cos/sin tables as initializers from the model's own rotary module, so any rope scaling is honoured) and writes the
  new keys/values into `past_key_values.N.{key,value}` [batch, kv_heads, max_len, head_dim] in place: bound as both
  input and output (`present.N.*`), the buffers never move, which is what a CUDA graph needs.
- Each row has its own length (`seqlens_k` = tokens in the cache after this step - 1, int32 [batch]): rows of one
  decode step may sit at different positions, and a batch of prompts is right-padded (GQA's convention) rather
  than left-padded. `total_sequence_length` (int32 scalar) is the longest row's length.
- `last_index` int64 [batch]: the position inside this call whose logits are returned (the last real token of each
  right-padded prompt; 0 in decode), so the graph computes [batch, 1, vocab] logits, never [batch, seq, vocab].
- Norms are ONNX Runtime's fused kernels (SimplifiedLayerNormalization for RMSNorm, LayerNormalization), GPT-2's
  GELU is FastGelu with its bias; everything else is MatMul/Add/Mul.

Supported: Llama-family (Llama, Mistral, Qwen2 without sliding window) and GPT-2. Inputs: input_ids int64
[batch, seq], position_ids int64 [batch, seq] (GPT-2's learned positions; Llama ignores it), seqlens_k,
total_sequence_length, last_index, the KV buffers. Outputs: logits [batch, 1, vocab], present.N.* (the buffers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .models import model_shape

MS = "com.microsoft"


class _Graph:
    def __init__(self, dtype):
        self.nodes, self.inits, self.np_dtype, self.n = [], [], dtype, 0

    def w(self, name: str, array, dtype=None) -> str:
        from onnx import numpy_helper

        a = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.np_dtype))
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "", **attrs):
        from onnx import helper

        self.n += 1
        base = name or f"{op_type}_{self.n}"
        outs = [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def _t(p) -> np.ndarray:
    return p.detach().float().cpu().numpy()


def build_gqa_decoder(model, path: str | Path, dtype: str = "fp16", max_len: int | None = None) -> dict:
    """Write the fused graph of a loaded HF model to `path` (external data beside it when over 2 GB); returns a
    description (op counts, max_len) for the manifest."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    if dtype not in ("fp16", "fp32"):
        raise UserError(f"the GQA graph is built in fp16 or fp32 (got {dtype})")
    sh = model_shape(model.config)
    mt = sh["model_type"]
    if mt not in ("llama", "mistral", "qwen2", "gpt2"):
        raise UserError(f"no GQA graph builder for model type '{mt}' — use the optimum export (--dtype fp16)")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True) \
            and mt != "gpt2" and model.config.sliding_window < (max_len or sh["max_positions"]):
        raise UserError("sliding-window attention is not built into the GQA graph — use the optimum export")
    max_len = min(max_len or sh["max_positions"], sh["max_positions"])
    npd = np.float16 if dtype == "fp16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    H, D, KV, nh, L = sh["hidden_size"], sh["head_dim"], sh["num_kv_heads"], sh["num_heads"], sh["num_layers"]
    g = _Graph(npd)
    sd = {k: v for k, v in model.state_dict().items()}

    seqlens, total = "seqlens_k", "total_sequence_length"
    if mt == "gpt2":
        x = g.op("Add", [g.op("Gather", [g.w("wte", _t(sd["transformer.wte.weight"])), "input_ids"]),
                         g.op("Gather", [g.w("wpe", _t(sd["transformer.wpe.weight"])), "position_ids"])])
        eps = model.config.layer_norm_epsilon
        cos = sin = ""
    else:
        x = g.op("Gather", [g.w("embed", _t(sd["model.embed_tokens.weight"])), "input_ids"])
        eps = model.config.rms_norm_eps
        # the model's own rotary module gives cos/sin for every position (any rope scaling); GQA wants [max_len, D/2]
        with torch.no_grad():
            rot = model.model.rotary_emb
            pos = torch.arange(max_len)[None]
            c, s = rot(torch.zeros(1, dtype=torch.float32), pos)
        cos = g.w("cos_cache", c[0, :, : D // 2].float().numpy())
        sin = g.w("sin_cache", s[0, :, : D // 2].float().numpy())

    def linear(inp, w_name, w, b=None, transpose=True):
        y = g.op("MatMul", [inp, g.w(w_name, w.T if transpose else w)])
        return g.op("Add", [y, g.w(w_name + ".bias", b)]) if b is not None else y

    for i in range(L):
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if mt == "gpt2":
            p = f"transformer.h.{i}."
            h = g.op("LayerNormalization", [x, g.w(p + "ln_1.w", _t(sd[p + "ln_1.weight"])),
                                            g.w(p + "ln_1.b", _t(sd[p + "ln_1.bias"]))], axis=-1, epsilon=eps)
            qkv = linear(h, p + "c_attn", _t(sd[p + "attn.c_attn.weight"]), _t(sd[p + "attn.c_attn.bias"]),
                         transpose=False)  # GPT-2's Conv1D stores [in, out]
        else:
            p = f"model.layers.{i}."
            h = g.op("SimplifiedLayerNormalization", [x, g.w(p + "ln_1", _t(sd[p + "input_layernorm.weight"]))],
                     axis=-1, epsilon=eps, stash_type=1)
            wqkv = np.concatenate([_t(sd[p + f"self_attn.{n}_proj.weight"]) for n in "qkv"], 0)
            bias = None
            if p + "self_attn.q_proj.bias" in sd:  # Qwen2
                bias = np.concatenate([_t(sd[p + f"self_attn.{n}_proj.bias"]) for n in "qkv"], 0)
            qkv = linear(h, p + "qkv", wqkv, bias)
        attn, _, _ = g.op("GroupQueryAttention", [qkv, "", "", pk, pv, seqlens, total, cos, sin], n_out=3,
                          domain=MS, name=f"gqa_{i}", num_heads=nh, kv_num_heads=KV,
                          do_rotary=0 if mt == "gpt2" else 1, rotary_interleaved=0)
        # name the GQA outputs present.N.* (bound to the same buffers as the past inputs)
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        if mt == "gpt2":
            o = linear(attn, p + "c_proj", _t(sd[p + "attn.c_proj.weight"]), _t(sd[p + "attn.c_proj.bias"]),
                       transpose=False)
            x = g.op("Add", [x, o])
            h = g.op("LayerNormalization", [x, g.w(p + "ln_2.w", _t(sd[p + "ln_2.weight"])),
                                            g.w(p + "ln_2.b", _t(sd[p + "ln_2.bias"]))], axis=-1, epsilon=eps)
            fc = g.op("MatMul", [h, g.w(p + "c_fc", _t(sd[p + "mlp.c_fc.weight"]))])
            act = g.op("FastGelu", [fc, g.w(p + "c_fc.bias", _t(sd[p + "mlp.c_fc.bias"]))], domain=MS)
            x = g.op("Add", [x, linear(act, p + "mlp.c_proj", _t(sd[p + "mlp.c_proj.weight"]),
                                       _t(sd[p + "mlp.c_proj.bias"]), transpose=False)])
        else:
            x = g.op("Add", [x, linear(attn, p + "o", _t(sd[p + "self_attn.o_proj.weight"]))])
            h = g.op("SimplifiedLayerNormalization", [x, g.w(p + "ln_2", _t(sd[p + "post_attention_layernorm.weight"]))],
                     axis=-1, epsilon=eps, stash_type=1)
            gate = linear(h, p + "gate", _t(sd[p + "mlp.gate_proj.weight"]))
            up = linear(h, p + "up", _t(sd[p + "mlp.up_proj.weight"]))
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
            x = g.op("Add", [x, linear(act, p + "down", _t(sd[p + "mlp.down_proj.weight"]))])

    if mt == "gpt2":
        x = g.op("LayerNormalization", [x, g.w("ln_f.w", _t(sd["transformer.ln_f.weight"])),
                                        g.w("ln_f.b", _t(sd["transformer.ln_f.bias"]))], axis=-1, epsilon=eps)
        head = _t(sd["transformer.wte.weight"])
    else:
        x = g.op("SimplifiedLayerNormalization", [x, g.w("norm", _t(sd["model.norm.weight"]))], axis=-1,
                 epsilon=eps, stash_type=1)
        head = _t(sd["lm_head.weight"]) if "lm_head.weight" in sd else _t(sd["model.embed_tokens.weight"])
    # only the row of each sequence's last real token reaches the LM head
    idx = g.op("Expand", [g.op("Reshape", ["last_index", g.w("shape_b11", [-1, 1, 1], np.int64)]),
                          g.w("shape_11h", [1, 1, H], np.int64)])
    last = g.op("GatherElements", [x, idx], axis=1)
    g.op("MatMul", [last, g.w("lm_head", head.T)], name="lm_head")
    g.nodes[-1].output[0] = "logits"

    kv_shape = ["batch", KV, "max_len", D]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(seqlens, TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info(total, TensorProto.INT32, []),
              helper.make_tensor_value_info("last_index", TensorProto.INT64, ["batch"])]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch", 1, sh["vocab_size"]])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", elem, kv_shape))
    graph = helper.make_graph(g.nodes, f"{mt}-gqa-decoder", inputs, outputs, g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                          producer_name="lmopt.onnx_gqa")
    m.ir_version = 8
    path = Path(path)
    big = sum(t.ByteSize() for t in g.inits) > (1 << 31) - (64 << 20)
    onnx.save(m, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=path.name + "_data" if big else None)
    from collections import Counter

    return {"attention": "GroupQueryAttention", "max_len": max_len, "dtype": dtype,
            "op_counts": dict(Counter(n.op_type for n in g.nodes))}
