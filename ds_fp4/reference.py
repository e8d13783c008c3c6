"""The torch reference of NVFP4 quantization and GEMM: docs/design.md §2 in executable form.

Every kernel is tested bit for bit against :func:`quantize` (docs/design.md §7.2). Round-to-nearest is a
bit-exact contract; every step is fp32 with IEEE rounding, in this order, because that is what
Transformer Engine computes and kernels must reproduce it exactly:
  1. g_enc = min(2688 / amax, FLT_MAX) (2688 = 448 * 6); g_enc = 1 if it is 0 (amax = inf) or NaN.
     g_dec = 1 / g_enc.
  2. mult = g_enc * fp32(1/6): the fp32 reciprocal of 6, then one multiply (not a division by 6).
  3. s_block = e4m3_rne(clamp(min(b * mult, FLT_MAX), -448, 448)) with b the block's max |x|.
  4. enc = min(1 / (fp32(s_block) * g_dec), FLT_MAX): a product, then a reciprocal.
  5. v = clamp(x * enc, -6, 6) rounds to the nearest E2M1 magnitude with ties to the even code
     (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
  6. decode: (e2m1 * fp32(s_block)) * g_dec, g_dec recomputed from amax by step 1.
Stochastic rounding replaces step 5's nearest choice by a random choice between the two neighbouring
E2M1 values, P(up) = (|v| - lo) / (hi - lo) (exact: hi - lo is a power of two), using the Philox
stream of :mod:`ds_fp4.rng` with the element's row-major index as counter.

Non-finite input poisons the whole tensor: g_dec is NaN whenever amax is not finite, so every decoded
value is NaN and a training step can detect and skip it; nothing silently turns finite.

The functions have the interface of :mod:`ds_fp4.kernels` (the same arguments, the same returns), so
that :mod:`ds_fp4.nvfp4` validates once and hands both backends the same call: a 2D float tensor and a
:class:`~ds_fp4.nvfp4_tensor.QuantizeArgs`, which they trust.
"""

from __future__ import annotations

import torch

from . import hadamard, rng
from .e2m1 import FP4_MAX, encode_nearest, encode_stochastic, pack_nibbles
from .nvfp4_tensor import BLOCK, E4M3_MAX, FLT_MAX, NVFP4Tensor, QuantizeArgs, f32, global_encode_scale

WEIGHT = QuantizeArgs(tile=(16, 16))  # weights: 16x16 tiles, round-to-nearest (docs/design.md §3)


def block_amax(a: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Per-block max of |x| (a >= 0) [M, K], broadcastable back to [M, K // 16]."""
    m, k = a.shape
    if tile == (1, 16):
        return a.view(m, k // BLOCK, BLOCK).amax(dim=-1)
    tiles = a.view(m // BLOCK, BLOCK, k // BLOCK, BLOCK).amax(dim=(1, 3))
    return tiles.repeat_interleave(BLOCK, dim=0)


def e4m3_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 value >= s, for 0 <= s <= 448 (RNE, then one code up where RNE went down)."""
    rne = s.to(torch.float8_e4m3fn)
    below = (rne.to(torch.float32) < s).to(torch.uint8)
    return (rne.view(torch.uint8) + below).view(torch.float8_e4m3fn)  # codes are monotonic for s >= 0


def quantize(x2d: torch.Tensor, args: QuantizeArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data uint8 [M, K/2], scale float8_e4m3fn [M, K/16], amax fp32 0-dim) of x2d [M, K] (any strides).

    ``scale_rounding="up"`` departs from the spec on purpose (it is not what the GEMM recipe or
    Transformer Engine computes): block scales round up instead of to nearest, so no element exceeds
    6 after scaling and none is clamped. Clamping shrinks a block's maximum by up to 6.25%, a small
    bias towards zero that stochastic rounding cannot remove; the communication path uses "up" so
    that its reduced gradients are unbiased.
    """
    if args.signs is not None:
        xf = hadamard.rht(x2d, args.signs)
    else:
        xf = x2d.to(torch.float32).contiguous()  # wgrad operands arrive transposed
    dev = xf.device
    a = xf.abs()
    amax = a.amax() if a.numel() else a.new_zeros(())
    g_enc = global_encode_scale(amax)
    g_dec = 1.0 / g_enc
    mult = g_enc * (f32(1.0, dev) / f32(6.0, dev))
    b = block_amax(a, args.tile)
    s = torch.clamp(torch.minimum(b * mult, f32(FLT_MAX, dev)), -E4M3_MAX, E4M3_MAX)
    # A NaN block's scale is NaN; CPU min/clamp may return it with the sign bit set: store the positive
    # NaN (0x7F), as the kernels do, so the bytes do not depend on the device.
    s = torch.where(torch.isnan(s), f32(float("nan"), dev), s)
    scale = s.to(torch.float8_e4m3fn) if args.scale_rounding == "nearest" else e4m3_round_up(s)
    enc = torch.minimum(1.0 / (scale.to(torch.float32) * g_dec), f32(FLT_MAX, dev))
    m, k = xf.shape
    v = torch.clamp(xf.view(m, k // BLOCK, BLOCK) * enc.unsqueeze(-1), -FP4_MAX, FP4_MAX).view(m, k)
    if args.stochastic:
        codes = encode_stochastic(v, rng.uniform(v.numel(), args.seed, device=dev))
    else:
        codes = encode_nearest(v)
    return pack_nibbles(codes), scale, amax.to(torch.float32)


def quantize_weight(w2d: torch.Tensor):
    """16x16 nearest: (data, scale, data_t, scale_t, amax) of W and W^T, W^T by transposing W's codes."""
    data, scale, amax = quantize(w2d, WEIGHT)
    transposed = NVFP4Tensor(data=data, scale=scale, amax=amax, shape=w2d.shape, tile=WEIGHT.tile).t()
    return data, scale, transposed.data, transposed.scale, amax


def matmul(a: NVFP4Tensor, b: NVFP4Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b^T for a [M, K] and b [N, K], both quantized along K: the emulated NVFP4 GEMM.

    Codes times block scales are exact in fp32 (and in bf16), so the products inside the dot are exact;
    accumulation is fp32, and the two global decode scales are applied once at the end, one after the
    other (their product alone could underflow).
    """
    acc = a.scaled_codes() @ b.scaled_codes().t()
    return ((acc * a.global_decode_scale) * b.global_decode_scale).to(out_dtype)
