"""The launchers as ``torch.library`` custom ops, with fake (meta) implementations.

torch.compile cannot trace into a Triton launcher that allocates, autotunes and reads strides on the
host; as custom ops the launchers are opaque nodes whose output shapes come from the fake
implementations below, so a model using NVFP4Linear compiles (graph breaks are avoided, the kernels
run as they are). Arguments are flattened to schema types: the tile as its row count, the RHT signs
as a 16-bit mask (-1 = none), rounding as a bool, and a seed that is ignored for nearest rounding.
The ops trust their arguments (ds_fp4.nvfp4 validated them); tile_rows is 1 or 16.
"""

from __future__ import annotations

import torch

from .decode import dequantize
from .gemm import STRATEGIES, nvfp4_gemm
from .quantize_1x16 import quantize_1x16
from .quantize_16x16 import quantize_16x16, quantize_weight


def _quantize_outputs(x: torch.Tensor):
    m, k = x.shape
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((m, k // 16), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("ds_fp4::quantize", mutates_args=())
def quantize_op(
    x: torch.Tensor, tile_rows: int, stochastic: bool, signs_mask: int, seed: int, scale_up: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = None if signs_mask < 0 else signs_mask
    launcher = quantize_1x16 if tile_rows == 1 else quantize_16x16
    return launcher(x, stochastic=stochastic, signs_mask=mask, seed=seed, scale_up=scale_up)


@quantize_op.register_fake
def _(x, tile_rows, stochastic, signs_mask, seed, scale_up=False):
    return _quantize_outputs(x)


@torch.library.custom_op("ds_fp4::quantize_weight", mutates_args=())
def quantize_weight_op(
    w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_weight(w)


@quantize_weight_op.register_fake
def _(w):
    n, k = w.shape
    data, scale, amax = _quantize_outputs(w)
    return data, scale, w.new_empty((k, n // 2), dtype=torch.uint8), w.new_empty(
        (k, n // 16), dtype=torch.float8_e4m3fn
    ), amax


@torch.library.custom_op("ds_fp4::matmul", mutates_args=())
def matmul_op(
    a_data: torch.Tensor, a_scale: torch.Tensor, a_amax: torch.Tensor,
    b_data: torch.Tensor, b_scale: torch.Tensor, b_amax: torch.Tensor,
    out_dtype: torch.dtype, strategy: str,
) -> torch.Tensor:
    return nvfp4_gemm(a_data, a_scale, a_amax, b_data, b_scale, b_amax, out_dtype,
                      strategy=None if strategy == "auto" else strategy)


@matmul_op.register_fake
def _(a_data, a_scale, a_amax, b_data, b_scale, b_amax, out_dtype, strategy):
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"ds_fp4::matmul: strategy must be 'auto' or one of {STRATEGIES}; got {strategy!r}")
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


@torch.library.custom_op("ds_fp4::dequantize", mutates_args=())
def dequantize_op(
    data: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype, apply_global_scale: bool
) -> torch.Tensor:
    return dequantize(data, scale, amax, out_dtype, apply_global_scale=apply_global_scale)


@dequantize_op.register_fake
def _(data, scale, amax, out_dtype, apply_global_scale):
    return data.new_empty((data.shape[0], data.shape[1] * 2), dtype=out_dtype)
