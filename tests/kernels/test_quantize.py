"""Quantize kernels against the torch reference (ds_fp4.reference): bit for bit, nearest and stochastic."""

from __future__ import annotations

import pytest
import torch

from ds_fp4 import kernels, nvfp4, rng
from ds_fp4.hadamard import DEFAULT_SIGNS, rht
from ds_fp4.nvfp4 import QuantizeArgs

from .conftest import ADVERSARIAL, DEVICE, adversarial, assert_same_quantization, layout, reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TILES = [(1, 16), (16, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _signs(hadamard: bool):
    return DEFAULT_SIGNS if hadamard else None


def _check(x: torch.Tensor, tile, hadamard: bool, rounding: str = "nearest", seed: int | None = None):
    got = kernels.quantize(x.to(DEVICE), QuantizeArgs(tile, rounding, _signs(hadamard), seed))
    ref = reference(x, tile=tile, rounding=rounding, hadamard=hadamard, seed=seed)
    assert_same_quantization(got, ref)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("kind", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", TILES)
def test_nearest_random_bit_exact(tile, dtype, kind, hadamard):
    # 37 rows: not a multiple of 16 nor of any tile height; 80 columns: not a multiple of the tile width.
    m = 37 if tile == (1, 16) else 48
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(m, 80, generator=g) * torch.logspace(-2, 2, 80)).to(dtype)
    _check(layout(x, kind), tile, hadamard)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_nearest_adversarial_bit_exact(case, tile, hadamard):
    _check(adversarial(case), tile, hadamard)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["ties", "wide_range", "tiny", "nan", "inf"])
def test_nearest_adversarial_half_inputs(case, dtype):
    x = adversarial(case).to(dtype)
    for tile in TILES:
        _check(layout(x, "transposed"), tile, hadamard=False)
        _check(x, tile, hadamard=True)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, rng.MAX_SEED])
@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("tile", TILES)
def test_stochastic_bit_exact_for_a_seed(tile, hadamard, seed):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    _check(layout(x, "transposed"), tile, hadamard, "stochastic", seed)


@pytest.mark.parametrize("case", ["ties", "nan", "scale_subnormal", "wide_range"])
def test_stochastic_adversarial_bit_exact(case):
    _check(adversarial(case), (1, 16), hadamard=True, rounding="stochastic", seed=99)


def test_stochastic_deterministic_and_seed_dependent():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    first = kernels.quantize(x, QuantizeArgs(rounding="stochastic", seed=7))
    again = kernels.quantize(x, QuantizeArgs(rounding="stochastic", seed=7))
    other = kernels.quantize(x, QuantizeArgs(rounding="stochastic", seed=8))
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1].view(torch.uint8), other[1].view(torch.uint8))  # scales do not depend on it


@pytest.mark.parametrize("hadamard", [False, True])
def test_stochastic_is_unbiased(hadamard):
    """Mean over many copies of a fixed pattern: E[decode(q(x))] = x for stochastic, not for nearest.

    Each block is [4.5, 0.3 * j for j = 1..15] (most values strictly between two E2M1 values), 511
    rows x 4 seeds = 2044 samples per position. The bound is 5 standard errors of a Bernoulli
    rounding, sigma <= step / 2, with the E2M1 step of each element in input units.
    """
    block = torch.tensor([4.5] + [0.3 * j for j in range(1, 16)])
    x = block.repeat(512, 4)  # [512, 64]
    x[0, 0] = 2688.0  # g_enc = 1
    ref = reference(x, hadamard=hadamard)
    target = rht(x, DEFAULT_SIGNS) if hadamard else x
    enc = 1.0 / (ref.scale.float() * ref.global_decode_scale).repeat_interleave(16, dim=1)
    v = (target * enc).abs()
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0)) / enc
    decoded = []
    for seed in range(4):
        d, s, a = kernels.quantize(x.to(DEVICE), QuantizeArgs(rounding="stochastic", signs=_signs(hadamard), seed=seed))
        decoded.append(nvfp4.NVFP4Tensor(d, s, a, x.shape, (1, 16), _signs(hadamard)).dequantize().cpu())
    n = 4 * 511
    err = (torch.stack(decoded)[:, 1:].mean(dim=(0, 1)) - target[1:].mean(dim=0)).abs()  # row 0: amax
    bound = 5 * (0.5 * step[1:].amax(dim=0)) / n**0.5
    assert torch.all(err <= bound + 1e-6), (err - bound).max()
    nearest_err = (ref.dequantize()[1:].mean(dim=0) - target[1:].mean(dim=0)).abs()
    assert nearest_err.max() > 3 * bound.max()  # the check does tell a biased rounding apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["contiguous", "transposed"])
