"""The torch reference against the spec: tables, ties, packing, hand-computed vectors, bit-exactness
against an independent numpy implementation, error bounds, non-finite input, and argument errors."""

import math
import re
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_fp4 import e2m1, nvfp4, reference
from ds_fp4.nvfp4 import NVFP4Tensor, quantize

from .spec import e2m1_nearest as spec_e2m1_nearest
from .spec import quantize_dequantize as spec_qdq


def test_e2m1_table_and_sign_bit():
    codes = torch.arange(16, dtype=torch.uint8)
    values = nvfp4.decode_e2m1(codes)
    assert values[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values[8:].tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    # Encoding every representable value gives its own code back (the sign of zero is free).
    assert torch.equal(nvfp4.encode_nearest(values[1:8]), codes[1:8])
    assert torch.equal(nvfp4.encode_nearest(values[9:]), codes[9:])


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties: even code
        (0.2500001, 0.5), (0.7499999, 0.5), (1.2500001, 1.5), (1.7499999, 1.5),
        (2.5000002, 3.0), (3.4999998, 3.0), (5.0000005, 6.0), (6.0, 6.0),
        (-0.75, -1.0), (-2.5, -2.0), (-3.5, -4.0), (-5.0, -4.0),
    ],
)
def test_e2m1_round_to_nearest_ties_to_even(value, expected):
    code = nvfp4.encode_nearest(torch.tensor([value], dtype=torch.float32))
    assert nvfp4.decode_e2m1(code).item() == expected


def test_lookup_tables_follow_the_spec_table_on_every_quarter_and_between():
    """Rounding by table (index floor(4|v|)) equals the spec's threshold table for every multiple of 1/4 in
    [0, 6], one fp32 ulp on either side of it, and the midpoints; decoding uses the same values table."""
    quarters = torch.arange(25, dtype=torch.float32) / 4
    ulp = torch.finfo(torch.float32).eps * quarters.clamp(min=2.0**-126)
    a = torch.cat([quarters, quarters + ulp, (quarters - ulp).clamp(min=0), quarters + 0.125]).clamp(max=6)
    v = torch.cat([a, -a])
    np.testing.assert_array_equal(nvfp4.decode_e2m1(nvfp4.encode_nearest(v)).numpy(),
                                  spec_e2m1_nearest(v.numpy()))
    t = e2m1.tables(torch.device("cpu"))
    assert t is e2m1.tables(torch.device("cpu")), "one cached set of tables per device"
    assert t.pairs.shape == (256, 2) and torch.equal(t.pairs[0x4F], torch.tensor([-6.0, 2.0]))


def test_packing_puts_the_even_element_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = nvfp4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(nvfp4.unpack_nibbles(packed), codes)


