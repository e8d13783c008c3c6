"""Device functions shared by the NVFP4 kernels: the arithmetic of docs/design.md §2 and the Philox stream.

No kernel lives here; each kernel file imports these ``@triton.jit`` helpers. They reproduce
:func:`ds_fp4.reference.quantize` bit for bit, on the GPU and in the interpreter, which
dictates how they are written:

* Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest). A plain ``/`` on fp32 lowers to the
  approximate ``div.full.f32`` on NVIDIA GPUs.
* ``min``/``max``/``clamp`` of possibly-NaN values are written as comparisons + ``tl.where``, whose NaN
  behaviour is defined (``tl.minimum`` does not promise to propagate NaN): NaN must flow exactly as
  in torch. The one exception is the element clamp in step 5, where v is NaN only inside a block
  whose scale is NaN, and those blocks are handled as a whole.
* Maxima of |x| are taken on the fp32 bit patterns as int32: for non-negative floats the integer order
  is the float order, and a NaN pattern sorts above +inf, so a NaN anywhere wins the reduction on
  every backend (float max instructions drop NaN).
* fp32 -> E4M3 and fp32 -> E2M1 rounding (RNE, subnormals and ties included) are bit manipulations
  and exact magic-number additions, not chains of threshold compares (half the instructions), and
  they do not depend on fp8 conversion instructions (sm_80 has none) nor on how the interpreter
  converts. The interpreter also gets bf16 <-> fp32 wrong (bf16 subnormals, truncating downcast), so
  those conversions are done on the bits too (to_f32, cast_out); on the GPU they cost the same.
* The only multiply-adds are ``tl.fma`` calls whose product is exact; the launchers pass
  ``enable_fp_fusion=False`` so that the compiler contracts nothing else.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)
INF = tl.constexpr(float("inf"))
# NaN is built from its bit pattern: a NaN constexpr global fails Triton's check that globals keep
# their value across kernels (NaN != NaN).
QNAN_BITS = tl.constexpr(0x7FC00000)
# fp32(1) / fp32(6) rounded to fp32, held exactly in a Python float (step 2: a reciprocal, then a multiply).
ONE_SIXTH = tl.constexpr(struct.unpack("f", struct.pack("f", 1.0 / 6.0))[0])
# Triton's tl.rand scale: int32 word -> [0, 1) (see ds_fp4.rng.words_to_uniform).
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)


def signs_mask(signs) -> int:
    """The RHT sign vector as a 16-bit constexpr: bit i set <=> sign i is -1."""
    return sum(1 << i for i, s in enumerate(signs) if s < 0)


@triton.jit
def _nan_like(x):
    return tl.full(x.shape, QNAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def to_f32(x):
    """Exact widening to fp32. bf16 goes through its bits (what the GPU does anyway): the interpreter's
    bf16 -> fp32 conversion mishandles bf16 subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """fp32 -> output dtype with round-to-nearest-even. bf16 is rounded on the bits: the interpreter's
    fp32 -> bf16 conversion truncates (the GPU's rounds to nearest even, as this does)."""
    if dtype == tl.bfloat16:
        u = x.to(tl.int32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def abs_bits(x):
    """|x| as int32 bit patterns (order-preserving for non-negative floats, NaN above inf)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def global_scales(amax):
    """Step 1: (g_enc, g_dec) from the fp32 tensor amax; g_enc = 1 when 2688 / amax is 0 or NaN."""
    q = tl.math.div_rn(tl.full(amax.shape, 2688.0, tl.float32), amax)
    g_enc = tl.where(q > FLT_MAX, FLT_MAX, q)
    g_enc = tl.where((g_enc == 0.0) | (g_enc != g_enc), 1.0, g_enc)
    g_dec = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), g_enc)
    return g_enc, g_dec


@triton.jit
def decode_scale(amax):
    """g_dec for decoding: NaN when amax is not finite, so that the whole tensor decodes to NaN."""
    _, g_dec = global_scales(amax)
    finite = (amax == amax) & (amax < INF) & (amax > -INF)
    return tl.where(finite, g_dec, _nan_like(g_dec))


@triton.jit
def e4m3_round(s):
    """fp32 s in [0, 448] or NaN -> (E4M3 code as int32, its exact fp32 value), RNE incl. subnormals.

    Normal range (s >= 2**-6): round the fp32 mantissa to 3 bits (+0x7FFFF plus the kept bit), which
    also gives the fp32 value of the result; the code is that value's bits rebiased (127 -> 7).
    Subnormal range: the code is rne(s * 2**9) < 8 (one exact product), read from the low bits of
    s * 2**9 + 1.5 * 2**23; code 8 is the smallest normal, so the two ranges meet without a seam.
    NaN gives code 0x7F and a NaN value.
    """
    u = s.to(tl.int32, bitcast=True)
    r = (u + 0x7FFFF + ((u >> 20) & 1)) & 0x7FF00000
    sub = tl.fma(s, 512.0, 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # s * 512 is exact
    normal = s >= 0.015625
    code = tl.where(normal, (r >> 20) - (120 << 3), sub)
    value = tl.where(normal, r.to(tl.float32, bitcast=True), sub.to(tl.float32) * 0.001953125)
    nan = s != s
    return tl.where(nan, 0x7F, code), tl.where(nan, s, value)


@triton.jit
def e4m3_to_f32(code):
    """E4M3 (e4m3fn) code (int32, low 8 bits) -> fp32, exact; 0x7F / 0xFF decode to NaN."""
    exp = (code >> 3) & 0xF
    man = code & 0x7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    val = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    val = tl.where((code & 0x7F) == 0x7F, _nan_like(val), val)
    return tl.where((code & 0x80) != 0, -val, val)


@triton.jit
def block_encode_scale(bmax, g_enc, g_dec, SCALE_UP: tl.constexpr = False):
    """Steps 3-4 for block maxima ``bmax``: (E4M3 code as int32, fp32 encode multiplier ``enc``).

    SCALE_UP: round the scale up instead of to nearest (ds_fp4.reference.quantize's scale_rounding="up").
    """
    s = bmax * (g_enc * ONE_SIXTH)
    s = tl.where(s > 448.0, 448.0, s)  # also maps inf; s >= 0 or NaN, so no lower clamp is needed
    code, value = e4m3_round(s)
    if SCALE_UP:
        below = value < s  # RNE went down: take the next code (codes are monotonic for s >= 0)
        code = tl.where(below, code + 1, code)
        value = tl.where(below, e4m3_to_f32(code), value)
    enc = tl.math.div_rn(tl.full(bmax.shape, 1.0, tl.float32), value * g_dec)
    enc = tl.where(enc > FLT_MAX, FLT_MAX, enc)
    return code, enc


@triton.jit
def e2m1_nearest(v):
    """Step 5, nearest with ties to the even code: fp32 v = x * enc -> int32 code 0..15 (bit 3 = sign).

    E2M1 is a float with one mantissa bit, so this is RNE to that format, done on the bits instead of
    with seven threshold compares. For a = min(|v|, 6) >= 1 the fp32 mantissa is rounded to one bit
    (+0x1FFFFF plus the kept bit, then shift) and the exponent rebiased; below 1 the step is 0.5, and
    rne(2a) is read from the low bits of 2a + 1.5 * 2**23. Both are exact, so the code equals the
    reference's threshold count, ties included. NaN v (only inside a block whose enc is NaN) gives
    garbage here; callers zero those blocks, as the reference's compares with NaN are all false.
    """
    a = tl.minimum(tl.abs(v), 6.0)
    u = a.to(tl.int32, bitcast=True)
    normal = ((u + 0x1FFFFF + ((u >> 22) & 1)) >> 22) - 252
    sub = tl.fma(a, 2.0, 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # 2a is exact
    return tl.where(a < 1.0, sub, normal) | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def e2m1_stochastic(v, rnd):
    """Step 5, stochastic: |v| rounds up from lo to the next E2M1 value iff rnd < (|v| - lo) / step.

    Computed on the bits, exactly: for a >= 1, lo truncates the fp32 mantissa to one bit and the
    fraction is the 22 dropped mantissa bits (rebuilt as the float 1.m - 1); below 1, lo and the
    fraction come from 2a. At a = 6 the fraction is 0, so 6 never rounds up. NaN v: see e2m1_nearest.
    """
    a = tl.minimum(tl.abs(v), 6.0)
    u = a.to(tl.int32, bitcast=True)
    lo_n = (u >> 22) - 252
    frac_n = (0x3F800000 | ((u & 0x3FFFFF) << 1)).to(tl.float32, bitcast=True) - 1.0
    t = a * 2.0
    sub_up = t >= 1.0
    lo_s = sub_up.to(tl.int32)
    frac_s = tl.where(sub_up, t - 1.0, t)
    small = a < 1.0
    lo = tl.where(small, lo_s, lo_n)
    frac = tl.where(small, frac_s, frac_n)
    return (lo + (rnd < frac).to(tl.int32)) | ((v < 0.0).to(tl.int32) << 3)


@triton.jit
def pack_pairs(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 codes [ROWS, COLS] -> uint8 [ROWS, COLS // 2]; element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, [ROWS, COLS // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def philox4x32(seed, counter):
    """tl.randint4x(seed, counter) for an int64 counter, with one 32x32 -> 64-bit multiply per product.

    Same rounds, constants and key schedule as triton.language.random (Philox4x32-10), hence the
    same words; tl.randint4x computes each product's high and low halves with two multiplies.
    """
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros(c0.shape, tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    for _ in tl.static_range(10):
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        pa = c0.to(tl.uint64) * 0xD2511F53
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def word_to_uniform(w):
    w = w.to(tl.int32, bitcast=True)
    w = tl.where(w < 0, ~w, w)
    return w.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def philox_uniforms(seed, rows, col0, K, BM: tl.constexpr, BK: tl.constexpr):
    """Uniforms [BM, BK] for the elements (rows[i], col0 + j) of a row-major [*, K] tensor.

    Element with linear index n uses word n % 4 of ``tl.randint4x(seed, n // 4)`` (ds_fp4.rng); col0
    and K are multiples of 4, so each aligned group of four columns shares one Philox call.
    """
    quad = rows.to(tl.int64)[:, None] * (K // 4) + (col0 // 4 + tl.arange(0, BK // 4))[None, :]
    w0, w1, w2, w3 = philox4x32(seed, quad)
    u02 = tl.join(word_to_uniform(w0), word_to_uniform(w2))
    u13 = tl.join(word_to_uniform(w1), word_to_uniform(w3))
    return tl.reshape(tl.join(u02, u13), [BM, BK])
