"""1x16 NVFP4 quantization: pass 2 (block scales + codes), with optional fused RHT and stochastic rounding.

This is the quantizer for activations and gradients (docs/design.md §3): X in fprop (nearest), dY in dgrad
(stochastic), and both wgrad operands dY^T and X^T (RHT, then stochastic resp. nearest). The wgrad
operands arrive as transposed views, so the kernel reads through arbitrary strides instead of asking
for a contiguous copy: with unit stride along K a block is one vector load, otherwise its 16
elements are 16 loads that coalesce along M.

Each program owns BM rows x G blocks of 16 and holds every block as a 16-tuple of [R] tensors
(blocks.py), so a thread owns whole blocks: the RHT butterfly (recomputed here, never
stored), the block max, the scale and the codes are elementwise, the 16 nibbles of a block are
packed into two int32 words and written with one 8-byte store, the scale with one byte store.
(Written as [rows, 16] tiles with reshapes, the same arithmetic compiled to 2-3x more instructions
on sm_90: replicated per-block work and layout shuffles.) Stochastic rounding draws one
Philox4x32-10 call per four elements, keyed by the element's row-major index in the [M, K] tensor,
exactly like ds_fp4.rng, so it is bit-exact against the reference for the same seed and independent
of the tile configuration.
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
        return [triton.Config({"BM": 32, "G": 16}, num_warps=4)]
    return [
        triton.Config({"BM": 16, "G": 16}, num_warps=4),
        triton.Config({"BM": 32, "G": 16}, num_warps=4),
        triton.Config({"BM": 32, "G": 32}, num_warps=8),
        triton.Config({"BM": 64, "G": 8}, num_warps=4),
        triton.Config({"BM": 128, "G": 4}, num_warps=4),
    ]


@autotune("quantize_1x16", _configs, key=["M", "K", "HADAMARD", "STOCHASTIC", "ROW_CONTIG", "SCALE_UP"])
@triton.jit(do_not_specialize=["seed"])
def _quantize_1x16_kernel(x_ptr, data_ptr, scale_ptr, amax_bits_ptr, seed, M, K, stride_xm, stride_xk,
                          HADAMARD: tl.constexpr, SIGNS: tl.constexpr, STOCHASTIC: tl.constexpr,
                          ROW_CONTIG: tl.constexpr, SCALE_UP: tl.constexpr, BM: tl.constexpr, G: tl.constexpr):
    R: tl.constexpr = BM * G
    rows, blocks, ok = bl.program_blocks(M, K, BM, G, ROW_CONTIG)
    x = bl.load_blocks(x_ptr, rows, blocks, ok, stride_xm, stride_xk, R, ROW_CONTIG)
    if HADAMARD:
        x = bl.rht_block(x, SIGNS)

    g_enc, g_dec = nm.global_scales(tl.load(amax_bits_ptr).to(tl.float32, bitcast=True))
    bmax = bl.block_absmax(x).to(tl.float32, bitcast=True)
    scale_code, enc = nm.block_encode_scale(bmax, g_enc, g_dec, SCALE_UP)
    if STOCHASTIC:
        rnd = bl.block_uniforms(seed, rows, blocks, K)
    else:
        rnd = None
    lo, hi = bl.encode_block(x, enc, rnd, STOCHASTIC)

    # data is addressed as int32 words: a block's 16 nibbles are 8 bytes, words 2b and 2b + 1.
    words = rows.to(tl.int64) * (K // 8) + blocks * 2
    tl.store(data_ptr + words[:, None] + tl.arange(0, 2)[None, :], tl.join(lo, hi), mask=ok[:, None])
    tl.store(scale_ptr + rows.to(tl.int64) * (K // 16) + blocks, scale_code.to(tl.uint8), mask=ok)


def quantize_1x16(
    x2d: torch.Tensor,
    *,
    stochastic: bool = False,
    signs_mask: int | None = None,
    seed: int | None = None,
    scale_up: bool = False,
    _amax_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x2d [M, K] (any strides) along K: (data uint8 [M, K/2], scale e4m3 [M, K/16], amax fp32 0-dim).

    signs_mask: None, or the RHT signs as a 16-bit mask (nvfp4_math.signs_mask) to transform first.
    seed: required with ``stochastic``; the Philox key (0 <= seed < 2**63, as ds_fp4.nvfp4 checks).
    scale_up: block scales rounded up, not to nearest (no clamping; NVFP4 communication uses it).
    _amax_bits: pass 1's result (amax.tensor_amax_bits) to run pass 2 alone; for bench/kernels.py.
    """
    check_2d_input("quantize_1x16", x2d)
    m, k = x2d.shape
    dev = x2d.device
    amax_bits = tensor_amax_bits(x2d, signs_mask) if _amax_bits is None else _amax_bits
    data = torch.empty((m, k // 2), dtype=torch.uint8, device=dev)
    scale = torch.empty((m, k // 16), dtype=torch.uint8, device=dev)
    if x2d.numel():

        def grid(meta):
            return (triton.cdiv(m, meta["BM"]), triton.cdiv(k // 16, meta["G"]))

        _quantize_1x16_kernel[grid](
            x2d, data.view(torch.int32), scale, amax_bits, int(seed) if stochastic else 0,
            m, k, x2d.stride(0), x2d.stride(1),
            HADAMARD=signs_mask is not None, SIGNS=signs_mask or 0, STOCHASTIC=stochastic,
            ROW_CONTIG=x2d.stride(1) == 1, SCALE_UP=bool(scale_up), **launch_options(),
        )
    return data, scale.view(torch.float8_e4m3fn), amax_bits.view(torch.float32).reshape(())