def test_hand_computed_1x16_block():
    # amax = 6 -> g_enc = 2688/6 = 448, g_dec = 1/448, mult = 448 * fp32(1/6).
    # Block 0 max 6 -> s = e4m3(6 * 448/6) = 448 -> enc = 1 / (448/448) = 1: codes are x itself.
    # Block 1 max 3 -> s = e4m3(3 * 448 * fp32(1/6)) = e4m3(224.00001) = 224 -> enc = 2: values 2x.
    x = torch.tensor(
        [[6, -4, 3, 2, 1.5, 1, 0.5, 0, -6, 0.25, 0.75, 5, 1.75, 2.5, 3.5, -0.5]
         + [3, 1.5, -0.75, 0.3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
        dtype=torch.float32,
    )
    q = quantize(x)
    assert q.amax.item() == 6.0
    assert q.scale.to(torch.float32).tolist() == [[448.0, 224.0]]
    codes0 = [6, -4, 3, 2, 1.5, 1, 0.5, 0, -6, 0, 1, 4, 2, 2, 4, -0.5]  # ties to the even code
    codes1 = [6, 3, -1.5, 0.5] + [0] * 12  # block 1 encodes 2x: 6, 3, -1.5, 0.6 -> 0.5
    # Decoding is (code * s) * g_dec with g_dec = fp32(1/448), which is not exactly 1/448.
    g_dec = torch.tensor(1.0) / torch.tensor(448.0)
    expected = torch.cat([torch.tensor(codes0) * 448.0 * g_dec, torch.tensor(codes1) * 224.0 * g_dec])
    assert torch.equal(q.dequantize()[0], expected)
    assert q.dequantize()[0, :4].tolist() == pytest.approx([6, -4, 3, 2], rel=1e-6)
    assert q.data.shape == (1, 16) and q.data.dtype == torch.uint8
    assert q.scale.shape == (1, 2) and q.scale.dtype == torch.float8_e4m3fn


def test_hand_computed_16x16_tile_shares_one_scale():
    x = torch.zeros(16, 32)
    x[3, 5] = 12.0  # tile (0, 0) max; the rest of tile (0, 0) is small
    x[0, 0] = 1.0
    x[7, 20] = 3.0  # tile (0, 1)
    q = quantize(x, tile=(16, 16))
    s = q.scale.to(torch.float32)
    assert torch.all(s[:, 0] == s[0, 0]) and torch.all(s[:, 1] == s[0, 1])
    # amax 12 -> g_enc = 224; tile 0: s = e4m3(12 * 224/6) = 448, tile 1: s = e4m3(3 * 224/6) = 112.
    assert s[0].tolist() == [448.0, 112.0]
    d = q.dequantize()
    g_dec = torch.tensor(1.0) / torch.tensor(224.0)  # fp32(1/224): decoding is (code * s) * g_dec
    assert d[3, 5] == 6 * 448 * g_dec and d[0, 0] == 0.5 * 448 * g_dec and d[7, 20] == 6 * 112 * g_dec
    assert d[3, 5].item() == pytest.approx(12.0, rel=1e-6)


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ["normal", "wide", "tiny", "huge", "zeros", "outlier"])
def test_bit_exact_against_independent_spec_implementation(tile, dtype, dist):
    g = torch.Generator().manual_seed(zlib.crc32(f"{tile}{dist}".encode()))  # hash() of a str varies per process
    shape = (48, 64)
    if dist == "normal":
        x = torch.randn(shape, generator=g)
    elif dist == "wide":  # 20 decades within each block
        x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-23, 23, generator=g))
    elif dist == "tiny":
        x = torch.randn(shape, generator=g) * 1e-38  # fp32 subnormals
    elif dist == "huge":
        x = torch.randn(shape, generator=g) * 1e37
    elif dist == "zeros":
        x = torch.zeros(shape)
    else:
        x = torch.randn(shape, generator=g) * 1e-3
        x[5, 7] = 1e4
    x = x.to(dtype)
    q = quantize(x, tile=tile)
    amax, s, dec = spec_qdq(x.float().numpy(), tile)
    assert q.amax.item() == float(amax) or (amax == 0 and q.amax.item() == 0)
    np.testing.assert_array_equal(q.scale.to(torch.float32).numpy(), s)
    np.testing.assert_array_equal(q.dequantize().numpy(), dec)


def _decoded_block_scale(q: NVFP4Tensor) -> torch.Tensor:
    return q.scale.to(torch.float32) * q.global_decode_scale


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4).map(lambda r: 16 * r),
    blocks=st.integers(1, 4),
    log_scale=st.floats(-30, 30),
    spread=st.floats(0, 12),
    seed=st.integers(0, 2**31 - 1),
    tile=st.sampled_from([(1, 16), (16, 16)]),
)
def test_blockwise_error_is_bounded_by_the_spec(rows, blocks, log_scale, spread, seed, tile):
    """Per element |x - q| <= max(S, b - 6 S) with S the block's decoded scale and b its max |x|:
    half the widest E2M1 gap (1) in units of S, or the clamp at 6. With an E4M3-normal scale, S is
    within 2^-4 of b/6, so the error is also <= (b/6)(1 + 2^-4)."""
    g = torch.Generator().manual_seed(seed)
    k = 16 * blocks
    x = torch.randn(rows, k, generator=g) * math.exp(log_scale)
    x = x * torch.exp(torch.empty(rows, k).uniform_(-spread, spread, generator=g))
    q = quantize(x, tile=tile)
    err = (x - q.dequantize()).abs().view(rows, k // 16, 16)
    S = _decoded_block_scale(q).unsqueeze(-1)
    b = reference.block_amax(x.abs(), tile).unsqueeze(-1)
    slack = 1 + 1e-5
    assert torch.all(err <= torch.maximum(S, b - 6 * S) * slack)
    normal = (q.scale.to(torch.float32) >= 2.0**-6).unsqueeze(-1).expand_as(err)
    assert torch.all(err[normal] <= ((b / 6) * (1 + 2.0**-4) * slack).expand_as(err)[normal])


@pytest.mark.parametrize("shape", [(32, 48), (16, 16, 32)])
def test_16x16_weight_and_transpose_decode_identically(shape):
    w = torch.randn(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1])
    q = quantize(w, tile=(16, 16))
    q_of_t = quantize(w.t().contiguous(), tile=(16, 16))
    assert torch.equal(q.dequantize().t(), q_of_t.dequantize())
    qt = q.t()
    assert torch.equal(qt.dequantize(), q_of_t.dequantize())
    assert torch.equal(qt.data, q_of_t.data) and torch.equal(qt.scale.view(torch.uint8), q_of_t.scale.view(torch.uint8))
    wq, wq_t = nvfp4.quantize_weight(w)
    assert torch.equal(wq_t.dequantize(), q_of_t.dequantize())


