"""Decode attention that reads the paged KV cache through the block table (a Triton kernel), instead of gathering
each row's blocks into a dense copy first (the compiled engine's default for kv_layout="paged"; docs/paged_kv.md).

    a = paged_decode_attention(q, k_cache, v_cache, table, pos)   # q [B, H, D] -> [B, H * D]

Caches are [num_blocks, block_size, kv_heads, head_dim] with this step's keys and values already written; row b
attends to positions 0..pos[b] of its blocks table[b, 0], table[b, 1], ... Program (row, KV head, split): the G
query heads of that KV head against one chunk of positions, block by block (one block-table entry per block), with
an online softmax; several splits per row (flash-decoding, so a short batch still fills the GPU) are merged by a
second kernel. The same scheme as the contiguous fused kernel in lmopt.engines.kernels, with the table lookup in
place of the contiguous offset. `paged_decode_attention_ref` is the torch reference (gather + softmax).
On a GPU only, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, the tests).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover  (torch wheels for CUDA ship Triton; CPU-only installs may not)
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TARGET_PROGRAMS = 264    # about two programs per SM of an H100/H200: splits are added until a step has this many


def available(device: str) -> str | None:
    """None when the kernel can run on `device`, else why not."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if not (device.startswith("cuda") or INTERPRET):
        return "the paged attention kernel runs on a GPU (or under TRITON_INTERPRET=1)"
    return None


def paged_decode_attention_ref(q, k_cache, v_cache, table, pos):
    """Gather + softmax: what the kernel computes (fp32 scores)."""
    B, H, D = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    nb = table.shape[1]
    kc = k_cache[table].flatten(1, 2).transpose(1, 2)               # [B, KV, nb*bs, D]
    vc = v_cache[table].flatten(1, 2).transpose(1, 2)
    qg = q.reshape(B, kvh, H // kvh, D)
    sc = torch.matmul(qg, kc.transpose(-1, -2)).float() * (D ** -0.5)
    mask = torch.arange(nb * bs, device=q.device)[None, :] <= pos[:, None]
    sc = sc.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1).to(q.dtype)
    return torch.matmul(p, vc).reshape(B, H * D)


if HAS_TRITON:
    @triton.jit
    def _paged_attn_kernel(Q, KC, VC, TABLE, POS, O, PM, PL, PACC,
                           stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb, stride_ob, scale, n_pos,
                           KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                           CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        pos = tl.load(POS + b)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < G
        d_ok = d < D
        qm = g_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        end = tl.minimum(tl.minimum((s + 1) * CHUNK, pos + 1), n_pos)   # padding rows: pos = max_len
        p_in = tl.arange(0, BS)
        for j0 in range(s * CHUNK, (s + 1) * CHUNK, BS):
            blk = tl.load(TABLE + b * stride_tb + j0 // BS, mask=j0 < end, other=0).to(tl.int64)
            j_ok = (j0 + p_in) < end
            off = blk * stride_kb + p_in[:, None] * stride_kp + h * stride_kh + d[None, :]
            lm = j_ok[:, None] & d_ok[None, :]
            kt = tl.load(KC + off, mask=lm, other=0.0)
            sc = tl.dot(q, tl.trans(kt)) * scale                            # [BLOCK_G, BS]
            sc = tl.where(j_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(VC + off, mask=lm, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        if SPLITS == 1:
            tl.store(O + b * stride_ob + (h * G + g)[:, None] * D + d[None, :],
                     (acc / l_i[:, None]).to(O.dtype.element_ty), mask=qm)
        else:
            base = (b * KVH + h) * SPLITS + s
            tl.store(PM + base * BLOCK_G + g, m_i)
            tl.store(PL + base * BLOCK_G + g, l_i)
            tl.store(PACC + (base * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], acc)


def split_chunk(nb: int, bs: int, programs: int) -> int:
    """Positions per split: whole blocks, a power of two times the block size, as many splits as it takes for
    the step to have about TARGET_PROGRAMS programs (one split when the batch alone has that many)."""
    want = max(1, min(nb, -(-TARGET_PROGRAMS // max(programs, 1))))
    blocks = triton.next_power_of_2(-(-nb // want))
    return blocks * bs


def paged_decode_attention(q, k_cache, v_cache, table, pos, chunk: int | None = None):
    """q [B, H, D] (rotary applied), caches [num_blocks, BS, KV, D], table [B, nb] (block ids; nb * BS covers every
    row's position), pos [B]: attention of each row over its positions 0..pos[b]. Returns [B, H * D]."""
    B, H, D = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    nb = table.shape[1]
    G = H // kvh
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the head dimension contiguous")
    chunk = chunk or split_chunk(nb, bs, B * kvh)
    splits = triton.cdiv(nb * bs, chunk)
    bg = max(16, triton.next_power_of_2(G))
    bd = max(16, triton.next_power_of_2(D))
    out = torch.empty((B, H * D), dtype=q.dtype, device=q.device)
    if splits > 1:
        pm = torch.empty((B * kvh * splits * bg,), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((B * kvh * splits * bg * bd,), dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = out
    _paged_attn_kernel[(B, kvh, splits)](
        q, k_cache, v_cache, table, pos, out, pm, pl, pacc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        out.stride(0), D ** -0.5, nb * bs, KVH=kvh, G=G, D=D, BS=bs, CHUNK=chunk, SPLITS=splits, BLOCK_G=bg, BLOCK_D=bd)
    if splits > 1:
        from .kernels import _attn_combine_kernel   # the splits' partials are laid out as the contiguous kernel's

        _attn_combine_kernel[(B, kvh)](pm, pl, pacc, out, out.stride(0), KVH=kvh, G=G, D=D, SPLITS=splits,
                                       BLOCK_S=triton.next_power_of_2(splits), BLOCK_G=bg, BLOCK_D=bd, USE_PDL=False)
    return out
