"""16x16 NVFP4 quantization: pass 2 for weights, writing W and W^T in one read of W.

fprop consumes W [N, K] quantized along K and dgrad consumes W^T [K, N] quantized along N. With one
scale per 16x16 tile both layouts hold the same codes and the same scales (docs/design.md §3: "W and W^T
decode identically"), so the kernel encodes each tile once and stores it twice: the row-wise bytes,
and the transposed bytes (codes of rows 2i and 2i+1 paired into one byte of W^T). That replaces a
second quantization (another full read of the fp32 master weight) by a transpose in registers.

Without ``WRITE_T`` it is the general 16x16 quantizer (any rounding, optional RHT, block scales rounded
to nearest or up) behind ``ds_fp4.quantize(x, tile=(16, 16))``. Arithmetic and Philox indexing are those
of quantize_1x16.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks as bl
from . import nvfp4_math as nm
from ._launch import autotune, check_2d_input, launch_options
from .amax import tensor_amax_bits


def _configs(interpret: bool):
    if interpret:
        return [triton.Config({"BM": 32, "BK": 128}, num_warps=4)]
    return [
        triton.Config({"BM": 32, "BK": 128}, num_warps=4),
        triton.Config({"BM": 64, "BK": 128}, num_warps=8),
        triton.Config({"BM": 64, "BK": 64}, num_warps=4),
        triton.Config({"BM": 128, "BK": 64}, num_warps=8),
        triton.Config({"BM": 16, "BK": 256}, num_warps=4),
    ]


@autotune("quantize_16x16", _configs, key=["M", "K", "HADAMARD", "STOCHASTIC", "WRITE_T", "SCALE_UP"])
@triton.jit(do_not_specialize=["seed"])
def _quantize_16x16_kernel(x_ptr, data_ptr, scale_ptr, data_t_ptr, scale_t_ptr, amax_bits_ptr, seed,
                           M, K, stride_xm, stride_xk,
                           HADAMARD: tl.constexpr, SIGNS: tl.constexpr, STOCHASTIC: tl.constexpr,
                           WRITE_T: tl.constexpr, SCALE_UP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    row_ok = rm < M
    col_ok = rk < K
    ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
    x = nm.to_f32(tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0))

    g_enc, g_dec = nm.global_scales(tl.load(amax_bits_ptr).to(tl.float32, bitcast=True))

    TM: tl.constexpr = BM // 16
    TK: tl.constexpr = BK // 16
    if HADAMARD:
        x = bl.rht16(tl.reshape(x, [BM * TK, 16]), BM * TK, SIGNS)
    x = tl.reshape(x, [TM, 16, TK, 16])
    tmax = tl.max(tl.max(nm.abs_bits(x), axis=3), axis=1).to(tl.float32, bitcast=True)  # [TM, TK]
    scale_code, enc = nm.block_encode_scale(tmax, g_enc, g_dec, SCALE_UP)
    v = x * enc[:, None, :, None]
    if STOCHASTIC:
        u = nm.philox_uniforms(seed, rm, pid_k * BK, K, BM, BK)
        codes = nm.e2m1_stochastic(v, tl.reshape(u, [TM, 16, TK, 16]))
    else:
        codes = nm.e2m1_nearest(v)
    codes = tl.where((enc != enc)[:, None, :, None], 0, codes)  # NaN tile: all codes 0, as in the reference
    codes = tl.reshape(codes, [BM, BK])

    rb = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    tl.store(data_ptr + rm.to(tl.int64)[:, None] * (K // 2) + rb[None, :], nm.pack_pairs(codes, BM, BK),
             mask=row_ok[:, None] & (rb < K // 2)[None, :])
    scale_rows = tl.reshape(tl.broadcast_to(scale_code.to(tl.uint8)[:, None, :], [TM, 16, TK]), [BM, TK])
    rs = pid_k * TK + tl.arange(0, TK)
    tl.store(scale_ptr + rm.to(tl.int64)[:, None] * (K // 16) + rs[None, :], scale_rows,
             mask=row_ok[:, None] & (rs < K // 16)[None, :])
    if WRITE_T:
        rbt = pid_m * (BM // 2) + tl.arange(0, BM // 2)
        packed_t = nm.pack_pairs(tl.trans(codes), BK, BM)  # [BK, BM // 2]
        tl.store(data_t_ptr + rk.to(tl.int64)[:, None] * (M // 2) + rbt[None, :], packed_t,
                 mask=col_ok[:, None] & (rbt < M // 2)[None, :])
        scale_t = tl.trans(scale_code.to(tl.uint8))  # [TK, TM]
        scale_t_rows = tl.reshape(tl.broadcast_to(scale_t[:, None, :], [TK, 16, TM]), [BK, TM])
        rst = pid_m * TM + tl.arange(0, TM)
        tl.store(scale_t_ptr + rk.to(tl.int64)[:, None] * (M // 16) + rst[None, :], scale_t_rows,
                 mask=col_ok[:, None] & (rst < M // 16)[None, :])


def _check_16x16(name: str, x2d: torch.Tensor) -> None:
    check_2d_input(name, x2d)
    if x2d.shape[0] % 16:
        raise ValueError(f"{name} needs both dims divisible by 16 (16x16 tiles); got shape {tuple(x2d.shape)}")


def _launch(x2d, write_t, stochastic, signs_mask, seed, scale_up):
    m, k = x2d.shape
    dev = x2d.device
    amax_bits = tensor_amax_bits(x2d, signs_mask)
    data = torch.empty((m, k // 2), dtype=torch.uint8, device=dev)
    scale = torch.empty((m, k // 16), dtype=torch.uint8, device=dev)
    data_t = torch.empty((k, m // 2) if write_t else (0,), dtype=torch.uint8, device=dev)
    scale_t = torch.empty((k, m // 16) if write_t else (0,), dtype=torch.uint8, device=dev)
    if x2d.numel():

        def grid(meta):
            return (triton.cdiv(m, meta["BM"]), triton.cdiv(k, meta["BK"]))

        _quantize_16x16_kernel[grid](
            x2d, data, scale, data_t, scale_t, amax_bits, int(seed) if stochastic else 0,
            m, k, x2d.stride(0), x2d.stride(1),
            HADAMARD=signs_mask is not None, SIGNS=signs_mask or 0, STOCHASTIC=stochastic, WRITE_T=write_t,
            SCALE_UP=bool(scale_up), **launch_options(),
        )
    amax = amax_bits.view(torch.float32).reshape(())
    return data, scale.view(torch.float8_e4m3fn), data_t, scale_t.view(torch.float8_e4m3fn), amax


def quantize_16x16(
    x2d: torch.Tensor,
    *,
    stochastic: bool = False,
    signs_mask: int | None = None,
    seed: int | None = None,
    scale_up: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16x16-tile quantization of x2d [M, K] (any strides; M, K % 16 == 0): (data, scale, amax).

    Arguments as for quantize_1x16.quantize_1x16 (seed: 0 <= seed < 2**63, required with ``stochastic``).
    """
    _check_16x16("quantize_16x16", x2d)
    data, scale, _, _, amax = _launch(x2d, False, stochastic, signs_mask, seed, scale_up)
    return data, scale, amax


def quantize_weight(w2d: torch.Tensor):
    """16x16 nearest quantization of W [N, K] and of W^T in one pass.

    Returns (data [N, K/2], scale [N, K/16], data_t [K, N/2], scale_t [K, N/16], amax): the first two
    equal ds_fp4.reference.quantize_weight's.
    """
    _check_16x16("quantize_weight", w2d)
    return _launch(w2d, True, False, None, None, False)