def test_1x16_weight_does_not_commute_with_transpose():
    """Why the paper uses 16x16 weight tiles: with 1x16 blocks, W and W^T quantize differently."""
    w = torch.randn(64, 64) * torch.exp(torch.randn(64, 64))
    a = quantize(w).dequantize().t()
    b = quantize(w.t().contiguous()).dequantize()
    assert not torch.equal(a, b)


def test_leading_dims_are_flattened_and_restored():
    x = torch.randn(2, 3, 5, 32)
    q = quantize(x)
    assert q.data.shape == (30, 16) and q.scale.shape == (30, 2)
    assert q.dequantize().shape == x.shape
    assert torch.equal(q.dequantize(), quantize(x.reshape(30, 32)).dequantize().reshape(x.shape))


@pytest.mark.parametrize(
    "shape, tile", [((4, 24), (1, 16)), ((7,), (1, 16)), ((24, 32), (16, 16)), ((2, 3, 32), (16, 16))]
)
def test_shapes_not_divisible_by_16_raise_naming_the_shape(shape, tile):
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        quantize(torch.randn(shape), tile=tile)


def test_zero_rows_quantize_but_a_zero_last_dim_raises_naming_the_shape():
    assert quantize(torch.empty(0, 16)).dequantize().shape == (0, 16)
    for shape in [(0,), (4, 0)]:
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            quantize(torch.empty(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile=(2, 16)), "tile must be one of"),
        (dict(tile="8x8"), "tile must be one of"),
        (dict(rounding="up"), "rounding must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(hadamard=[1, -1, 1]), "16 values"),
        (dict(scale_rounding="down"), "scale_rounding must be one of"),
        (dict(rounding="stochastic", seed=-1), r"seed must be an integer in \[0, 2\*\*63 - 1\].*got seed=-1"),
        (dict(rounding="stochastic", seed=2**63), "got seed=9223372036854775808"),
        (dict(rounding="stochastic", seed=1.5), "got seed=1.5"),
        (dict(seed="7"), "got seed='7'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(16, 32), **kwargs)


def test_seed_accepts_integer_types_and_the_full_range():
    x = torch.randn(16, 32)
    q = quantize(x, rounding="stochastic", seed=np.int64(9))
    assert torch.equal(q.data, quantize(x, rounding="stochastic", seed=9).data)
    quantize(x, rounding="stochastic", seed=2**63 - 1)
    quantize(x, rounding="stochastic", seed=0)


@pytest.mark.parametrize("bad", [torch.randn(32), torch.randn(2, 16, 32), [[1.0] * 16] * 16])
def test_quantize_weight_needs_a_2d_tensor(bad):
    with pytest.raises(ValueError, match="2D weight tensor"):
        nvfp4.quantize_weight(bad)


def test_bad_dtype_raises():
    with pytest.raises(ValueError, match="int64"):
        quantize(torch.ones(16, 32, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_finite_input_decodes_to_non_finite(bad, tile, rounding):
    x = torch.randn(32, 32)
    x[17, 3] = bad
    d = quantize(x, tile=tile, rounding=rounding, seed=1).dequantize()
    assert not torch.isfinite(d).any(), "a non-finite input must poison the whole decoded tensor"


def test_gemm_reference_matches_dequantize_then_matmul():
    a = quantize(torch.randn(40, 64))
    b = quantize(torch.randn(32, 64), tile=(16, 16))
    out = nvfp4.matmul(a, b)
    ref = a.dequantize().double() @ b.dequantize().double().t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert nvfp4.matmul(a, b, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_gemm_rejects_mismatched_operands():
    with pytest.raises(ValueError, match="matching K"):
        nvfp4.matmul(quantize(torch.randn(16, 32)), quantize(torch.randn(16, 48)))
    with pytest.raises(ValueError, match="Hadamard"):
        nvfp4.matmul(quantize(torch.randn(16, 32), hadamard=True), quantize(torch.randn(16, 32)))
    a = quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match="out_dtype must be one of .*got torch.float64"):
        nvfp4.matmul(a, a, out_dtype=torch.float64)
    with pytest.raises(TypeError, match="operand b must be an NVFP4Tensor .*got Tensor"):
        nvfp4.matmul(a, torch.randn(16, 32))


def test_nbytes_is_4_5_bits_per_element_plus_amax():
    q = quantize(torch.randn(64, 256))
    assert q.nbytes == 64 * 256 // 2 + 64 * 256 // 16 + 4
