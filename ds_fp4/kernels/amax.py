"""Pass 1 of every quantization: the tensor amax, max |x| over a 2D (possibly strided) tensor.

NVFP4's global scale comes from the current tensor's amax, so quantizing is two passes over the input:
this reduction, then the block-scale + code pass of quantize_1x16.py / quantize_16x16.py. With
``HADAMARD`` the random Hadamard transform is applied to each 16-element block first (the amax of the
transformed tensor is what the wgrad operands need); the quantize pass recomputes the transform
rather than storing it, trading a little arithmetic for a full write + read of the tensor.

Each program reduces one tile of BM rows x G blocks of 16 to a single int32 (the bit pattern of
max |x|, see nvfp4_math.abs_bits) and folds it into a one-element buffer with a relaxed atomic max.
Integer max keeps NaN (its pattern sorts above inf) and does not depend on the order of programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks as bl
from . import nvfp4_math as nm
from ._launch import autotune, check_2d_input, launch_options


def _configs(interpret: bool):
    if interpret:
        return [triton.Config({"BM": 64, "G": 16}, num_warps=4)]
    return [
        triton.Config({"BM": 32, "G": 16}, num_warps=4),
        triton.Config({"BM": 64, "G": 16}, num_warps=8),
        triton.Config({"BM": 16, "G": 32}, num_warps=4),
        triton.Config({"BM": 128, "G": 8}, num_warps=8),
        # Two 16-blocks per thread: the RHT variant on fp32 input spills with four on sm_80
        # (bench/results/kernel_resources.json), so each arch keeps a config that does not.
        triton.Config({"BM": 32, "G": 16}, num_warps=8),
        triton.Config({"BM": 16, "G": 16}, num_warps=4),
    ]


@autotune("amax", _configs, key=["M", "K", "HADAMARD", "ROW_CONTIG"])
@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, M, K, stride_xm, stride_xk, HADAMARD: tl.constexpr, SIGNS: tl.constexpr,
                 ROW_CONTIG: tl.constexpr, BM: tl.constexpr, G: tl.constexpr):
    if HADAMARD:
        # Blocks as 16-tuples, as in quantize_1x16.py, so the butterfly is elementwise.
        R: tl.constexpr = BM * G
        rows, blocks, ok = bl.program_blocks(M, K, BM, G, ROW_CONTIG)
        x = bl.rht_block(bl.load_blocks(x_ptr, rows, blocks, ok, stride_xm, stride_xk, R, ROW_CONTIG), SIGNS)
        tile_max = tl.max(bl.block_absmax(x), axis=0)
    else:
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * (16 * G) + tl.arange(0, 16 * G)
        mask = (rm < M)[:, None] & (rk < K)[None, :]
        ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
        x = nm.to_f32(tl.load(ptrs, mask=mask, other=0.0))
        tile_max = tl.max(tl.max(nm.abs_bits(x), axis=1), axis=0)
    tl.atomic_max(amax_bits_ptr, tile_max, sem="relaxed")


def tensor_amax_bits(x2d: torch.Tensor, signs_mask: int | None = None) -> torch.Tensor:
    """int32 [1] holding the fp32 bit pattern of max |x| (of rht(x) when ``signs_mask`` is given).

    Returned as bits so the quantize pass can read it without a host sync; ``.view(torch.float32)``
    gives the amax.
    """
    check_2d_input("tensor_amax_bits", x2d)
    m, k = x2d.shape
    out = torch.zeros(1, dtype=torch.int32, device=x2d.device)
    if x2d.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(k // 16, meta["G"]))

    _amax_kernel[grid](
        x2d, out, m, k, x2d.stride(0), x2d.stride(1),
        HADAMARD=signs_mask is not None, SIGNS=signs_mask or 0, ROW_CONTIG=x2d.stride(1) == 1,
        **launch_options(),
    )
    return out
