"""Shared setup for the kernel tests: the device they run on, data generators, exact comparisons.

The same tests run the compiled kernels on a CUDA machine and Triton's interpreter on CPU (the root
conftest switches TRITON_INTERPRET on when there is no GPU). Shapes are small: the interpreter
executes every program in numpy.
"""

from __future__ import annotations

import math

import pytest
import torch

from ds_fp4 import kernels, nvfp4

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OK, REASON = kernels.available(DEVICE)

# numpy warns about the inf/NaN arithmetic the NVFP4 spec relies on (1/0, inf - inf) in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def pytest_collection_modifyitems(config, items):
    if OK:
        return
    skip = pytest.mark.skip(reason=f"Triton kernels unavailable on {DEVICE}: {REASON}")
    for item in items:
        if "tests/kernels" in str(item.fspath).replace("\\", "/") and "test_compile" not in str(item.fspath):
            item.add_marker(skip)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``x`` [M, K], either contiguous or as the transposed view of a [K, M] buffer."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "transposed":
        return x.t().contiguous().t()
    raise ValueError(kind)


def ties_block() -> list[float]:
    """16 values that, with g_enc = 1 and a block max of 6, land exactly on every E2M1 rounding tie."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    return [6.0] + ties + [-t for t in ties] + [-6.0]


def adversarial(case: str, m: int = 32, k: int = 64, seed: int = 0) -> torch.Tensor:
    """fp32 [m, k] test data for one named edge case of docs/design.md §2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    f32 = torch.finfo(torch.float32)
    if case == "zeros":
        return torch.zeros(m, k)
    if case == "all_equal":
        return torch.full((m, k), 3.7)
    if case == "huge":
        x = x.sign() * f32.max * torch.rand(m, k, generator=g).clamp(min=0.5)
        x[0, 0] = f32.max
        return x
    if case == "tiny":  # fp32 subnormals, down to the smallest one
        x = x * 1e-40
        x[0, :4] = torch.tensor([f32.smallest_normal, 1e-45, -1e-45, 0.0])
        return x
    if case == "wide_range":  # 60 decades, also inside each block
        return x * torch.pow(10.0, torch.empty(m, k).uniform_(-30, 30, generator=g))
    if case == "scale_subnormal":  # block maxima far below amax: E4M3 subnormal and zero block scales
        x[:, 16:32] *= 1e-5
        x[:, 32:48] *= 3e-8
        x[:, 48:64] *= 1e-12
        x[0, 0] = 100.0
        return x
    if case == "ties":
        x = torch.zeros(m, k)
        x[:, :16] = torch.tensor(ties_block())
        x[:, 16:32] = torch.tensor(ties_block()).flip(0)
        base = torch.tensor(ties_block(), dtype=torch.float32).view(torch.int32)
        x[:, 32:48] = (base + 1).view(torch.float32)  # one ulp away from each tie
        x[:, 48:64] = (base - 1).view(torch.float32)
        x[:, 32] = x[:, 48] = 6.0
        x[0, 1] = 2688.0  # amax = 448 * 6 -> g_enc = 1, so those blocks see exactly these values
        return x
    if case == "zero_blocks":
        x[:, 16:32] = 0.0
        x[1::2, :] = 0.0
        x[2, 40] = -1.0  # a block with a single nonzero
        return x
    if case == "nan":
        x[3, 5] = float("nan")
        return x
    if case == "inf":
        x[7, 20] = float("inf")
        return x
    if case == "neg_inf":
        x[7, 20] = -float("inf")
        x[0, 0] = float("inf")
        return x
    raise ValueError(case)


ADVERSARIAL = ("zeros", "all_equal", "huge", "tiny", "wide_range", "scale_subnormal", "ties", "zero_blocks",
               "nan", "inf", "neg_inf")


def reference(x: torch.Tensor, **kwargs) -> nvfp4.NVFP4Tensor:
    """The torch reference quantization of ``x`` on the CPU: nvfp4.quantize(..., backend="torch")."""
    return nvfp4.quantize(x.cpu(), backend="torch", **kwargs)


def assert_same_quantization(got, ref: nvfp4.NVFP4Tensor) -> None:
    """Bit-exact codes, scale bit patterns and amax (NaN matches NaN), NaN blocks included: a block
    whose max is NaN gets code 0 and the positive-NaN scale 0x7F in both the kernels and the reference."""
    data, scale, amax = got
    assert data.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn and amax.dtype == torch.float32
    assert data.shape == ref.data.shape and scale.shape == ref.scale.shape and amax.shape == ()
    data, scale = data.cpu(), scale.cpu()
    sbits, rbits = scale.view(torch.uint8), ref.scale.view(torch.uint8)
    bad = sbits != rbits
    assert not bad.any(), f"{bad.sum().item()} scales differ, first at {bad.nonzero()[0].tolist()}"
    bad = data != ref.data
    assert not bad.any(), f"{bad.sum().item()} code bytes differ, first at {bad.nonzero()[0].tolist()}"
    a, r = amax.item(), ref.amax.item()
    assert (math.isnan(a) and math.isnan(r)) or a == r, f"amax {a} != reference {r}"
