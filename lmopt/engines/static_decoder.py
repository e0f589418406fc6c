"""A gpt-fast style decoder over a static, slotted KV cache, with weights taken from a Hugging Face model.

Two architectures, one module:
    llama   Llama, Mistral, Qwen2: fused QKV (+ bias for Qwen2), rotary embeddings (rotate-half layout, the inverse
            frequencies taken from the HF model so llama3/linear/dynamic rope scaling come along), RMSNorm, SwiGLU
            with gate and up fused, grouped-query attention, tied or untied head
    gpt2    learned positions, LayerNorm, GELU (tanh), fused QKV; HF's Conv1D weights are [in, out]: transposed

The cache of each layer is one tensor [num_slots, kv_heads, max_len + 1, head_dim]. Column `max_len` is a scratch
column: rows of a padded decode batch that belong to no request write there, so the captured graph never needs a
branch. Attention reads only the first `kv_len` columns (a bucket chosen by the engine), not the whole cache.

`decode(ids, pos, kv_len)` is the step that is compiled and captured: row b is slot b (rows 0..B-1 are a plain view
of the cache, no gather), one token per row at its own position. `decode_fused` is the same step built from the
fused kernels of lmopt.engines.kernels (five launches per layer on CUDA, captured without torch.compile; the torch
reference of each kernel on the CPU). `prefill(slots, ids, starts, lengths)` appends a
chunk to each slot, causal within the chunk and attending to the slot's past.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)
SUPPORTED = LLAMA_TYPES + GPT2_TYPES


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # the order of operations of HF's LlamaRMSNorm (normalize in fp32, cast back, then scale), so fp16 logits match
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self, arch: str, n_heads: int, n_kv: int, head_dim: int, eps: float):
        super().__init__()
        self.arch, self.n_heads, self.n_kv, self.head_dim, self.eps = arch, n_heads, n_kv, head_dim, eps
        for name in ("wqkv", "bqkv", "wo", "bo", "w1", "b1", "w2", "b2", "n1w", "n1b", "n2w", "n2b",
                     "k_cache", "v_cache"):
            self.register_buffer(name, None, persistent=False)
        self.quant: dict = {}        # weight name -> weight_quant callable, for weight-only quantized layers

    # ---- pieces shared by prefill and decode
    def _lin(self, x, name: str, b=None):
        q = self.quant.get(name)
        return F.linear(x, getattr(self, name), b) if q is None else q(x, b)

    def _qkv(self, h: torch.Tensor):
        qkv = self._lin(h, "wqkv", self.bqkv)
        d = self.head_dim
        q, k, v = qkv.split([self.n_heads * d, self.n_kv * d, self.n_kv * d], dim=-1)
        return (q.unflatten(-1, (self.n_heads, d)), k.unflatten(-1, (self.n_kv, d)), v.unflatten(-1, (self.n_kv, d)))

    def _norm(self, x, w, b):
        if self.arch == "gpt2":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        return _rms_norm(x, w, self.eps)

    def _mlp(self, x):
        if self.arch == "gpt2":
            return self._lin(F.gelu(self._lin(x, "w1", self.b1), approximate="tanh"), "w2", self.b2)
        gate, up = self._lin(x, "w1").chunk(2, dim=-1)
        return self._lin(F.silu(gate) * up, "w2")

    def _paged_kv(self, k, v, w_blk, w_off, read_idx):
        """Paged cache [num_blocks + 1, block_size, KV, D]: write k, v ([..., KV, D]) at (w_blk, w_off) (block ids
        and offsets, shaped like k's leading dims), then gather the blocks `read_idx` [rows, nb] of each row as
        [rows, KV, nb * block_size, D] (a copy: the simplest correct path, docs/paged_kv.md)."""
        self.k_cache[w_blk, w_off] = k
        self.v_cache[w_blk, w_off] = v
        if read_idx is None:
            return None, None
        kc = self.k_cache[read_idx].flatten(1, 2).transpose(1, 2)       # [rows, nb, bs, KV, D] -> [rows, KV, L, D]
        vc = self.v_cache[read_idx].flatten(1, 2).transpose(1, 2)
        return kc, vc

    # ---- decode: x [B, C], row b = slot b
    def decode(self, x, cos, sin, rows, pos, mask, kv_len: int, paged=None):
        B = x.shape[0]
        q, k, v = self._qkv(self._norm(x, self.n1w, self.n1b))          # [B, H, D], [B, KV, D]
        if cos is not None:
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        if paged is None:
            self.k_cache[rows, :, pos] = k
            self.v_cache[rows, :, pos] = v
            kc = self.k_cache[:B, :, :kv_len]                            # [B, KV, L, D] (a view)
            vc = self.v_cache[:B, :, :kv_len]
        elif paged[3]:   # the paged attention kernel reads through the block table (lmopt.engines.paged_attention)
            from .paged_attention import paged_decode_attention

            self._paged_kv(k, v, paged[0], paged[1], None)
            a = paged_decode_attention(q, self.k_cache, self.v_cache, paged[2], pos)
            x = x + self._lin(a, "wo", self.bo)
            return x + self._mlp(self._norm(x, self.n2w, self.n2b))
        else:
            kc, vc = self._paged_kv(k, v, *paged[:3])
        # grouped-query attention without expanding the cache: the G query heads of one KV head are treated as G
        # queries of that head, so each KV head is read once
        g = self.n_heads // self.n_kv
        qg = q.view(B, self.n_kv, g, self.head_dim)
        if mask.dtype == torch.bool:       # three kernels: scores, masked softmax (fp32), weighted sum
            s = torch.matmul(qg, kc.transpose(-1, -2)).float() * (self.head_dim ** -0.5)   # [B, KV, G, L]
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1).to(q.dtype)
            a = torch.matmul(p, vc)
        else:                              # an additive mask: one fused attention kernel (SDPA, memory-efficient)
            a = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask[:, None, None, :].expand(B, 1, g, kv_len))
        a = a.reshape(B, self.n_heads * self.head_dim)
        x = x + self._lin(a, "wo", self.bo)
        return x + self._mlp(self._norm(x, self.n2w, self.n2b))

    # ---- the same step from fused kernels (lmopt.engines.kernels): norm+QKV, rotary+cache write+attention,
    # output projection+residual, norm+gate/up+SwiGLU (GELU), down projection+residual
    def _w(self, name: str):
        return self.quant.get(name, getattr(self, name))

    def decode_fused(self, x, pos, kv_len: int, cos, sin, max_len: int):
        from . import kernels as K

        kind = "layer" if self.arch == "gpt2" else "rms"
        qkv = K.linear(x, self._w("wqkv"), self.bqkv, K.Norm(kind, self.n1w, self.n1b, self.eps))
        a = K.decode_attention(qkv, self.k_cache, self.v_cache, pos, cos, sin, kv_len, self.n_heads, self.n_kv,
                               self.head_dim, max_len)
        x = K.linear(a, self._w("wo"), self.bo, residual=x)
        h = K.linear(x, self._w("w1"), self.b1, K.Norm(kind, self.n2w, self.n2b, self.eps),
                     act="gelu" if self.arch == "gpt2" else "silu_pair")
        return K.linear(h, self._w("w2"), self.b2, residual=x)

    # ---- prefill: x [R, S, C]; row r writes slot slots[r] at positions starts[r] + i
    def prefill(self, x, cos, sin, slot_rows, write_pos, attn):
        R, S, _ = x.shape
        q, k, v = self._qkv(self._norm(x, self.n1w, self.n1b))          # [R, S, H, D]
        if cos is not None:
            q = q * cos[:, :, None] + _rotate_half(q) * sin[:, :, None]
            k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
        paged = attn.get("paged")
        if paged is None:
            self.k_cache[slot_rows, :, write_pos] = k                    # index [R, S] -> values [R, S, KV, D]
            self.v_cache[slot_rows, :, write_pos] = v
        else:
            kc, vc = self._paged_kv(k, v, *paged)
        q = q.transpose(1, 2)
        if paged is not None and not attn["fresh"]:
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn["mask"], enable_gqa=True)
        elif attn["fresh"]:
            # every row starts at 0: causal attention over the chunk itself (flash attention on a GPU); padded
            # tail positions of shorter rows only see real keys before them and are never read
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=True)
        else:
            kv_len, idx = attn["kv_len"], attn["cache_index"]
            kc, vc = self.k_cache[idx, :, :kv_len], self.v_cache[idx, :, :kv_len]   # a view for a slice of slots
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn["mask"], enable_gqa=True)
        a = o.transpose(1, 2).reshape(R, S, self.n_heads * self.head_dim)
        x = x + self._lin(a, "wo", self.bo)
        return x + self._mlp(self._norm(x, self.n2w, self.n2b))


class StaticDecoder(nn.Module):
    """The decoder; build it with `from_hf`, then `allocate_cache`."""

    def __init__(self, arch: str, cfg: dict):
        super().__init__()
        self.arch, self.cfg = arch, cfg
        self.layers = nn.ModuleList(Block(arch, cfg["n_heads"], cfg["n_kv"], cfg["head_dim"], cfg["eps"])
                                    for _ in range(cfg["n_layers"]))
        for name in ("emb", "pos_emb", "norm_w", "norm_b", "head", "cos", "sin"):
            self.register_buffer(name, None, persistent=False)
        self.num_slots = 0
        self.max_len = 0
        self.decode_attention = "matmul"      # or "sdpa" (see Block.decode)
        self.paged = False                    # allocate_cache(..., num_blocks=...) makes the cache paged
        self.paged_attention = "gather"       # paged decode attention: gather + SDPA, or "triton" (the kernel)
        self.head_quant = None
        self.weight_quant: str | None = None

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf, dtype: torch.dtype, device: str) -> "StaticDecoder":
        """Copy (and fuse) the weights of an HF causal LM of a supported architecture."""
        c = hf.config
        mt = getattr(c, "model_type", None)
        if mt not in SUPPORTED:
            raise UserError(f"architecture '{mt}' is not supported by the compiled engine (supported: "
                            f"{', '.join(SUPPORTED)}) — use --engine torch for this model")

        def t(w):
            return None if w is None else w.detach().to(device=device, dtype=dtype).contiguous()

        if mt in GPT2_TYPES:
            if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False) \
                    or not getattr(c, "scale_attn_weights", True):
                raise UserError("this GPT-2 config changes attention scaling, which the compiled engine does not "
                                "implement — use --engine torch for this model")
            act = getattr(c, "activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise UserError(f"GPT-2 activation '{act}' is not supported by the compiled engine (gelu_new only) "
                                "— use --engine torch")
            tr = hf.transformer

            def lin(mod):  # HF's Conv1D stores [in, out]; F.linear wants [out, in]
                return mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight

            n_heads = c.n_head
            cfg = dict(n_layers=c.n_layer, n_heads=n_heads, n_kv=n_heads, head_dim=c.n_embd // n_heads,
                       eps=c.layer_norm_epsilon, vocab=c.vocab_size, max_positions=c.n_positions)
            m = cls("gpt2", cfg)
            for blk, h in zip(m.layers, tr.h):
                blk.wqkv, blk.bqkv = t(lin(h.attn.c_attn)), t(h.attn.c_attn.bias)
                blk.wo, blk.bo = t(lin(h.attn.c_proj)), t(h.attn.c_proj.bias)
                blk.w1, blk.b1 = t(lin(h.mlp.c_fc)), t(h.mlp.c_fc.bias)
                blk.w2, blk.b2 = t(lin(h.mlp.c_proj)), t(h.mlp.c_proj.bias)
                blk.n1w, blk.n1b, blk.n2w, blk.n2b = t(h.ln_1.weight), t(h.ln_1.bias), t(h.ln_2.weight), t(h.ln_2.bias)
            m.emb, m.pos_emb = t(tr.wte.weight), t(tr.wpe.weight)
            m.norm_w, m.norm_b = t(tr.ln_f.weight), t(tr.ln_f.bias)
            head = hf.get_output_embeddings().weight
            m.head = m.emb if head is tr.wte.weight else t(head)
            return m

        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            raise UserError(f"activation '{act}' is not supported by the compiled engine (silu only) — use --engine "
                            "torch")
        body = hf.model
        a0 = body.layers[0].self_attn
        n_heads = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        head_dim = a0.q_proj.weight.shape[0] // n_heads
        cfg = dict(n_layers=c.num_hidden_layers, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=c.rms_norm_eps,
                   vocab=c.vocab_size, max_positions=c.max_position_embeddings,
                   sliding_window=getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True)
                   else None)
        m = cls("llama", cfg)
        for blk, layer in zip(m.layers, body.layers):
            at, mlp = layer.self_attn, layer.mlp
            if getattr(mlp.gate_proj, "bias", None) is not None or getattr(at.o_proj, "bias", None) is not None:
                raise UserError("MLP/output biases are not supported by the compiled engine — use --engine torch")
            blk.wqkv = t(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]))
            if at.q_proj.bias is not None:  # Qwen2
                blk.bqkv = t(torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]))
            blk.wo = t(at.o_proj.weight)
            blk.w1 = t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            blk.w2 = t(mlp.down_proj.weight)
            blk.n1w, blk.n2w = t(layer.input_layernorm.weight), t(layer.post_attention_layernorm.weight)
        m.emb = t(body.embed_tokens.weight)
        m.norm_w = t(body.norm.weight)
        head = hf.get_output_embeddings().weight
        m.head = m.emb if head is body.embed_tokens.weight else t(head)
        # HF's own inverse frequencies (and attention scaling) carry the static rope-scaling variants (linear, llama3,
        # yarn); the ones that change the frequencies with the sequence length need HF's runtime update
        rot = body.rotary_emb
        rope_type = getattr(rot, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise UserError(f"rope scaling '{rope_type}' changes with the sequence length, which the compiled engine "
                            "does not implement — use --engine torch for this model")
        m._inv_freq = rot.inv_freq.detach().float().to(device)
        m._rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        return m

    def allocate_cache(self, num_slots: int, max_len: int, num_blocks: int | None = None,
                       block_size: int | None = None) -> None:
        """The contiguous cache (one row of max_len + 1 positions per slot), or with `num_blocks` the paged one:
        blocks of `block_size` positions, [num_blocks + 1, block_size, kv_heads, head_dim] per layer (the last block
        is scratch), and a block table [num_slots, max_len / block_size + 1] (block ids of each slot's positions;
        the last column and every unused entry point at the scratch block)."""
        c = self.cfg
        dt, dev = self.emb.dtype, self.emb.device
        if self.arch == "llama":
            sw = c.get("sliding_window")
            if sw and max_len > sw:
                raise UserError(f"this model uses a sliding attention window of {sw} tokens, which the compiled "
                                f"engine does not implement — pass a max length of at most {sw}")
            pos = torch.arange(max_len, device=dev, dtype=torch.float32)
            freqs = torch.outer(pos, self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = (emb.cos() * self._rope_scale).to(dt)
            self.sin = (emb.sin() * self._rope_scale).to(dt)
        self.paged = num_blocks is not None
        if self.paged:
            if max_len % block_size:
                raise ValueError(f"max_len {max_len} is not a multiple of the block size {block_size}")
            shape = (num_blocks + 1, block_size, c["n_kv"], c["head_dim"])
            self.block_size, self.num_blocks, self.max_blocks = block_size, num_blocks, max_len // block_size
            self.block_table = torch.full((num_slots, self.max_blocks + 1), num_blocks, dtype=torch.long, device=dev)
        else:
            shape = (num_slots, c["n_kv"], max_len + 1, c["head_dim"])
        for blk in self.layers:
            blk.k_cache = torch.zeros(shape, dtype=dt, device=dev)
            blk.v_cache = torch.zeros(shape, dtype=dt, device=dev)
        self.num_slots, self.max_len = num_slots, max_len

    def _paged_index(self, table_rows: torch.Tensor, write_pos: torch.Tensor, kv_len: int | None):
        """Where a paged step writes (block id, offset for each position in `write_pos`, whose padding entries are
        max_len: the scratch column) and which blocks it reads (the first ceil(kv_len / block_size) of each row;
        None: it reads none). Returns ((w_blk, w_off, read_idx), kv_len rounded up to whole blocks)."""
        bs = self.block_size
        col = torch.div(write_pos, bs, rounding_mode="floor")
        if col.dim() == 1:
            w_blk = table_rows.gather(1, col[:, None])[:, 0]
        else:
            w_blk = table_rows.gather(1, col)
        if kv_len is None:
            return (w_blk, write_pos % bs, None), None
        nb = min(-(-kv_len // bs), self.max_blocks)
        return (w_blk, write_pos % bs, table_rows[:, :nb]), nb * bs

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every layer, the final norm and the head; the input embedding
        (and GPT-2's position table) only when shared with the head, since a step reads just B rows of them."""
        n = 0
        for blk in self.layers:
            for name in ("wqkv", "bqkv", "wo", "bo", "w1", "b1", "w2", "b2", "n1w", "n1b", "n2w", "n2b"):
                w = getattr(blk, name)
                n += blk.quant[name].nbytes() if name in blk.quant else 0 if w is None else w.numel() * w.element_size()
        for w in (self.norm_w, self.norm_b):
            n += 0 if w is None else w.numel() * w.element_size()
        return n + (self.head_quant.nbytes() if self.head_quant is not None
                    else self.head.numel() * self.head.element_size())

    def quantize_weights(self, scheme: str, group_size: int = 128, head: bool = True) -> None:
        """Weight-only quantization (lmopt.engines.weight_quant) of every layer's linear weights and, with `head`,
        of the output head (the input embedding stays: a step reads only B rows of it)."""
        from .weight_quant import quantize_weight

        for blk in self.layers:
            for name in ("wqkv", "wo", "w1", "w2"):
                blk.quant[name] = quantize_weight(getattr(blk, name), scheme, group_size)
                setattr(blk, name, None)            # the unquantized copy is freed
        if head:
            self.head_quant = quantize_weight(self.head, scheme, group_size)
            if self.head is not self.emb:
                self.head = None
        self.weight_quant = scheme

    def kv_bytes_per_token(self) -> int:
        c = self.cfg
        return 2 * c["n_layers"] * c["n_kv"] * c["head_dim"] * self.emb.element_size()

    # ---------------------------------------------------------------------------------------------------------
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.arch == "gpt2":
            h = F.layer_norm(h, (h.shape[-1],), self.norm_w, self.norm_b, self.cfg["eps"])
        else:
            h = _rms_norm(h, self.norm_w, self.cfg["eps"])
        return F.linear(h, self.head) if self.head_quant is None else self.head_quant(h)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int):
        """One token per row; row b is slot b; pos[b] = max_len sends a padding row to the scratch column.
        Returns (logits [B, V] in the model dtype, greedy ids [B])."""
        B = ids.shape[0]
        rows = torch.arange(B, device=ids.device)
        pos_c = pos.clamp(max=self.max_len - 1)           # padding rows: any valid table row
        x, cos, sin = self._embed(ids, pos_c)
        paged = None
        if self.paged:   # row b reads slot b's blocks through the block table (an input, like ids and pos)
            paged, kv_len = self._paged_index(self.block_table[:B], pos, kv_len)
            paged = (*paged, self.paged_attention == "triton")
        mask = torch.arange(kv_len, device=ids.device)[None, :] <= pos[:, None]   # [B, L]
        if self.decode_attention == "sdpa":
            mask = torch.zeros(mask.shape, dtype=self.emb.dtype, device=ids.device).masked_fill(~mask, float("-inf"))
        for blk in self.layers:
            x = blk.decode(x, cos, sin, rows, pos, mask, kv_len, paged)
        logits = self._head(x)
        return logits, logits.argmax(dim=-1)

    def decode_fused(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int, feed=None):
        """`decode` from the fused kernels (lmopt.engines.kernels). `feed` = (use_prev, last): a row whose use_prev
        flag is set takes last[b] as its token instead of ids[b], and the step writes its greedy ids into `last`,
        so a token goes from one step into the next without leaving the device or a copy outside the step."""
        from . import kernels as K

        B = ids.shape[0]
        x = K.embed(ids, self.emb, pos, self.pos_emb, self.max_len, feed)
        for blk in self.layers:
            x = blk.decode_fused(x, pos, kv_len, self.cos, self.sin, self.max_len)
        greedy = torch.empty(B, dtype=torch.long, device=ids.device)
        head = self.head_quant if self.head_quant is not None else self.head
        norm = K.Norm("layer" if self.arch == "gpt2" else "rms", self.norm_w, self.norm_b, self.cfg["eps"])
        logits = K.linear(x, head, norm=norm, argmax_out=greedy, last=None if feed is None else feed[1])
        return logits, greedy

    def fused_ready(self) -> str | None:
        """None when every weight suits the fused kernels, else why not (a weight-only scheme other than int4g)."""
        from .kernels import Int4Gemv

        for q in [*(q for blk in self.layers for q in blk.quant.values()), self.head_quant]:
            if q is not None and not isinstance(q, Int4Gemv):
                return f"weight quantization '{self.weight_quant}'"
        return None

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor):
        """Token embeddings plus learned positions (GPT-2), or with the rotary tables at `pos` (Llama family)."""
        x = F.embedding(ids, self.emb)
        if self.arch == "gpt2":
            return x + F.embedding(pos, self.pos_emb), None, None
        return x, self.cos[pos], self.sin[pos]

    def prefill_fresh(self, slots: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor):
        """Prefill rows that start at position 0, with every input a device tensor and no host work, so the step can
        be captured in a CUDA graph: row r writes ids[r, :lengths[r]] into slot slots[r]. A row of length 0 (padding
        of a captured batch bucket) writes only scratch columns and its output is dropped.
        Returns (logits [R, V] of each row's last real token, greedy ids [R])."""
        R, S = ids.shape
        dev = ids.device
        ar = torch.arange(S, device=dev)[None, :]
        pos = ar.expand(R, S)
        write_pos = torch.where(ar < lengths[:, None], pos, torch.full_like(pos, self.max_len))
        x, cos, sin = self._embed(ids, pos.clamp(max=self.max_len - 1))
        slot_rows = slots[:, None].expand(R, S)
        attn: dict = {"fresh": True}
        if self.paged:
            attn["paged"] = self._paged_index(self.block_table[slots], write_pos, None)[0]
        for blk in self.layers:
            x = blk.prefill(x, cos, sin, slot_rows, write_pos, attn)
        h = x[torch.arange(R, device=dev), (lengths - 1).clamp(min=0)]
        logits = self._head(h)
        return logits, logits.argmax(dim=-1)

    def prefill(self, slots: list[int], ids: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Append chunk r (ids[r, :lengths[r]], right-padded) to slot slots[r] at positions starts[r]...
        Returns the logits [R, V] of each row's last real token."""
        R, S = ids.shape
        dev = ids.device
        start_t = torch.tensor(starts, device=dev)[:, None]
        ar = torch.arange(S, device=dev)[None, :]
        pos = start_t + ar                                                  # [R, S]
        real = ar < torch.tensor(lengths, device=dev)[:, None]
        write_pos = torch.where(real, pos, torch.full_like(pos, self.max_len))   # padding -> scratch column
        pos_c = pos.clamp(max=self.max_len - 1)
        slot_rows = torch.tensor(slots, device=dev)[:, None].expand(R, S)
        x, cos, sin = self._embed(ids, pos_c)
        attn: dict = {"fresh": all(s == 0 for s in starts)}
        if self.paged:
            kv_len = None if attn["fresh"] else max(s + n for s, n in zip(starts, lengths))
            attn["paged"], kv_len = self._paged_index(self.block_table[torch.tensor(slots, device=dev)], write_pos,
                                                      kv_len)
            if kv_len is not None:
                attn["mask"] = (torch.arange(kv_len, device=dev)[None, None, :] <= pos[:, :, None])[:, None]
        elif not attn["fresh"]:
            kv_len = max(s + n for s, n in zip(starts, lengths))
            contiguous = slots == list(range(slots[0], slots[0] + R))
            attn["cache_index"] = slice(slots[0], slots[0] + R) if contiguous else torch.tensor(slots, device=dev)
            attn["kv_len"] = kv_len
            # key j is visible to query i of row r when j <= starts[r] + i (its past and the chunk up to itself)
            attn["mask"] = (torch.arange(kv_len, device=dev)[None, None, :] <= pos[:, :, None])[:, None]  # [R,1,S,L]
        for blk in self.layers:
            x = blk.prefill(x, cos, sin, slot_rows, write_pos, attn)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        h = x[torch.arange(R, device=dev), last]                              # [R, C]
        return self._head(h)
