"""NVFP4 -> dense: decode codes and block scales (optionally times the global decode scale).

Two uses. ``NVFP4Tensor.dequantize`` on the GPU (``GLOBAL=True``: e2m1 * s_block * g_dec in fp32,
then cast, exactly docs/design.md §2 step 6). And the "dequant" strategy of the emulated GEMM
(``GLOBAL=False``, fp16 out): e2m1 * s_block is exact in fp16, so decoding both operands once and
handing them to cuBLAS gives the same products as the fused kernel, at close to bf16-matmul speed
on Hopper, where decoding inside the GEMM's K loop costs more issue slots than the MMAs themselves.

Each program decodes a [BR, BK] tile: the low and high nibbles of each byte are decoded separately
and interleaved with tl.join, the [BR, BK/16] scales are broadcast over their 16 columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import nvfp4_math as nm
from ._launch import OUT_DTYPES, autotune, launch_options


def _configs(interpret: bool):
    if interpret:
        return [triton.Config({"BR": 32, "BK": 128}, num_warps=4)]
    return [
        triton.Config({"BR": 32, "BK": 256}, num_warps=4),
        triton.Config({"BR": 64, "BK": 256}, num_warps=8),
        triton.Config({"BR": 16, "BK": 512}, num_warps=4),
        triton.Config({"BR": 128, "BK": 128}, num_warps=8),
    ]


@triton.jit
def _e2m1_to_f32(c):
    """E2M1 code (int32, 4 bits) -> fp32, exact: magnitudes >= 1 rebias the exponent, 0.5 is special."""
    mag = c & 0x7
    bits = tl.where(mag > 1, (mag << 22) + 0x3F000000, mag * 0x3F000000) | ((c & 0x8) << 28)
    return bits.to(tl.float32, bitcast=True)


@autotune("decode", _configs, key=["R", "K", "GLOBAL"])
@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, amax_ptr, out_ptr, R, K, stride_dr, stride_sr, stride_or,
                       GLOBAL: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
    rs = tl.program_id(1) * (BK // 16) + tl.arange(0, BK // 16)
    row_ok = (rr < R)[:, None]
    rr64 = rr.to(tl.int64)[:, None]
    byte = tl.load(data_ptr + rr64 * stride_dr + rb[None, :], mask=row_ok & (rb < K // 2)[None, :], other=0)
    code = tl.load(scale_ptr + rr64 * stride_sr + rs[None, :], mask=row_ok & (rs < K // 16)[None, :], other=0)
    b = byte.to(tl.int32)
    vals = tl.reshape(tl.join(_e2m1_to_f32(b & 0xF), _e2m1_to_f32(b >> 4)), [BR, BK // 16, 16])
    out = vals * nm.e4m3_to_f32(code.to(tl.int32))[:, :, None]
    if GLOBAL:
        out = out * nm.decode_scale(tl.load(amax_ptr))
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + rr64 * stride_or + rk[None, :], nm.cast_out(tl.reshape(out, [BR, BK]), out_ptr.dtype.element_ty),
             mask=row_ok & (rk < K)[None, :])


def dequantize(data: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype = torch.float32,
               *, apply_global_scale: bool = True) -> torch.Tensor:
    """Decode (data uint8 [R, K/2], scale e4m3 [R, K/16], amax) to [R, K] of ``out_dtype``.

    apply_global_scale=False returns e2m1 * s_block (NVFP4Tensor.scaled_codes), exact in fp16/bf16/fp32.
    """
    if data.dim() != 2 or data.dtype != torch.uint8:
        raise ValueError(f"dequantize: data must be 2D uint8; got {data.dtype} {tuple(data.shape)}")
    r, k = data.shape[0], data.shape[1] * 2
    if scale.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(scale.shape) != (r, k // 16) or k % 16:
        raise ValueError(
            f"dequantize: scale must be float8_e4m3fn [{r}, {k // 16}] for data {tuple(data.shape)}; "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    if amax.numel() != 1 or amax.dtype != torch.float32:
        raise ValueError(f"dequantize: amax must be one fp32 value; got {amax.dtype} {tuple(amax.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize: out_dtype must be one of {OUT_DTYPES}; got {out_dtype}")
    if data.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError(f"dequantize: data and scale need unit stride along K; got {data.stride()}, {scale.stride()}")
    out = data.new_empty((r, k), dtype=out_dtype)
    if out.numel():

        def grid(meta):
            return (triton.cdiv(r, meta["BR"]), triton.cdiv(k, meta["BK"]))

        _dequantize_kernel[grid](
            data, scale.view(torch.uint8), amax.reshape(1), out, r, k, data.stride(0), scale.stride(0), out.stride(0),
            GLOBAL=apply_global_scale, **launch_options(),
        )
    return out
