"""Triton kernels for NVFP4: what ds_fp4.nvfp4 dispatches to when the backend resolves to "triton".

One kernel per file (autotune configs + @triton.jit kernel + launcher that checks its inputs):

  amax.py            pass 1 of every quantization: tensor max |x| (optionally of the RHT)
  quantize_1x16.py   pass 2, 1x16 blocks: nearest or stochastic, optional fused RHT, strided input
  quantize_16x16.py  pass 2, 16x16 tiles: the weight quantizer writing W and W^T at once
  gemm.py            NVFP4 x NVFP4 -> fp32/bf16/fp16: tl.dot_scaled on sm_100+, decode + tl.dot elsewhere
  decode.py          NVFP4 -> dense (exact fp16 operands for the "dequant" GEMM strategy)
  gemm_epilogue.py   ((acc * g_dec_a) * g_dec_b).to(dtype) for the "dequant" strategy
  nvfp4_math.py      the shared @triton.jit arithmetic of docs/design.md §2 and the Philox stream (no kernel)
  blocks.py          16-element blocks held as tuples: RHT butterfly, block max, packing (no kernel)
  ops.py             torch.library custom ops + fake implementations (torch.compile)

The functions below are the interface ds_fp4/nvfp4.py calls, the same as ds_fp4/reference.py's; they
trust their arguments, which nvfp4.py has validated (docs/design.md §7.18), while each launcher still
checks its own tensor contract (shapes, dtypes, strides). Round-to-nearest results equal
``ds_fp4.reference.quantize`` bit for bit, and so does stochastic rounding for the same seed (same
Philox stream). On CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before
this package is imported), which is how the tests exercise them.
"""

from __future__ import annotations

import os

import torch

from ..nvfp4_tensor import QuantizeArgs

try:
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:  # the torch backend keeps working without triton
    _TRITON_ERROR = f"triton is not installed ({exc})"

__all__ = ["available", "quantize", "quantize_weight", "matmul", "dequantize"]


def available(device: torch.device) -> tuple[bool, str]:
    """(ok, reason): can the Triton kernels run on ``device``? reason says why not (or how they run)."""
    device = torch.device(device)
    if _TRITON_ERROR is not None:
        return False, _TRITON_ERROR
    from ._launch import INTERPRET

    if INTERPRET:
        if device.type in ("cpu", "cuda"):
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, f"the Triton interpreter runs on cpu or cuda tensors, not {device.type}"
    if device.type == "cpu":
        hint = "" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else " (it was set too late)"
        return False, ("Triton kernels run on CPU only in the interpreter: set TRITON_INTERPRET=1 before "
                       f"ds_fp4.kernels is imported{hint}")
    if device.type != "cuda":
        return False, f"no Triton kernels for device type {device.type!r}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if torch.version.hip is not None:
        return False, "ROCm is not supported by these kernels (tested on NVIDIA only)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cc = torch.cuda.get_device_capability(index)
    if cc < (8, 0):
        return False, f"compute capability {cc[0]}.{cc[1]} < 8.0 (needs Ampere or newer)"
    return True, f"CUDA sm_{cc[0]}{cc[1]}"


def _ops():
    if _TRITON_ERROR is not None:
        raise RuntimeError(f"ds_fp4.kernels needs triton: {_TRITON_ERROR}")
    from . import ops

    return ops


def quantize(x2d: torch.Tensor, args: QuantizeArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data uint8 [M, K/2], scale float8_e4m3fn [M, K/16], amax fp32 0-dim) of x2d [M, K] (any strides).

    The interface of ds_fp4.reference.quantize; ``args`` comes validated from ds_fp4.nvfp4.quantize.
    """
    from .nvfp4_math import signs_mask  # imports triton: only once the kernels are known to be available

    mask = -1 if args.signs is None else signs_mask(args.signs)
    seed = args.seed if args.stochastic else 0
    return _ops().quantize_op(x2d, args.tile[0], args.stochastic, mask, seed, args.scale_rounding == "up")


def quantize_weight(w2d: torch.Tensor):
    """16x16 nearest: (data, scale, data_t, scale_t, amax) of W and W^T in one pass over W (2D, checked by
    ds_fp4.nvfp4.quantize_weight)."""
    return _ops().quantize_weight_op(w2d)


def matmul(a, b, *, out_dtype: torch.dtype = torch.float32, strategy: str = "auto") -> torch.Tensor:
    """a @ b^T for NVFP4Tensors a [M, K], b [N, K]; fp32 accumulation, global decode scales at the end.

    strategy: "auto" (native on sm_100+, else by size, see gemm.pick_strategy), "native", "fused" or
    "dequant"; all give the reference's exact products and differ only in fp32 summation order.
    """
    # Scales cross the op boundary as uint8 views: opcheck's schema test cannot compare fp8 on CPU.
    u8 = torch.uint8
    return _ops().matmul_op(a.data, a.scale.view(u8), a.amax, b.data, b.scale.view(u8), b.amax, out_dtype, strategy)


def dequantize(t, dtype: torch.dtype = torch.float32, *, apply_global_scale: bool = True) -> torch.Tensor:
    """Decode an NVFP4Tensor's 2D data to [M, K] (no Hadamard undo, no reshape to the logical shape)."""
    return _ops().dequantize_op(t.data, t.scale.view(torch.uint8), t.amax, dtype, apply_global_scale)
