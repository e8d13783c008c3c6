"""16-element blocks held as tuples: the per-block machinery of the 1x16 kernels (and the RHT).

A block of 16 consecutive elements along K is held as a tuple of 16 tensors of shape [R], one per
position, so everything per block is elementwise: the RHT butterfly with its fixed order of fp32
additions, the block max, the 16 Philox words, the nibble packing. Each thread owns whole blocks and
nothing moves between threads. Written instead on [R, 16] tiles with reshapes and reductions, the
same arithmetic compiled for sm_90 to 2-3x more instructions (per-block work replicated over the
threads sharing a block, and layout conversions between butterfly stages).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import nvfp4_math as nm


@triton.jit
def _split2(x, R: tl.constexpr, N: tl.constexpr):
    """[R, N] -> (x[:, 0::2], x[:, 1::2]), each [R, N // 2]."""
    return tl.split(tl.reshape(x, [R, N // 2, 2]))


@triton.jit
def _col(x, R: tl.constexpr):
    return tl.reshape(x, [R])


@triton.jit
def split16(x, R: tl.constexpr):
    """[R, 16] -> tuple of its 16 columns, each [R], in index order."""
    e, o = _split2(x, R, 16)          # even / odd indices
    e0, e1 = _split2(e, R, 8)         # 0 4 8 12 | 2 6 10 14
    o0, o1 = _split2(o, R, 8)         # 1 5 9 13 | 3 7 11 15
    a, b = _split2(e0, R, 4)          # 0 8 | 4 12
    c, d = _split2(e1, R, 4)          # 2 10 | 6 14
    f, g = _split2(o0, R, 4)          # 1 9 | 5 13
    h, i = _split2(o1, R, 4)          # 3 11 | 7 15
    x0, x8 = _split2(a, R, 2)
    x4, x12 = _split2(b, R, 2)
    x2, x10 = _split2(c, R, 2)
    x6, x14 = _split2(d, R, 2)
    x1, x9 = _split2(f, R, 2)
    x5, x13 = _split2(g, R, 2)
    x3, x11 = _split2(h, R, 2)
    x7, x15 = _split2(i, R, 2)
    return (_col(x0, R), _col(x1, R), _col(x2, R), _col(x3, R), _col(x4, R), _col(x5, R), _col(x6, R),
            _col(x7, R), _col(x8, R), _col(x9, R), _col(x10, R), _col(x11, R), _col(x12, R), _col(x13, R),
            _col(x14, R), _col(x15, R))


@triton.jit
def join16(t, R: tl.constexpr):
    """Inverse of :func:`split16`: tuple of 16 [R] -> [R, 16]."""
    a = tl.join(tl.join(tl.join(t[0], t[8]), tl.join(t[4], t[12])), tl.join(tl.join(t[2], t[10]), tl.join(t[6], t[14])))
    b = tl.join(tl.join(tl.join(t[1], t[9]), tl.join(t[5], t[13])), tl.join(tl.join(t[3], t[11]), tl.join(t[7], t[15])))
    return tl.reshape(tl.join(a, b), [R, 16])


@triton.jit
def _bfly(t, I: tl.constexpr, H: tl.constexpr):
    """Output I of one butterfly stage: (a, b) = (t[i], t[i + H]) -> (a + b, a - b)."""
    if (I & H) == 0:
        return t[I] + t[I + H]
    else:
        return t[I - H] - t[I]


@triton.jit
def _stage(t, H: tl.constexpr):
    return (_bfly(t, 0, H), _bfly(t, 1, H), _bfly(t, 2, H), _bfly(t, 3, H), _bfly(t, 4, H), _bfly(t, 5, H),
            _bfly(t, 6, H), _bfly(t, 7, H), _bfly(t, 8, H), _bfly(t, 9, H), _bfly(t, 10, H), _bfly(t, 11, H),
            _bfly(t, 12, H), _bfly(t, 13, H), _bfly(t, 14, H), _bfly(t, 15, H))


@triton.jit
def _flip(t, I: tl.constexpr, SIGNS: tl.constexpr):
    if ((SIGNS >> I) & 1) == 1:
        return -t[I]
    else:
        return t[I]


@triton.jit
def rht_block(t, SIGNS: tl.constexpr):
    """ds_fp4.hadamard.rht on a 16-tuple of fp32: sign flips (compile time), stages h = 1, 2, 4, 8, * 0.25."""
    t = (_flip(t, 0, SIGNS), _flip(t, 1, SIGNS), _flip(t, 2, SIGNS), _flip(t, 3, SIGNS), _flip(t, 4, SIGNS),
         _flip(t, 5, SIGNS), _flip(t, 6, SIGNS), _flip(t, 7, SIGNS), _flip(t, 8, SIGNS), _flip(t, 9, SIGNS),
         _flip(t, 10, SIGNS), _flip(t, 11, SIGNS), _flip(t, 12, SIGNS), _flip(t, 13, SIGNS), _flip(t, 14, SIGNS),
         _flip(t, 15, SIGNS))
    t = _stage(t, 1)
    t = _stage(t, 2)
    t = _stage(t, 4)
    t = _stage(t, 8)
    return (t[0] * 0.25, t[1] * 0.25, t[2] * 0.25, t[3] * 0.25, t[4] * 0.25, t[5] * 0.25, t[6] * 0.25,
            t[7] * 0.25, t[8] * 0.25, t[9] * 0.25, t[10] * 0.25, t[11] * 0.25, t[12] * 0.25, t[13] * 0.25,
            t[14] * 0.25, t[15] * 0.25)


@triton.jit
def rht16(x, R: tl.constexpr, SIGNS: tl.constexpr):
    """The RHT on fp32 rows x [R, 16] (for tiles that are not held as tuples)."""
    return join16(rht_block(split16(x, R), SIGNS), R)


@triton.jit
def block_absmax(t):
    """max |t[i]| over a 16-tuple, as int32 bit patterns (see abs_bits)."""
    m = tl.maximum(nm.abs_bits(t[0]), nm.abs_bits(t[1]))
    for i in tl.static_range(2, 16):
        m = tl.maximum(m, nm.abs_bits(t[i]))
    return m


@triton.jit
def program_blocks(M, K, BM: tl.constexpr, G: tl.constexpr, ROW_CONTIG: tl.constexpr):
    """(rows, blocks, in-bounds mask), each [BM * G]: the BM rows x G blocks of 16 this program owns
    (``blocks[r]`` is the index of a block along K, its first element 16 * blocks[r]).

    The index r walks along K first when rows are contiguous (vector loads), along M first otherwise
    (then each of load_blocks' 16 loads coalesces along M).
    """
    r = tl.arange(0, BM * G)
    if ROW_CONTIG:
        rows = tl.program_id(0) * BM + r // G
        blocks = tl.program_id(1) * G + r % G
    else:
        rows = tl.program_id(0) * BM + r % BM
        blocks = tl.program_id(1) * G + r // BM
    return rows, blocks, (rows < M) & (blocks < K // 16)


@triton.jit
def _load_at(base, I: tl.constexpr, stride_xk, mask):
    """Element I of each block, fp32 [R]: one load, coalesced when consecutive r walk along M."""
    return nm.to_f32(tl.load(base + I * stride_xk, mask=mask, other=0.0))


@triton.jit
def load_blocks(x_ptr, rows, blocks, mask, stride_xm, stride_xk, R: tl.constexpr, ROW_CONTIG: tl.constexpr):
    """The 16 elements of each block (rows[r], 16 * blocks[r] + i) as a 16-tuple of fp32 [R].

    ROW_CONTIG (unit stride along K): one vector load of [R, 16], then split in registers. Otherwise
    (e.g. a transposed view) 16 loads, one per position.
    """
    base = x_ptr + rows.to(tl.int64) * stride_xm + (blocks * 16).to(tl.int64) * stride_xk
    if ROW_CONTIG:
        x = tl.load(base[:, None] + tl.arange(0, 16)[None, :], mask=mask[:, None], other=0.0)
        return split16(nm.to_f32(x), R)
    else:
        return (_load_at(base, 0, stride_xk, mask), _load_at(base, 1, stride_xk, mask),
                _load_at(base, 2, stride_xk, mask), _load_at(base, 3, stride_xk, mask),
                _load_at(base, 4, stride_xk, mask), _load_at(base, 5, stride_xk, mask),
                _load_at(base, 6, stride_xk, mask), _load_at(base, 7, stride_xk, mask),
                _load_at(base, 8, stride_xk, mask), _load_at(base, 9, stride_xk, mask),
                _load_at(base, 10, stride_xk, mask), _load_at(base, 11, stride_xk, mask),
                _load_at(base, 12, stride_xk, mask), _load_at(base, 13, stride_xk, mask),
                _load_at(base, 14, stride_xk, mask), _load_at(base, 15, stride_xk, mask))


@triton.jit
def block_uniforms(seed, rows, blocks, K):
    """Philox uniforms for the 16 elements of each block, as a 16-tuple of fp32 [R].

    Element (m, k) of the row-major [M, K] tensor has linear index n = m * K + k and uses word n % 4
    of tl.randint4x(seed, n // 4) (ds_fp4.rng); a block covers four whole Philox calls.
    """
    quad = rows.to(tl.int64) * (K // 4) + blocks.to(tl.int64) * 4
    a0, a1, a2, a3 = nm.philox4x32(seed, quad)
    b0, b1, b2, b3 = nm.philox4x32(seed, quad + 1)
    c0, c1, c2, c3 = nm.philox4x32(seed, quad + 2)
    d0, d1, d2, d3 = nm.philox4x32(seed, quad + 3)
    return (nm.word_to_uniform(a0), nm.word_to_uniform(a1), nm.word_to_uniform(a2), nm.word_to_uniform(a3),
            nm.word_to_uniform(b0), nm.word_to_uniform(b1), nm.word_to_uniform(b2), nm.word_to_uniform(b3),
            nm.word_to_uniform(c0), nm.word_to_uniform(c1), nm.word_to_uniform(c2), nm.word_to_uniform(c3),
            nm.word_to_uniform(d0), nm.word_to_uniform(d1), nm.word_to_uniform(d2), nm.word_to_uniform(d3))


@triton.jit
def encode_block(t, enc, rnd, STOCHASTIC: tl.constexpr):
    """Step 5 for a 16-tuple: the two int32 words holding its 16 packed nibbles (element 0 lowest).

    A block whose enc is NaN (its max is NaN) gets all-zero codes, as in the reference.
    """
    lo = tl.zeros(enc.shape, tl.int32)
    hi = tl.zeros(enc.shape, tl.int32)
    for i in tl.static_range(16):
        if STOCHASTIC:
            c = nm.e2m1_stochastic(t[i] * enc, rnd[i])
        else:
            c = nm.e2m1_nearest(t[i] * enc)
        if i < 8:
            lo = lo + (c << (4 * i))
        else:
            hi = hi + (c << (4 * (i - 8)))
    nan_block = enc != enc
    return tl.where(nan_block, 0, lo), tl.where(nan_block, 0, hi)
