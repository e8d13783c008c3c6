"""The NVFP4 GEMM (all strategies) and the decode kernel against the torch reference.

Tolerance. Decoded operands are exact and so are their products, in every strategy and in the
reference; only the order of the fp32 additions differs. The test bound is the textbook one for two
different summation orders of the same K products, elementwise:
    |C - C_ref| <= 2 * K * 2**-24 * (|A| @ |B|^T) * g_a * g_b      (A, B: e2m1 * block scale)
plus, for bf16/fp16 outputs, one unit in the last place of the output type (two fp32 sums that differ
in their last bits can round to neighbouring bf16 values).
"""

from __future__ import annotations

import pytest
import torch

from ds_fp4 import kernels, nvfp4
from ds_fp4.hadamard import DEFAULT_SIGNS
from ds_fp4.kernels import gemm
from ds_fp4.kernels._launch import INTERPRET

from .conftest import DEVICE, adversarial, reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _q(x: torch.Tensor, **kw) -> nvfp4.NVFP4Tensor:
    q = reference(x, **kw)
    return nvfp4.NVFP4Tensor(q.data.to(DEVICE), q.scale.to(DEVICE), q.amax.to(DEVICE), q.shape, q.tile,
                             q.hadamard_signs)


def _cpu(t: nvfp4.NVFP4Tensor) -> nvfp4.NVFP4Tensor:
    return nvfp4.NVFP4Tensor(t.data.cpu(), t.scale.cpu(), t.amax.cpu(), t.shape, t.tile, t.hadamard_signs)


def assert_gemm_close(c: torch.Tensor, a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor, out_dtype) -> None:
    a, b = _cpu(a), _cpu(b)
    ref = nvfp4.matmul(a, b, torch.float32, backend="torch")
    assert c.dtype == out_dtype and c.shape == ref.shape
    k = a.cols
    mag = (a.scaled_codes().abs() @ b.scaled_codes().abs().t()) * a.global_decode_scale * b.global_decode_scale
    bound = 2 * k * 2.0**-24 * mag + ULP[out_dtype] * ref.abs() + 1e-30
    err = (c.cpu().float() - ref).abs()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(c.cpu().float()), torch.isnan(ref)), "NaN pattern differs"
    assert torch.all(err[finite] <= bound[finite]), f"max excess {(err - bound)[finite].max().item()}"


def _strategies():
    out = [("fused", True), ("fused", False), ("dequant", None)]
    if not INTERPRET and DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] >= 10:
        out.append(("native", None))
    return out


STRATEGIES = _strategies()
IDS = [f"{s}-fp8cvt" if f else f"{s}-intdecode" if f is False else s for s, f in STRATEGIES]


@pytest.mark.parametrize("strategy,fp8", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mnk", [(37, 45, 96), (64, 48, 256), (1, 17, 16), (70, 3, 112)])
def test_gemm_matches_reference(mnk, out_dtype, strategy, fp8):
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * n + k)
    a = _q(torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k))
    b = _q(torch.randn(n, k, generator=g) * 0.01)
    c = gemm.nvfp4_gemm(a.data, a.scale, a.amax, b.data, b.scale, b.amax, out_dtype, strategy=strategy,
                        fp8_convert=fp8)
    assert_gemm_close(c, a, b, out_dtype)


