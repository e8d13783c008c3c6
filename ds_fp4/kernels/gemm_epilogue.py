"""The NVFP4 GEMM epilogue as its own pass: out = ((acc * g_dec_a) * g_dec_b).to(out_dtype).

Used by the "dequant" GEMM strategy, where cuBLAS produces the fp32 accumulator of the decoded
operands: the global decode scales must be applied to fp32 values, one after the other, as in the
reference (a bf16 GEMM output would round before scaling, and g_dec_a * g_dec_b alone can
underflow). One read of fp32 and one write of out_dtype; g_dec is computed from amax on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import nvfp4_math as nm
from ._launch import OUT_DTYPES, autotune, launch_options


def _configs(interpret: bool):
    if interpret:
        return [triton.Config({"BLOCK": 4096}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((4096, 4), (8192, 8), (2048, 4))]


@autotune("gemm_epilogue", _configs, key=["n"])
@triton.jit
def _gemm_epilogue_kernel(acc_ptr, a_amax_ptr, b_amax_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    out = (acc * nm.decode_scale(tl.load(a_amax_ptr))) * nm.decode_scale(tl.load(b_amax_ptr))
    tl.store(out_ptr + offs, nm.cast_out(out, out_ptr.dtype.element_ty), mask=mask)


def gemm_epilogue(
    acc: torch.Tensor, a_amax: torch.Tensor, b_amax: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Scale a contiguous fp32 accumulator by both global decode scales and cast to ``out_dtype``."""
    if acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError(f"gemm_epilogue: acc must be contiguous fp32; got {acc.dtype}, strides {acc.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"gemm_epilogue: out_dtype must be one of {OUT_DTYPES}; got {out_dtype}")
    out = torch.empty_like(acc, dtype=out_dtype)
    n = acc.numel()
    if n:
        _gemm_epilogue_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            acc, a_amax.reshape(1), b_amax.reshape(1), out, n, **launch_options()
        )
    return out