@pytest.mark.parametrize("case", ["random", "ties", "nan", "scale_subnormal", "zero_blocks"])
def test_quantize_weight_matches_reference_and_its_transpose(case, kind, dtype):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(4)) if case == "random" else adversarial(case)
    w = layout(w.to(dtype), kind)
    data, scale, data_t, scale_t, amax = kernels.quantize_weight(w.to(DEVICE))
    ref = reference(w, tile=(16, 16))
    assert_same_quantization((data, scale, amax), ref)
    assert_same_quantization((data_t, scale_t, amax), ref.t())


def test_nvfp4_api_dispatches_to_the_kernels():
    """nvfp4.quantize / quantize_weight with backend="triton": N-d input, NVFP4Tensor fields."""
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    q = nvfp4.quantize(x, rounding="stochastic", hadamard=True, seed=11, backend="triton")
    r = reference(x, rounding="stochastic", hadamard=True, seed=11)
    assert q.shape == x.shape and q.hadamard_signs == DEFAULT_SIGNS
    assert_same_quantization((q.data, q.scale, q.amax), r)
    w = torch.randn(32, 64).to(DEVICE)
    wq, wt = nvfp4.quantize_weight(w, backend="triton")
    rq, rt = nvfp4.quantize_weight(w.cpu(), backend="torch")
    assert_same_quantization((wq.data, wq.scale, wq.amax), rq)
    assert_same_quantization((wt.data, wt.scale, wt.amax), rt)
    assert wt.shape == (64, 32)


def test_empty_and_single_block_inputs():
    for x in (torch.zeros(0, 32), torch.randn(1, 16), torch.randn(16, 16), layout(torch.randn(48, 16), "transposed")):
        for tile in TILES:
            if tile == (16, 16) and x.shape[0] % 16:
                continue
            _check(x, tile, hadamard=False)
            _check(x, tile, hadamard=True)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("case", ["ties", "wide_range", "scale_subnormal", "nan"])
def test_scale_rounding_up_bit_exact(case, rounding, tile):
    """Block scales rounded up instead of to nearest (the communication path's variant, 1x16), and the
    same for 16x16 tiles, so that both backends accept the same arguments."""
    x = layout(adversarial(case), "transposed")
    seed = 5 if rounding == "stochastic" else None
    got = kernels.quantize(x.to(DEVICE), QuantizeArgs(tile, rounding, seed=seed, scale_rounding="up"))
    ref = reference(x, tile=tile, rounding=rounding, seed=seed, scale_rounding="up")
    assert_same_quantization(got, ref)
    nearest = reference(x, tile=tile, rounding=rounding, seed=seed)
    assert not torch.equal(ref.scale.view(torch.uint8), nearest.scale.view(torch.uint8))  # "up" is not a no-op


def test_scale_rounding_up_16x16_with_rht_bit_exact():
    x = adversarial("wide_range")
    got = kernels.quantize(x.to(DEVICE), QuantizeArgs((16, 16), "stochastic", DEFAULT_SIGNS, 8, "up"))
    assert_same_quantization(got, reference(x, tile=(16, 16), rounding="stochastic", hadamard=True, seed=8,
                                            scale_rounding="up"))