@pytest.mark.parametrize("strategy,fp8", STRATEGIES, ids=IDS)
def test_gemm_recipe_operands(strategy, fp8):
    """The three GEMMs of docs/design.md §3: 1x16 x 16x16, stochastic x 16x16^T, and the RHT pair for wgrad."""
    g = torch.Generator().manual_seed(9)
    x, w, dy = torch.randn(48, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(48, 32, generator=g)
    w_q = _q(w, tile=(16, 16))
    w_t = reference(w, tile=(16, 16)).t()
    w_t = nvfp4.NVFP4Tensor(w_t.data.to(DEVICE), w_t.scale.to(DEVICE), w_t.amax.to(DEVICE), w_t.shape, w_t.tile)
    pairs = [
        (_q(x), w_q),
        (_q(dy, rounding="stochastic", seed=3), w_t),
        (_q(dy.t(), rounding="stochastic", hadamard=True, seed=4), _q(x.t(), hadamard=True)),
    ]
    for a, b in pairs:
        c = gemm.nvfp4_gemm(a.data, a.scale, a.amax, b.data, b.scale, b.amax, torch.bfloat16,
                            strategy=strategy, fp8_convert=fp8)
        assert_gemm_close(c, a, b, torch.bfloat16)


@pytest.mark.parametrize("strategy,fp8", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("case", ["nan", "inf", "zeros", "scale_subnormal", "wide_range"])
def test_gemm_edge_cases(case, strategy, fp8):
    """NaN/Inf operands give an all-NaN product (g_dec is NaN); zero and tiny scales stay exact."""
    a = _q(adversarial(case, 24, 64))
    b = _q(torch.randn(20, 64, generator=torch.Generator().manual_seed(5)))
    c = gemm.nvfp4_gemm(a.data, a.scale, a.amax, b.data, b.scale, b.amax, torch.float32,
                        strategy=strategy, fp8_convert=fp8)
    if case in ("nan", "inf"):
        assert torch.isnan(c).all()
    assert_gemm_close(c, a, b, torch.float32)


def test_matmul_interface_and_nvfp4_dispatch():
    g = torch.Generator().manual_seed(6)
    a, b = _q(torch.randn(33, 48, generator=g)), _q(torch.randn(20, 48, generator=g))
    for strategy in ("auto", "fused", "dequant"):
        assert_gemm_close(kernels.matmul(a, b, out_dtype=torch.bfloat16, strategy=strategy), a, b, torch.bfloat16)
    assert_gemm_close(nvfp4.matmul(a, b, backend="triton"), a, b, torch.float32)
    # Hadamard operands must come in pairs: checked by nvfp4 before the kernel is reached.
    ah = _q(torch.randn(33, 48, generator=g), hadamard=True)
    with pytest.raises(ValueError, match="Hadamard"):
        nvfp4.matmul(ah, b, backend="triton")
    assert nvfp4.matmul(ah, _q(torch.randn(8, 48), hadamard=DEFAULT_SIGNS), backend="triton").shape == (33, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["random", "nan", "scale_subnormal", "huge"])
def test_dequantize_matches_reference(case, dtype):
    x = torch.randn(37, 80) if case == "random" else adversarial(case, 37, 80)
    q = _q(x)
    got = kernels.dequantize(q, dtype).cpu()
    ref = _cpu(q).dequantize(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    codes = kernels.dequantize(q, torch.float16, apply_global_scale=False).cpu()
    expected = _cpu(q).scaled_codes()
    assert torch.equal(codes.float().nan_to_num(), expected.nan_to_num())  # exact in fp16


def test_native_strategy_is_refused_in_the_interpreter():
    if not INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    a = _q(torch.randn(16, 32))
    with pytest.raises(ValueError, match="interpreter"):
        gemm.nvfp4_gemm(a.data, a.scale, a.amax, a.data, a.scale, a.amax, strategy="native")


@pytest.mark.skipif(DEVICE.type != "cuda" or INTERPRET, reason="requires CUDA")
def test_auto_strategy_on_this_gpu():
    cc = torch.cuda.get_device_capability()
    assert gemm.pick_strategy(DEVICE, 64, 64) == ("native" if cc[0] >= 10 else "fused")
    big = gemm.pick_strategy(DEVICE, 4096, 4096)
    assert big == "native" if cc[0] >= 10 else big in ("dequant", "fused")


@pytest.mark.skipif(not (DEVICE.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability()[0] >= 10),
                    reason="requires SM100+ (FP4 tensor cores for tl.dot_scaled)")
def test_native_dot_scaled_matches_reference_on_sm100():
    g = torch.Generator().manual_seed(7)
    for m, n, k in [(256, 256, 512), (100, 70, 272)]:
        a, b = _q(torch.randn(m, k, generator=g)), _q(torch.randn(n, k, generator=g), tile=(1, 16))
        c = gemm.nvfp4_gemm(a.data, a.scale, a.amax, b.data, b.scale, b.amax, torch.float32, strategy="native")
        assert_gemm_close(c, a, b, torch.float32)
