"""The random Hadamard transform: orthogonal, the butterfly equals the matrix, and it cancels in Wgrad."""

import pytest
import torch

from ds_fp4 import hadamard, nvfp4


def test_sylvester_matrix_entries_and_orthogonality():
    h = hadamard.sylvester(16)
    i = torch.arange(16)
    popcount = torch.tensor([bin(int(a) & int(b)).count("1") for a in i for b in i]).view(16, 16)
    assert torch.equal(h, (-1.0) ** popcount)
    assert torch.equal(h @ h.t(), 16 * torch.eye(16))


@pytest.mark.parametrize("signs", [None, (1,) * 16, tuple((-1) ** k for k in range(16))])
def test_random_hadamard_matrix_is_orthogonal(signs):
    m = hadamard.hadamard_matrix(signs, dtype=torch.float64)
    torch.testing.assert_close(m @ m.t(), torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-15)


def test_signs_change_the_quantized_wgrad_operands_but_cancel_in_the_product():
    """The sign vector decides which codes the RHT-quantized wgrad operands get; H stays orthogonal for
    any signs, so the unquantized dY^T X through the transform does not depend on them."""
    # Transformer Engine's wgrad sign vector: the same RHT gives the same codes, so tensors interoperate.
    assert hadamard.DEFAULT_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    other = tuple(-s if i % 3 == 0 else s for i, s in enumerate(hadamard.DEFAULT_SIGNS))
    g = torch.Generator().manual_seed(0)
    tokens, n, k = 64, 32, 48
    dy = torch.randn(tokens, n, generator=g)
    x = torch.randn(tokens, k, generator=g)
    plain = dy.double().t() @ x.double()
    operands = {}
    for signs in (hadamard.DEFAULT_SIGNS, other):
        dyq_t = nvfp4.quantize(dy.t(), rounding="stochastic", hadamard=signs, seed=3)  # as NVFP4Linear's wgrad
        xq_t = nvfp4.quantize(x.t(), hadamard=signs)
        operands[signs] = (dyq_t, xq_t)
        through = hadamard.rht(dy.t(), signs).double() @ hadamard.rht(x.t(), signs).double().t()
        torch.testing.assert_close(through, plain, rtol=1e-5, atol=1e-5)
        assert dyq_t.hadamard_signs == signs and xq_t.hadamard_signs == signs
    for a, b in zip(operands[hadamard.DEFAULT_SIGNS], operands[other], strict=True):
        assert not torch.equal(a.data, b.data), "other signs must give other codes"
    for dyq_t, xq_t in operands.values():  # either way the quantized wgrad estimates dY^T X (15.5 and 16 dB here)
        dw = nvfp4.matmul(dyq_t, xq_t).double()
        assert 10 * torch.log10(plain.pow(2).sum() / (dw - plain).pow(2).sum()) > 13


def test_butterfly_equals_matrix_product_and_inverts():
    x = torch.randn(8, 3, 64, dtype=torch.float32)
    m = hadamard.hadamard_matrix(dtype=torch.float64)
    ref = (x.double().reshape(-1, 16) @ m).reshape(x.shape)
    y = hadamard.rht(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hadamard.inverse_rht(y), x, rtol=1e-5, atol=1e-6)


def test_rht_spreads_an_outlier_over_its_group():
    x = torch.zeros(1, 16)
    x[0, 3] = 8.0
    y = hadamard.rht(x)
    assert torch.equal(y.abs(), torch.full((1, 16), 2.0))  # 8 / 4 in every position, signs mixed


def test_wgrad_with_rht_equals_plain_wgrad_without_quantization():
    """H is orthogonal and applied to both operands along the token dim, so dY^T X is unchanged."""
    tokens, n, k = 64, 32, 48
    dy = torch.randn(tokens, n, dtype=torch.float64)
    x = torch.randn(tokens, k, dtype=torch.float64)
    plain = dy.t() @ x
    transformed = hadamard.rht(dy.t()).double() @ hadamard.rht(x.t()).double().t()
    torch.testing.assert_close(transformed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [[1] * 15, [1] * 15 + [0], [2] + [1] * 15])
def test_bad_signs_raise(bad):
    with pytest.raises(ValueError, match="16 values, each"):
        hadamard.validate_signs(bad)


def test_rht_rejects_bad_last_dim():
    with pytest.raises(ValueError, match=r"\(4, 24\)"):
        hadamard.rht(torch.randn(4, 24))
