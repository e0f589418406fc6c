"""Weight-only quantization of the compiled engine's linear layers (activations stay FP16/BF16).

    q = quantize_weight(w, "int4", group_size=128)     # w: [out, in] floating point, on its device
    y = q(x, bias)                                      # = F.linear(x, dequantized w, bias)

Schemes (the rows `profile/compiled_engine_gpu.py --weights ...` measures; the engine keeps one only where it is
faster than the unquantized step, see docs/compiled_engine.md):
    int8     per-output-channel symmetric INT8; the matmul is `F.linear(x, w8.to(x.dtype)) * scale`, which
             torch.compile (inductor) may fuse into one kernel reading INT8 weights (gpt-fast's int8 recipe)
    int8mm   the same weights through PyTorch's `_weight_int8pack_mm` kernel (CPU; on CUDA where the build has it)
    int4     asymmetric INT4 in groups of `group_size` along the input dimension, through PyTorch's tinygemm kernel
             (`_weight_int4pack_mm`, the kernel gpt-fast and torchao's int4 weight-only layout use). BF16
             activations on CUDA (the kernel's only input type); the CPU twin `_weight_int4pack_mm_for_cpu` runs the
             same numbers for tests.
    int4g    the same INT4 numbers (groups of `group_size`, FP16/BF16 scales), packed for the fused decode step's
             own GEMV (lmopt.engines.kernels.Int4Gemv: dequantized in registers inside the GEMV, activations stay
             FP16; on the CPU the torch reference dequantizes)
The quantized weights are plain tensors held by a small callable, so the decode step stays one fullgraph
torch.compile graph and one CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

SCHEMES = ("int8", "int8mm", "int4", "int4g")


class Int8Weight:
    def __init__(self, w: torch.Tensor, use_mm: bool = False):
        wf = w.float()
        scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.w8 = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(w.dtype)
        self.use_mm = use_mm
        self.shape = tuple(w.shape)

    def nbytes(self) -> int:
        return self.w8.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        return self.w8.to(self.scale.dtype) * self.scale[:, None]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_mm:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.w8, self.scale)
            y = y.reshape(*x.shape[:-1], self.shape[0])
        else:
            y = F.linear(x, self.w8.to(x.dtype)) * self.scale
        return y if bias is None else y + bias


class Int4Weight:
    """tinygemm layout: weights packed by `_convert_weight_to_int4pack`, scales and zero points as
    [in / group, out, 2] in BF16 (zero point = the value of code 8, as gpt-fast and torchao's int4 layout store it)."""

    def __init__(self, w: torch.Tensor, group_size: int = 128, inner_k_tiles: int = 8):
        n, k = w.shape
        if k % group_size or group_size not in (32, 64, 128, 256):
            raise UserError(f"INT4 groups of {group_size} do not divide the input dimension {k} (groups of 32, 64, "
                            "128 or 256 that divide it) — pass another group size")
        while inner_k_tiles > 2 and k % (inner_k_tiles * 16):
            inner_k_tiles //= 2
        if k % (inner_k_tiles * 16) or n % 8:
            raise UserError(f"a {n}x{k} weight does not fit the INT4 kernel's tiles (output dim a multiple of 8, "
                            "input dim of 32) — leave this model unquantized")
        self.group_size, self.shape, self.out_dtype = group_size, (n, k), w.dtype
        g = w.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16).float()
        zero = (lo + scale * 8).to(torch.bfloat16).float()
        q = torch.round((g - (zero - scale * 8)) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.cpu = w.device.type == "cpu"
        if self.cpu:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        else:
            q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q8.contiguous(), inner_k_tiles)
        self.scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1) \
            .transpose(0, 1).contiguous().to(torch.bfloat16)           # [k / group, n, 2]

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        y = y.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)
        return y if bias is None else y + bias


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128):
    if scheme == "int8":
        return Int8Weight(w)
    if scheme == "int8mm":
        return Int8Weight(w, use_mm=True)
    if scheme == "int4":
        return Int4Weight(w, group_size)
    if scheme == "int4g":
        from .kernels import Int4Gemv

        return Int4Gemv(w, group_size)
    raise UserError(f"unknown weight quantization '{scheme}' — use one of {', '.join(SCHEMES)}")
