"""The torch and Triton backends accept and refuse exactly the same arguments (docs/design.md §7.18).

ds_fp4.nvfp4 validates every argument once, before it picks a backend. These tests hold it to that over
grids of argument combinations: each combination must either fail on both backends with the same
exception and message, or succeed on both with the same bits (quantization) or the same shape, dtype and
values up to fp32 summation order (GEMM).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from ds_fp4 import nvfp4, rng
from ds_fp4.hadamard import DEFAULT_SIGNS

from .conftest import DEVICE, assert_same_quantization

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _outcome(fn):
    """("ok", result) or (exception type name, message) for a ValueError / TypeError."""
    try:
        return "ok", fn()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


def _both(call) -> tuple:
    """call(backend) on torch and on Triton, from the same torch RNG state (seed=None draws from it)."""
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1234)
        results.append(_outcome(functools.partial(call, backend)))
    return tuple(results)


def _assert_same_tensor(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> None:
    assert (a.shape, a.tile, a.hadamard_signs) == (b.shape, b.tile, b.hadamard_signs)
    assert_same_quantization((b.data, b.scale, b.amax), nvfp4.NVFP4Tensor(
        a.data.cpu(), a.scale.cpu(), a.amax.cpu(), a.shape, a.tile, a.hadamard_signs))


def _check_quantize_agrees(x, **kwargs) -> str:
    """Both backends quantize x with kwargs identically, or refuse it identically; returns the verdict."""
    (kind_t, got_t), (kind_k, got_k) = _both(lambda backend: nvfp4.quantize(x, backend=backend, **kwargs))
    assert kind_t == kind_k, f"{kwargs}: torch -> {kind_t} {got_t if kind_t != 'ok' else ''}, triton -> {kind_k}"
    if kind_t == "ok":
        _assert_same_tensor(got_t, got_k)
    else:
        assert got_t == got_k, f"{kwargs}: different messages:\n  {got_t}\n  {got_k}"
    return kind_t


def test_quantize_options_grid():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grid = itertools.product(
        [(1, 16), (16, 16), "16x16", (2, 16), "8x8"],
        ["nearest", "stochastic", "up"],
        ["nearest", "up", "down"],
        [False, True, None, tuple(reversed(DEFAULT_SIGNS)), [1, -1, 1]],
    )
    verdicts = [
        _check_quantize_agrees(x, tile=tile, rounding=rounding, scale_rounding=scale_rounding, hadamard=signs,
                               seed=None if rounding == "nearest" else 11)
        for tile, rounding, scale_rounding, signs in grid
    ]
    assert verdicts.count("ok") == 3 * 2 * 2 * 4 and "ValueError" in verdicts


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_quantize_inputs_grid(tile):
    shapes = [(32, 64), (20, 64), (4, 24), (2, 16, 32), (0, 32), (16,), (64, 0), ()]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]
    verdicts = []
    for shape, dtype in itertools.product(shapes, dtypes):
        x = torch.randn(shape).to(dtype).to(DEVICE)
        verdicts.append(_check_quantize_agrees(x, tile=tile, rounding="stochastic", seed=3))
    verdicts.append(_check_quantize_agrees(x.tolist(), tile=tile))  # not a tensor: TypeError on both
    assert "ok" in verdicts and "ValueError" in verdicts and verdicts[-1] == "TypeError"


def test_quantize_seeds_grid():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seeds = [None, 0, 7, np.int64(7), rng.MAX_SEED, -1, 2**63, 1.5, "7"]
    verdicts = {repr(s): _check_quantize_agrees(x, rounding="stochastic", hadamard=True, seed=s) for s in seeds}
    assert verdicts == {"None": "ok", "0": "ok", "7": "ok", repr(np.int64(7)): "ok", repr(rng.MAX_SEED): "ok",
                        "-1": "ValueError", repr(2**63): "ValueError", "1.5": "ValueError", "'7'": "ValueError"}


def test_quantize_weight_grid():
    weights = [torch.randn(32, 64), torch.randn(32, 64).t(), torch.randn(32, 64, dtype=torch.bfloat16),
               torch.randn(20, 64), torch.randn(64), torch.randn(2, 16, 32), torch.randn(32, 64).double()]
    verdicts = []
    for w in weights:
        (kind_t, got_t), (kind_k, got_k) = _both(lambda b, w=w: nvfp4.quantize_weight(w.to(DEVICE), backend=b))
        assert kind_t == kind_k, (tuple(w.shape), w.dtype, got_t if kind_t != "ok" else got_k)
        if kind_t == "ok":
            for a, b in zip(got_t, got_k, strict=True):
                _assert_same_tensor(a, b)
        else:
            assert got_t == got_k
        verdicts.append(kind_t)
    assert verdicts == ["ok"] * 3 + ["ValueError"] * 4


def test_matmul_grid():
    g = torch.Generator().manual_seed(2)

    def q(rows, k, **kw):
        return nvfp4.quantize(torch.randn(rows, k, generator=g).to(DEVICE), backend="torch", **kw)

    a, w = q(24, 64), q(32, 64, tile=(16, 16))
    cases = [
        (a, w, torch.float32), (a, w, torch.bfloat16), (a, w, torch.float16), (a, w, torch.float64),
        (a, w, torch.int32), (a, q(32, 48), torch.float32), (q(24, 64, hadamard=True), w, torch.float32),
        (q(24, 64, hadamard=True), q(32, 64, hadamard=DEFAULT_SIGNS), torch.float32),
        (a, torch.randn(32, 64), torch.float32),
    ]
    verdicts = []
    for x, y, out_dtype in cases:
        (kind_t, got_t), (kind_k, got_k) = _both(lambda b, x=x, y=y, d=out_dtype: nvfp4.matmul(x, y, d, backend=b))
        assert kind_t == kind_k, (out_dtype, got_t if kind_t != "ok" else got_k)
        if kind_t == "ok":
            assert got_t.dtype == got_k.dtype == out_dtype and got_t.shape == got_k.shape
            torch.testing.assert_close(got_k.cpu().float(), got_t.cpu().float(), rtol=1e-2, atol=1e-2)
        else:
            assert got_t == got_k
        verdicts.append(kind_t)
    assert verdicts == ["ok"] * 3 + ["ValueError"] * 4 + ["ok", "TypeError"]
