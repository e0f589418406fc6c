"""Fused decode kernels of the compiled engine's `decode_kernels="fused"` step, for decode batches of 1 to 8 rows.

    y = linear(x, w, norm=Norm("rms", nw, None, eps), residual=r, act="silu_pair")   # one launch on CUDA
    a = decode_attention(qkv, k_cache, v_cache, pos, cos, sin, kv_len, n_heads, n_kv, head_dim)

Each function has two implementations with the same arguments: Triton kernels on CUDA, and a torch reference
(plain ops in the order of lmopt.engines.static_decoder's unfused step) used on the CPU, where Triton does not run,
and by profile/decode_kernels_gpu.py to check each Triton kernel on the GPU. What is fused (docs/compiled_engine.md):

    linear            a skinny GEMM (GEMV for M <= 16 rows: the weight tile is the matrix unit's M side, the rows of
                      x its N side, so one pass over the weight serves every row) with, in the same launch,
                      the RMSNorm/LayerNorm of its input (prologue: every program normalizes the rows it reads; the
                      row statistics cost a re-read of x from L2), bias, SwiGLU (gate and up rows of one fused
                      weight in one program) or GELU, the residual add (epilogue), and for the LM head each
                      program's block argmax (a second tiny launch picks the row's argmax and writes it where the
                      next step reads its input). Weights FP16/BF16 or INT4 (`Int4Gemv`: groups along K, unpacked
                      and scaled in registers right before the matrix instruction: dequantize-in-GEMV).
                      `impl="cublas"` runs the GEMM through cuBLAS (F.linear) and the fused prologue/epilogue as
                      separate Triton launches; `linear_impl` picks per shape whichever was faster on this GPU.
    decode_attention  rotary embedding of q and k, the write of k and v into the KV slot, and attention of the
                      G query heads of each KV head over the slot's first kv_len positions (split over positions
                      for long contexts, flash-decoding style, plus one combine launch)
    embed             token (and GPT-2 position) embedding, taking the row's token from the previous step's argmax
                      when the row is flagged so (the sampled id never leaves the device between steps)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none, and the reference path runs instead
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False
try:  # programmatic dependent launch (Hopper+): each kernel waits for the previous one inside itself, so its launch
    # and prologue overlap the previous kernel's tail (Triton's tutorial 11)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_wait = gdc_launch_dependents = None

log = logging.getLogger("lmopt.kernels")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"    # Triton's CPU interpreter (kernel tests off the GPU)
MAX_GEMV_ROWS = 16          # rows one GEMV program serves (the matrix instruction's N side)


def triton_ok(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or INTERPRET)


@dataclass
class Norm:
    """The normalization a linear layer applies to its input first: kind "rms" (Llama) or "layer" (GPT-2)."""
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


# ---------------------------------------------------------------------------------------------------------------
# INT4 weights for the fused GEMV
class Int4Gemv:
    """Asymmetric INT4 in groups of `group_size` along the input dimension (the numbers of weight_quant.Int4Weight:
    w ~ (q - 8) * scale + zero, q in 0..15), packed two codes a byte along K (low nibble = even k), scales and zeros
    [N, K / group] in the activation dtype. Called like weight_quant's classes: `q(x, bias)`."""

    def __init__(self, w: torch.Tensor, group_size: int = 128):
        from ..errors import UserError

        n, k = w.shape
        if k % group_size or k % 2 or group_size % 16:
            raise UserError(f"INT4 groups of {group_size} do not divide the input dimension {k} (a multiple of 16 "
                            "that divides it) — pass another group size")
        self.group_size, self.shape = group_size, (n, k)
        g = w.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-6) / 15
        zero = lo + scale * 8
        q = torch.round((g - (zero - scale * 8)) / scale).clamp(0, 15).to(torch.uint8).reshape(n, k)
        self.packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()             # [N, K/2] uint8
        self.scale = scale.squeeze(-1).to(w.dtype).contiguous()                   # [N, K/group]
        self.zero = zero.squeeze(-1).to(w.dtype).contiguous()

    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n, k = self.shape
        q = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(n, k // self.group_size, -1)
        w = (q.float() - 8) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.reshape(n, k).to(dtype or self.scale.dtype)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = linear(x.reshape(-1, x.shape[-1]), self, bias)
        return y.reshape(*x.shape[:-1], self.shape[0])


def _weight_shape(w) -> tuple[int, int]:
    return tuple(w.shape) if isinstance(w, Int4Gemv) else (w.shape[0], w.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# torch reference (the CPU path; the GPU script's check for each Triton kernel)
def _norm_ref(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm.kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    xf = x.float()       # the order of HF's LlamaRMSNorm: normalize in fp32, cast back, then scale
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


def linear_ref(x, w, bias=None, norm: Norm | None = None, act: str | None = None, residual=None):
    h = x if norm is None else _norm_ref(x, norm)
    wt = w.dequantize(x.dtype) if isinstance(w, Int4Gemv) else w
    y = F.linear(h, wt, bias)
    if act == "silu_pair":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    elif act == "gelu":
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else residual + y


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def decode_attention_ref(qkv, k_cache, v_cache, pos, cos, sin, kv_len: int, n_heads: int, n_kv: int,
                         head_dim: int, max_len: int):
    """Rotary, cache write, attention over the first kv_len positions (key j visible when j <= pos): the unfused
    step's math (three kernels on a GPU: scores, masked softmax in fp32, weighted sum)."""
    B, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q, k, v = q.view(B, n_heads, d), k.view(B, n_kv, d), v.view(B, n_kv, d)
    if cos is not None:
        pc = pos.clamp(max=max_len - 1)
        c, s = cos[pc][:, None], sin[pc][:, None]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    kc, vc = k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]
    g = n_heads // n_kv
    qg = q.reshape(B, n_kv, g, d)
    mask = torch.arange(kv_len, device=qkv.device)[None, :] <= pos[:, None]
    sc = torch.matmul(qg, kc.transpose(-1, -2)).float() * (d ** -0.5)
    sc = sc.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1).to(q.dtype)
    return torch.matmul(p, vc).reshape(B, n_heads * d)


def embed_ref(ids, emb, pos=None, pos_emb=None, max_len: int = 0, feed=None):
    if feed is not None:
        use_prev, last = feed
        ids = torch.where(use_prev[:ids.shape[0]] != 0, last[:ids.shape[0]], ids)
    x = F.embedding(ids, emb)
    if pos_emb is not None:
        x = x + F.embedding(pos.clamp(max=max_len - 1), pos_emb)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
if HAS_TRITON:
    @triton.jit
    def _tanh(u):
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)

    # Helpers of the GEMV kernels below: @triton.jit functions called from a kernel are inlined into it, and the
    # constexpr arguments (NORM, ACT, GS, block sizes, dtypes) stay compile-time constants, so each kernel compiles
    # to what it would with the code written out in place.
    @triton.jit
    def _row_stats(X, offs_m, m_ok, stride_xm, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """(mean, 1/std) of each of the BLOCK_M rows of X over the whole row (the rows are a few KB: read from
        L2); RMSNorm (NORM 1) has mean 0, LayerNorm (NORM 2) the row's mean."""
        s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :],
                         mask=m_ok[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
            s1 += tl.sum(xv, axis=1)
            s2 += tl.sum(xv * xv, axis=1)
        if NORM == 1:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
        else:
            mean = s1 / K
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
        return mean, rstd

    @triton.jit
    def _norm_row(xa, m, offs_m, mean, rstd, NW, NB, kk, k_ok, dt: tl.constexpr, NORM: tl.constexpr):
        """Values `xa` (positions kk) of row m normalized with that row's statistics, picked out of the [BLOCK_M]
        vectors of _row_stats; rounded where HF's RMSNorm/LayerNorm round (module's torch reference)."""
        r = tl.sum(tl.where(offs_m == m, rstd, 0.0), axis=0)
        if NORM == 1:
            xa = (xa.to(tl.float32) * r).to(dt) * tl.load(NW + kk, mask=k_ok, other=0.0)
        else:
            mu = tl.sum(tl.where(offs_m == m, mean, 0.0), axis=0)
            xa = ((xa.to(tl.float32) - mu) * r * tl.load(NW + kk, mask=k_ok, other=0.0).to(
                tl.float32) + tl.load(NB + kk, mask=k_ok, other=0.0).to(tl.float32)).to(dt)
        return xa

    @triton.jit
    def _act(y, u, dt: tl.constexpr, ACT: tl.constexpr):
        """The activation of the epilogue on fp32 values: ACT 1 SwiGLU (y the gate, u the up half, each already
        rounded to the activation dtype; silu rounded before the product, as torch does), 2 GELU tanh, 0 none."""
        if ACT == 1:
            y = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * u
        elif ACT == 2:
            y = 0.5 * y * (1.0 + _tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
        return y

    @triton.jit
    def _int4_tile(W, WS, WZ, rows, kh, kg, wmask, smask, K, dt: tl.constexpr, GS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weight rows `rows` x one BLOCK_K tile of an Int4Gemv, dequantized to dt ([BLOCK_N, BLOCK_K]): packed
        pairs kh, group scales and zeros kg."""
        p = tl.load(W + rows[:, None] * (K // 2) + kh[None, :], mask=wmask, other=0)
        sc = tl.load(WS + rows[:, None] * (K // GS) + kg[None, :], mask=smask, other=0.0).to(tl.float32)
        zr = tl.load(WZ + rows[:, None] * (K // GS) + kg[None, :], mask=smask, other=0.0).to(tl.float32)
        q = tl.join(p & 15, p >> 4).reshape(BLOCK_N, BLOCK_K // GS, GS).to(tl.float32)
        return ((q - 8.0) * sc[:, :, None] + zr[:, :, None]).reshape(BLOCK_N, BLOCK_K).to(dt)

    @triton.jit
    def _int4_group(W, WS, WZ, rows, kh, kg, n_ok, g_ok, K, GS: tl.constexpr):
        """Weight rows `rows` x one quantization group of an Int4Gemv: the even and odd codes minus 8 (fp32) and
        the group's scale and zero per row."""
        p = tl.load(W + rows[:, None] * (K // 2) + kh[None, :], mask=n_ok[:, None] & g_ok, other=0)
        qa = (p & 15).to(tl.float32) - 8.0
        qb = (p >> 4).to(tl.float32) - 8.0
        sc = tl.load(WS + rows * (K // GS) + kg // GS, mask=n_ok & g_ok, other=0.0).to(tl.float32)
        zr = tl.load(WZ + rows * (K // GS) + kg // GS, mask=n_ok & g_ok, other=0.0).to(tl.float32)
        return qa, qb, sc, zr

    @triton.jit
    def _gemv_kernel(X, W, WS, WZ, BIAS, RES, NW, NB, Y, PMAX, PIDX,
                     M, N, K, stride_xm, stride_rm, stride_ym, eps, NBLK,
                     NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     INT4: tl.constexpr, GS: tl.constexpr, ARGMAX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        """Y[m, n] = epilogue(sum_k W[n, k] * prologue(X)[m, k]) for a block of BLOCK_N outputs and BLOCK_M rows.
        NORM 0 none, 1 RMSNorm, 2 LayerNorm; ACT 0 none, 1 SwiGLU (W rows [gate; up], N = gate rows), 2 GELU tanh.
        The weight tile [BLOCK_N, BLOCK_K] is the dot's left operand (swap-AB: the matrix unit needs 16 rows and
        a decode step has 1 to 8)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        offs_kb = tl.arange(0, BLOCK_K)
        dt = Y.dtype.element_ty
        if NORM != 0:
            mean, rstd = _row_stats(X, offs_m, m_ok, stride_xm, K, eps, NORM, BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)      # the up rows (SwiGLU); dead code otherwise
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_kb
            k_ok = kk < K
            xt = tl.load(X + offs_m[None, :] * stride_xm + kk[:, None], mask=m_ok[None, :] & k_ok[:, None],
                         other=0.0)                                              # [BLOCK_K, BLOCK_M]
            if NORM == 1:
                xn = (xt.to(tl.float32) * rstd[None, :]).to(dt)
                xt = xn * tl.load(NW + kk, mask=k_ok, other=0.0)[:, None]
            elif NORM == 2:
                xn = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :]
                xn = xn * tl.load(NW + kk, mask=k_ok, other=0.0).to(tl.float32)[:, None] \
                    + tl.load(NB + kk, mask=k_ok, other=0.0).to(tl.float32)[:, None]
                xt = xn.to(dt)
            xt = xt.to(dt)
            if INT4:
                kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                kg = k0 // GS + tl.arange(0, BLOCK_K // GS)
                wmask = n_ok[:, None] & (kh[None, :] < K // 2)
                smask = n_ok[:, None] & (kg[None, :] < K // GS)
                w = _int4_tile(W, WS, WZ, offs_n, kh, kg, wmask, smask, K, dt, GS, BLOCK_N, BLOCK_K)
                acc = tl.dot(w, xt, acc)
                if ACT == 1:
                    w = _int4_tile(W, WS, WZ, offs_n + N, kh, kg, wmask, smask, K, dt, GS, BLOCK_N, BLOCK_K)
                    acc2 = tl.dot(w, xt, acc2)
            else:
                wmask = n_ok[:, None] & k_ok[None, :]
                w = tl.load(W + offs_n[:, None] * K + kk[None, :], mask=wmask, other=0.0)
                acc = tl.dot(w, xt, acc)
                if ACT == 1:
                    w = tl.load(W + (offs_n + N)[:, None] * K + kk[None, :], mask=wmask, other=0.0)
                    acc2 = tl.dot(w, xt, acc2)
        # epilogue, rounding where the unfused step rounds (the GEMM's output is in the activation dtype)
        y = acc
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = y.to(dt).to(tl.float32)
        y = _act(y, acc2.to(dt).to(tl.float32), dt, ACT)
        if HAS_RES:
            y = y.to(dt).to(tl.float32) + tl.load(RES + offs_m[None, :] * stride_rm + offs_n[:, None],
                                                  mask=m_ok[None, :] & n_ok[:, None], other=0.0).to(tl.float32)
        yo = y.to(dt)
        tl.store(Y + offs_m[None, :] * stride_ym + offs_n[:, None], yo, mask=m_ok[None, :] & n_ok[:, None])
        if ARGMAX:  # this block's max and its first index, per row
            yv = tl.where(n_ok[:, None], yo.to(tl.float32), float("-inf"))
            bmax = tl.max(yv, axis=0)
            bidx = tl.argmax(yv, axis=0) + pid_n * BLOCK_N
            tl.store(PMAX + offs_m * NBLK + pid_n, bmax, mask=m_ok)
            tl.store(PIDX + offs_m * NBLK + pid_n, bidx, mask=m_ok)

    @triton.jit
    def _gemv_rows_kernel(X, W, WS, WZ, BIAS, RES, NW, NB, Y, PMAX, PIDX,
                          M, N, K, stride_xm, stride_rm, stride_ym, eps, NBLK,
                          NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                          INT4: tl.constexpr, GS: tl.constexpr, ARGMAX: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KW: tl.constexpr,
                          USE_PDL: tl.constexpr):
        """The GEMV for 1..8 rows without the matrix unit: a program reads BLOCK_N weight rows in tiles as wide
        as the row (up to BLOCK_K, so every load of the tile is in flight at once) and reduces each x row against
        them in fp32. Same prologue/epilogue as _gemv_kernel. The first weight tile is requested before the wait
        on the previous kernel (programmatic dependent launch): weights are never written by the step."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dt = Y.dtype.element_ty
        kb = tl.arange(0, KW)
        # first tile of the weights (and of the up rows), before waiting for the previous kernel
        if not INT4:
            p0 = tl.load(W + offs_n[:, None] * K + kb[None, :], mask=n_ok[:, None] & (kb[None, :] < K), other=0.0)
            if ACT == 1:
                p0u = tl.load(W + (offs_n + N)[:, None] * K + kb[None, :], mask=n_ok[:, None] & (kb[None, :] < K),
                              other=0.0)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        if NORM != 0:
            mean, rstd = _row_stats(X, offs_m, m_ok, stride_xm, K, eps, NORM, BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if INT4:
                # group by group (unrolled: every group's loads can be in flight together), one scale and zero
                # per row and group: sum_k ((q-8) s + z) x = s sum_k (q-8) x + z sum_k x
                for gi in tl.static_range(BLOCK_K // GS):
                    kg = k0 + gi * GS
                    g_ok = kg < K
                    kh = kg // 2 + tl.arange(0, GS // 2)
                    qa, qb, sc, zr = _int4_group(W, WS, WZ, offs_n, kh, kg, n_ok, g_ok, K, GS)
                    if ACT == 1:
                        ua, ub, su, zu = _int4_group(W, WS, WZ, offs_n + N, kh, kg, n_ok, g_ok, K, GS)
                    kx = kg + tl.arange(0, GS)
                    for m in tl.static_range(BLOCK_M):
                        if m < M:
                            xk = tl.load(X + m * stride_xm + kx, mask=g_ok, other=0.0)
                            if NORM != 0:
                                xk = _norm_row(xk, m, offs_m, mean, rstd, NW, NB, kx, g_ok, dt, NORM)
                            xe, xo = tl.split(tl.reshape(xk.to(tl.float32), (GS // 2, 2)))
                            sx = tl.sum(xe, axis=0) + tl.sum(xo, axis=0)
                            part = sc * tl.sum(qa * xe[None, :] + qb * xo[None, :], axis=1) + zr * sx
                            sel = (offs_m == m)[:, None]
                            acc = tl.where(sel, acc + part[None, :], acc)
                            if ACT == 1:
                                part2 = su * tl.sum(ua * xe[None, :] + ub * xo[None, :], axis=1) + zu * sx
                                acc2 = tl.where(sel, acc2 + part2[None, :], acc2)
            else:
                kk = k0 + kb
                if k0 == 0:
                    wa = p0.to(tl.float32)
                else:
                    wa = tl.load(W + offs_n[:, None] * K + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < K),
                                 other=0.0).to(tl.float32)
                if ACT == 1:
                    if k0 == 0:
                        ua = p0u.to(tl.float32)
                    else:
                        ua = tl.load(W + (offs_n + N)[:, None] * K + kk[None, :],
                                     mask=n_ok[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    if m < M:
                        xa = tl.load(X + m * stride_xm + kk, mask=kk < K, other=0.0)
                        if NORM != 0:
                            xa = _norm_row(xa, m, offs_m, mean, rstd, NW, NB, kk, kk < K, dt, NORM)
                        xa = xa.to(tl.float32)
                        sel = (offs_m == m)[:, None]
                        acc = tl.where(sel, acc + tl.sum(wa * xa[None, :], axis=1)[None, :], acc)
                        if ACT == 1:
                            acc2 = tl.where(sel, acc2 + tl.sum(ua * xa[None, :], axis=1)[None, :], acc2)
        y = acc
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y.to(dt).to(tl.float32)
        y = _act(y, acc2.to(dt).to(tl.float32), dt, ACT)
        om = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            y = y.to(dt).to(tl.float32) + tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :], mask=om,
                                                  other=0.0).to(tl.float32)
        yo = y.to(dt)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], yo, mask=om)
        if ARGMAX:
            yv = tl.where(n_ok[None, :], yo.to(tl.float32), float("-inf"))
            bmax = tl.max(yv, axis=1)
            bidx = tl.argmax(yv, axis=1) + pid * BLOCK_N
            tl.store(PMAX + offs_m * NBLK + pid, bmax, mask=m_ok)
            tl.store(PIDX + offs_m * NBLK + pid, bidx, mask=m_ok)

    @triton.jit
    def _argmax_finish_kernel(PMAX, PIDX, OUT, LAST, NBLK, HAS_LAST: tl.constexpr, BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr):
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        m = tl.program_id(0)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        bidx = tl.full([BLOCK], 2147483647, tl.int64)
        for b0 in range(0, NBLK, BLOCK):
            o = b0 + tl.arange(0, BLOCK)
            v = tl.load(PMAX + m * NBLK + o, mask=o < NBLK, other=float("-inf"))
            i = tl.load(PIDX + m * NBLK + o, mask=o < NBLK, other=2147483647)
            better = (v > best) | ((v == best) & (i < bidx))
            best = tl.where(better, v, best)
            bidx = tl.where(better, i, bidx)
        mx = tl.max(best, axis=0)
        idx = tl.min(tl.where(best == mx, bidx, 2147483647), axis=0)
        tl.store(OUT + m, idx)
        if HAS_LAST:
            tl.store(LAST + m, idx)

    @triton.jit
    def _norm_kernel(X, NW, NB, Y, K, stride_xm, stride_ym, eps, NORM: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_PDL: tl.constexpr):
        """The prologue of _gemv_kernel on its own (for the cuBLAS path): one program per row."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        m = tl.program_id(0)
        kk = tl.arange(0, BLOCK_K)
        ok = kk < K
        x = tl.load(X + m * stride_xm + kk, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        dt = Y.dtype.element_ty
        if NORM == 1:
            r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
            y = (xf * r).to(dt) * tl.load(NW + kk, mask=ok, other=0.0)
        else:
            mean = tl.sum(xf, axis=0) / K
            d = tl.where(ok, xf - mean, 0.0)
            r = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / K + eps)
            y = d * r * tl.load(NW + kk, mask=ok, other=0.0).to(tl.float32) \
                + tl.load(NB + kk, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + kk, y.to(dt), mask=ok)

    @triton.jit
    def _epilogue_kernel(A, RES, Y, N, stride_am, stride_rm, stride_ym, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """The epilogue of _gemv_kernel on its own (for the cuBLAS path): SwiGLU / GELU, residual add."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        m = tl.program_id(0)
        o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = o < N
        dt = Y.dtype.element_ty
        y = tl.load(A + m * stride_am + o, mask=ok, other=0.0).to(tl.float32)
        u = y
        if ACT == 1:
            u = tl.load(A + m * stride_am + N + o, mask=ok, other=0.0).to(tl.float32)
        y = _act(y, u, dt, ACT)
        if HAS_RES:
            y = y.to(dt).to(tl.float32) + tl.load(RES + m * stride_rm + o, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + o, y.to(dt), mask=ok)

    @triton.jit
    def _attn_kernel(QKV, COS, SIN, KC, VC, POS, O, PM, PL, PACC,
                     stride_qb, stride_cs, stride_ch, stride_cl, stride_ob, max_len, L, scale,
                     H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr,
                     CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_L: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (row b, KV head h, split s): rotary on the G query heads of h and on the new key, the new key
        and value written at the row's position (split 0), attention over cache positions [s*CHUNK, (s+1)*CHUNK)
        before the row's position plus the new key itself (split 0). One split writes the output; several write
        (max, sum, weighted values) for _attn_combine_kernel."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        pos = tl.load(POS + b)
        pc = tl.minimum(pos, max_len - 1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < G
        d_ok = d < D
        qoff = (h * G + g)[:, None] * D + d[None, :]
        qm = g_ok[:, None] & d_ok[None, :]
        q = tl.load(QKV + b * stride_qb + qoff, mask=qm, other=0.0).to(tl.float32)
        koff = (H + h) * D + d
        k = tl.load(QKV + b * stride_qb + koff, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(QKV + b * stride_qb + (H + KVH + h) * D + d, mask=d_ok, other=0.0)
        if ROPE:  # rotate-half layout: out[d] = x[d] cos[d] + sign(d) x[d +- D/2] sin[d]
            half = D // 2
            dp = tl.where(d < half, d + half, d - half)
            sign = tl.where(d < half, -1.0, 1.0)
            c = tl.load(COS + pc * D + d, mask=d_ok, other=0.0).to(tl.float32)
            sn = tl.load(SIN + pc * D + d, mask=d_ok, other=0.0).to(tl.float32)
            qp = tl.load(QKV + b * stride_qb + (h * G + g)[:, None] * D + dp[None, :], mask=qm,
                         other=0.0).to(tl.float32)
            kp = tl.load(QKV + b * stride_qb + (H + h) * D + dp, mask=d_ok, other=0.0).to(tl.float32)
            q = q * c[None, :] + sign[None, :] * qp * sn[None, :]
            k = k * c + sign * kp * sn
        dt = KC.dtype.element_ty
        q16 = q.to(dt)
        k16 = k.to(dt)
        cache = b * stride_cs + h * stride_ch
        if s == 0:
            tl.store(KC + cache + pos * stride_cl + d, k16, mask=d_ok)
            tl.store(VC + cache + pos * stride_cl + d, v, mask=d_ok)
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if s == 0:  # the new key first: every row sees itself
            sc = tl.sum(q16.to(tl.float32) * k16.to(tl.float32)[None, :], axis=1) * scale
            m_i = sc
            l_i = tl.full([BLOCK_G], 1.0, tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + v.to(tl.float32)[None, :]
        end = tl.minimum(tl.minimum((s + 1) * CHUNK, L), pos)
        for j0 in range(s * CHUNK, (s + 1) * CHUNK, BLOCK_L):
            j = j0 + tl.arange(0, BLOCK_L)
            j_ok = j < end
            kv_off = cache + j[:, None] * stride_cl + d[None, :]
            kt = tl.load(KC + kv_off, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            sc = tl.dot(q16, tl.trans(kt)) * scale                       # [BLOCK_G, BLOCK_L]
            sc = tl.where(j_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(VC + kv_off, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), vt)
            m_i = m_new
        if SPLITS == 1:
            tl.store(O + b * stride_ob + qoff, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=qm)
        else:
            base = (b * KVH + h) * SPLITS + s
            tl.store(PM + base * BLOCK_G + g, m_i)
            tl.store(PL + base * BLOCK_G + g, l_i)
            tl.store(PACC + (base * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], acc)

    @triton.jit
    def _attn_combine_kernel(PM, PL, PACC, O, stride_ob, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                             SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        s_ok = sp < SPLITS
        base = (b * KVH + h) * SPLITS + sp
        m = tl.load(PM + base[:, None] * BLOCK_G + g[None, :], mask=s_ok[:, None], other=-1e30)   # [S, G]
        lsum = tl.load(PL + base[:, None] * BLOCK_G + g[None, :], mask=s_ok[:, None], other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.exp(m - mx[None, :])
        den = tl.sum(w * lsum, axis=0)                                                         # [G]
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for i in range(SPLITS):
            a = tl.load(PACC + (((b * KVH + h) * SPLITS + i) * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :])
            wi = tl.exp(tl.load(PM + ((b * KVH + h) * SPLITS + i) * BLOCK_G + g) - mx)
            acc += a * wi[:, None]
        qm = (g < G)[:, None] & (d < D)[None, :]
        tl.store(O + b * stride_ob + (h * G + g)[:, None] * D + d[None, :],
                 (acc / den[:, None]).to(O.dtype.element_ty), mask=qm)

    @triton.jit
    def _embed_kernel(IDS, USE_PREV, LAST, EMB, POS, PEMB, X, C, max_len, HAS_FEED: tl.constexpr,
                      HAS_PEMB: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        tok = tl.load(IDS + b)
        if HAS_FEED:
            tok = tl.where(tl.load(USE_PREV + b) != 0, tl.load(LAST + b), tok)
        c = tl.arange(0, BLOCK_C)
        ok = c < C
        x = tl.load(EMB + tok * C + c, mask=ok, other=0.0)
        if HAS_PEMB:
            p = tl.minimum(tl.load(POS + b), max_len - 1)
            x = x + tl.load(PEMB + p * C + c, mask=ok, other=0.0)
        tl.store(X + b * C + c, x, mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# launch configurations: (BLOCK_N, BLOCK_K, num_warps, num_stages) per weight shape; `tune_gemv` times the
# candidates on the GPU once per shape, before graph capture
PDL = {"on": "auto"}      # programmatic dependent launch: "auto" (on for compute capability 9+), True, False


def _pdl_kw() -> dict:
    on = PDL["on"]
    if on == "auto":
        on = PDL["on"] = bool(gdc_wait is not None and torch.cuda.is_available()
                              and torch.cuda.get_device_capability()[0] >= 9)
    if INTERPRET or not on or gdc_wait is None:
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


IMPL: dict[tuple, str] = {}          # linear_impl's choices: (rows, K, M, int4, act, norm, residual) -> impl
TUNE = {"impl": True}     # measure Triton against cuBLAS per layer (linear_impl); off: Triton wherever it runs


def _dot_cfg(n: int, k: int, int4: bool, gs: int) -> tuple:
    """(BLOCK_N, BLOCK_K, warps, stages) of _gemv_kernel (9 to 16 rows, and INT4 prefill chunks)."""
    bk = max(gs, 256) if int4 else 256
    if INTERPRET:
        bk = max(gs if int4 else 32, 32)
    return (16 if n <= 8192 else 32, bk, 4, 4)


def _rows_cfg(n: int, k: int, int4: bool, gs: int = 1) -> tuple:
    """(BLOCK_N, BLOCK_K, warps) of _gemv_rows_kernel: a weight tile as wide as the row (up to 2048 values), 4
    FP16 rows (16 KB of loads in flight per program; 512 programs for a 2048-row weight) or 8 rows for INT4 and
    the LM head; 8 warps keep the fp32 copies of the tile within the registers."""
    bk = min(triton.next_power_of_2(k), 2048)
    if INTERPRET:
        bk = min(bk, 64)
    if int4:
        bk = max(bk, gs)
    return (8 if int4 or n > 32768 else 4, bk, 8)


ROWS_MAX = 8          # up to this many rows: _gemv_rows_kernel; above: _gemv_kernel (matrix unit)


def _launch_gemv(x, w, bias, norm, act, residual, out, argmax_bufs, cfg=None):
    M, K = x.shape
    int4 = isinstance(w, Int4Gemv)
    N = out.shape[1]
    wt, ws, wz = (w.packed, w.scale, w.zero) if int4 else (w, w, w)
    nrm = {None: 0, "rms": 1, "layer": 2}[None if norm is None else norm.kind]
    pmax, pidx, nblk = argmax_bufs if argmax_bufs is not None else (out, out, 1)
    args = (x, wt, ws, wz, bias if bias is not None else x, residual if residual is not None else x,
            norm.weight if norm is not None else x, norm.bias if norm is not None and norm.bias is not None else x,
            out, pmax, pidx, M, N, K, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            float(norm.eps) if norm is not None else 0.0, nblk)
    flags = dict(NORM=nrm, ACT={None: 0, "silu_pair": 1, "gelu": 2}[act], HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, INT4=int4, GS=w.group_size if int4 else 1,
                 ARGMAX=argmax_bufs is not None, **_pdl_kw())
    if M <= ROWS_MAX:
        bn, bk, warps = cfg or _rows_cfg(N, K, int4, w.group_size if int4 else 1)
        kw = {} if INTERPRET else {"num_warps": warps, "num_stages": 1}
        _gemv_rows_kernel[(triton.cdiv(N, bn),)](*args, **flags, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=bn,
                                                 BLOCK_K=bk, KW=bk // 2 if int4 else bk, **kw)
        return
    bn, bk, warps, stages = cfg or _dot_cfg(N, K, int4, w.group_size if int4 else 1)
    kw = {} if INTERPRET else {"num_warps": warps, "num_stages": stages}
    _gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, MAX_GEMV_ROWS))](
        *args, **flags, BLOCK_M=MAX_GEMV_ROWS, BLOCK_N=bn, BLOCK_K=bk, **kw)


def _block_n(M: int, N: int, K: int, int4: bool, gs: int) -> int:
    return _rows_cfg(N, K, int4, gs)[0] if M <= ROWS_MAX else _dot_cfg(N, K, int4, gs)[0]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _bench(fn, reps: int = 20) -> float:
    """Median GPU ms of one fn() call: `reps` calls captured in one CUDA graph and replayed (no host launch time
    in the figure), timed with CUDA events. fn(i) gets the call's index, to rotate among input copies."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    del g
    return sorted(ts)[len(ts) // 2]


def _copies(w, x, min_bytes: int = 256 << 20) -> list:
    """(weight, x) copies whose weights together exceed the GPU's L2 many times over, so a timed loop over them
    reads device memory, not the cache."""
    n = max(1, min(16, -(-min_bytes // max(1, _nbytes(w)))))
    out = [(w, x)]
    for _ in range(n - 1):
        if isinstance(w, Int4Gemv):
            c = Int4Gemv.__new__(Int4Gemv)
            c.__dict__.update(w.__dict__)
            c.packed, c.scale, c.zero = w.packed.clone(), w.scale.clone(), w.zero.clone()
        else:
            c = w.clone()
        out.append((c, x.clone()))
    return out


def _nbytes(w) -> int:
    return w.nbytes() if isinstance(w, Int4Gemv) else w.numel() * w.element_size()


def linear(x, w, bias=None, norm: Norm | None = None, act: str | None = None, residual=None,
           argmax_out=None, last=None, impl: str = "auto"):
    """One linear layer with its fused neighbours (module docstring). x [M, K]. With `argmax_out` (an int64 [M]
    tensor) also writes each row's argmax there and into `last` (the device feed of the next step) and returns the
    logits. impl: "auto" (Triton on CUDA for M <= 16 rows, cuBLAS+fused elementwise beyond, or whichever
    `linear_impl` measured faster for the shape), "triton", "cublas", "torch" (the reference)."""
    M = x.shape[0]
    N2, K = _weight_shape(w)
    if act == "silu_pair" and bias is not None:
        # the GEMV kernels add the bias of the gate half only (their epilogue sees one column per output): no model
        # this engine loads has a biased gate/up pair, so refuse it rather than compute it wrong on one path
        raise ValueError("linear(act='silu_pair') takes no bias: the fused kernels would add the gate half only")
    N = N2 // 2 if act == "silu_pair" else N2
    if impl == "auto":
        if not triton_ok(x):
            impl = "torch"
        elif M > MAX_GEMV_ROWS:
            impl = "cublas" if not isinstance(w, Int4Gemv) or M > 64 else "triton"
        else:
            impl = linear_impl(x, w, N, bias, norm, act, residual)
    if impl == "torch" or (impl == "cublas" and not triton_ok(x)):
        y = linear_ref(x, w, bias, norm, act, residual)
        if argmax_out is not None:
            argmax_out.copy_(y.argmax(dim=-1))
            if last is not None:
                last[:M].copy_(argmax_out)
        return y
    x = x.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if impl == "cublas":
        h = x
        if norm is not None:
            h = torch.empty_like(x)
            _norm_kernel[(M,)](x, norm.weight, norm.bias if norm.bias is not None else x, h, K, x.stride(0),
                               h.stride(0), float(norm.eps), NORM={"rms": 1, "layer": 2}[norm.kind],
                               BLOCK_K=triton.next_power_of_2(K), **_pdl_kw())
        wt = w.dequantize(x.dtype) if isinstance(w, Int4Gemv) else w
        y = F.linear(h, wt, bias)
        if act is not None or residual is not None:
            blk = 1024
            _epilogue_kernel[(M, triton.cdiv(N, blk))](
                y, residual if residual is not None else y, out, N, y.stride(0),
                residual.stride(0) if residual is not None else 0, out.stride(0),
                ACT={None: 0, "silu_pair": 1, "gelu": 2}[act], HAS_RES=residual is not None, BLOCK=blk,
                **_pdl_kw())
        else:
            out = y
        if argmax_out is not None:
            torch.argmax(out, dim=-1, out=argmax_out)
            if last is not None:
                last[:M].copy_(argmax_out)
        return out
    bufs = None
    if argmax_out is not None:
        nblk = triton.cdiv(N, _block_n(M, N, K, isinstance(w, Int4Gemv), getattr(w, "group_size", 1)))
        bufs = (torch.empty((M, nblk), dtype=torch.float32, device=x.device),
                torch.empty((M, nblk), dtype=torch.int64, device=x.device), nblk)
    _launch_gemv(x, w, bias, norm, act, residual, out, bufs)
    if argmax_out is not None:
        blk = min(4096, triton.next_power_of_2(bufs[2]))
        kw = {} if INTERPRET else {"num_warps": 8 if blk >= 2048 else 4}
        _argmax_finish_kernel[(M,)](bufs[0], bufs[1], argmax_out, last if last is not None else argmax_out,
                                    bufs[2], HAS_LAST=last is not None, BLOCK=blk, **_pdl_kw(), **kw)
    return out


def linear_impl(x, w, n, bias, norm, act, residual) -> str:
    """"triton" or "cublas" for this layer (weight shape, row count, fusions): whichever ran faster, both with
    their fusions (the Triton GEMV with its prologue/epilogue in one launch; cuBLAS with them as separate Triton
    launches), measured once on the GPU outside graph capture with CUDA-graph replays over weight copies larger
    than the L2 (or set beforehand in IMPL); "triton" when it cannot be measured."""
    M, K = x.shape
    key = (_weight_shape(w)[0], K, M, isinstance(w, Int4Gemv), act, norm is not None, residual is not None)
    impl = IMPL.get(key)
    if impl is not None:
        return impl
    if INTERPRET or not TUNE["impl"] or _capturing() or isinstance(w, Int4Gemv):
        return "triton"
    cp = _copies(w, x)
    t = {}
    for i in ("triton", "cublas"):
        try:
            t[i] = _bench(lambda j: linear(cp[j % len(cp)][1], cp[j % len(cp)][0], bias, norm, act, residual, impl=i))
        except Exception as e:  # a kernel that fails to build or launch here costs speed, not the run: say so
            t[i] = float("inf")
            ERRORS[(key, i)] = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("linear %s for %s failed (%s); using the other", i, key, ERRORS[(key, i)])
    IMPL[key] = impl = min(t, key=t.get)
    TIMES[key] = t
    return impl


ERRORS: dict[tuple, str] = {}       # what failed in linear_impl's measurements


TIMES: dict[tuple, dict] = {}        # what linear_impl measured, per key (ms)


def compare_gemm(x, w) -> dict:
    """Median GPU ms of the bare Triton GEMV (no fusions) and of cuBLAS (F.linear) on x [M, K] and this weight
    (rotating over copies larger than the L2)."""
    N2 = _weight_shape(w)[0]
    cp = _copies(w, x)
    out = torch.empty((x.shape[0], N2), dtype=x.dtype, device=x.device)
    tt = _bench(lambda j: _launch_gemv(cp[j % len(cp)][1], cp[j % len(cp)][0], None, None, None, None, out, None))
    res = {"triton_ms": tt, "copies": len(cp)}
    if isinstance(w, Int4Gemv):
        return res
    tc = _bench(lambda j: F.linear(cp[j % len(cp)][1], cp[j % len(cp)][0]))
    res.update(cublas_ms=tc, best="triton" if tt <= tc else "cublas")
    return res


def decode_attention(qkv, k_cache, v_cache, pos, cos, sin, kv_len: int, n_heads: int, n_kv: int, head_dim: int,
                     max_len: int, impl: str = "auto", chunk: int | None = None):
    """Rotary + KV write + attention for one decode step (module docstring); qkv [B, (H + 2 KV) * D] -> [B, H*D]."""
    if impl == "torch" or (impl == "auto" and not triton_ok(qkv)):
        return decode_attention_ref(qkv, k_cache, v_cache, pos, cos, sin, kv_len, n_heads, n_kv, head_dim, max_len)
    B = qkv.shape[0]
    G = n_heads // n_kv
    chunk = chunk or attention_chunk(kv_len, B * n_kv)
    splits = triton.cdiv(kv_len, chunk)
    bg = max(16, triton.next_power_of_2(G))
    bd = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty((B, n_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if splits > 1:
        pm = torch.empty((B, n_kv, splits, bg), dtype=torch.float32, device=qkv.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((B, n_kv, splits, bg, bd), dtype=torch.float32, device=qkv.device)
    else:
        pm = pl = pacc = out
    qkv = qkv.contiguous()
    # the whole chunk in one tile where it fits (no serial loop for short contexts): 256 keys x 64 dims = 32 KB
    bl = max(16, min(256 if not INTERPRET else 64, triton.next_power_of_2(chunk)))
    kw = {} if INTERPRET else {"num_warps": 8 if bl >= 128 else 4, "num_stages": 2}
    kw.update(_pdl_kw())
    _attn_kernel[(B, n_kv, splits)](
        qkv, cos if cos is not None else qkv, sin if sin is not None else qkv, k_cache, v_cache, pos, out, pm, pl,
        pacc, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), max_len, kv_len,
        head_dim ** -0.5, H=n_heads, KVH=n_kv, G=G, D=head_dim, ROPE=cos is not None, CHUNK=chunk, SPLITS=splits,
        BLOCK_G=bg, BLOCK_D=bd, BLOCK_L=bl, **kw)
    if splits > 1:
        _attn_combine_kernel[(B, n_kv)](pm, pl, pacc, out, out.stride(0), KVH=n_kv, G=G, D=head_dim, SPLITS=splits,
                                        BLOCK_S=triton.next_power_of_2(splits), BLOCK_G=bg, BLOCK_D=bd,
                                        **_pdl_kw())
    return out


ATTN = {"chunk": 0, "programs": 128}     # 0: chunk from kv_len (attention_chunk); the GPU script may pin it


def attention_chunk(kv_len: int, programs: int) -> int:
    """Positions per split: one split (no combine launch) while that leaves enough programs, else splits of 128
    or more so that rows x KV heads x splits reach ATTN["programs"]."""
    if ATTN["chunk"]:
        return min(ATTN["chunk"], kv_len)
    if kv_len <= 256:
        return kv_len
    want = max(1, ATTN["programs"] // max(1, programs))
    return max(128, triton.next_power_of_2(triton.cdiv(kv_len, want)))


def embed(ids, emb, pos=None, pos_emb=None, max_len: int = 0, feed=None, impl: str = "auto"):
    """Token embedding (+ GPT-2 positions); `feed` = (use_prev, last): rows flagged take last[b] as their token."""
    if impl == "torch" or (impl == "auto" and not triton_ok(ids)):
        return embed_ref(ids, emb, pos, pos_emb, max_len, feed)
    B, C = ids.shape[0], emb.shape[1]
    x = torch.empty((B, C), dtype=emb.dtype, device=emb.device)
    use_prev, last = feed if feed is not None else (ids, ids)
    _embed_kernel[(B,)](ids, use_prev, last, emb, pos if pos is not None else ids,
                        pos_emb if pos_emb is not None else emb, x, C, max_len, HAS_FEED=feed is not None,
                        HAS_PEMB=pos_emb is not None, BLOCK_C=triton.next_power_of_2(C), **_pdl_kw())
    return x


def gemv_bytes(n: int, k: int, int4: bool, gs: int = 128, itemsize: int = 2) -> int:
    """Weight bytes one GEMV reads (the floor of the per-shape table)."""
    return n * k // 2 + 2 * n * (k // gs) * itemsize if int4 else n * k * itemsize


__all__ = ["Norm", "Int4Gemv", "linear", "decode_attention", "embed", "linear_ref", "decode_attention_ref",
           "embed_ref", "HAS_TRITON", "triton_ok"]
