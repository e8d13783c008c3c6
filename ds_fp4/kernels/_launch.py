"""What every launcher shares: interpreter detection, input checks, launch options, device facts."""

from __future__ import annotations

import functools
import os

import torch
import triton


def _interpret_mode() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # triton without knobs


# Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, so
# this reflects the mode the kernels of this package were created in (TRITON_INTERPRET=1 at import).
INTERPRET: bool = _interpret_mode()

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_options() -> dict:
    """Compile options for every kernel here: no FMA contraction (bit-exactness against torch)."""
    return {"enable_fp_fusion": False}


def check_2d_input(name: str, x: torch.Tensor) -> None:
    """ValueError naming the offending value unless x is a 2D fp32/bf16/fp16 tensor with K % 16 == 0."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} expects a 2D tensor; got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} expects float32, bfloat16 or float16; got dtype {x.dtype}")
    if x.shape[1] % 16:
        raise ValueError(f"{name} needs the last dim divisible by 16; got shape {tuple(x.shape)}")


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def is_native_fp4(device: torch.device) -> bool:
    """True where tl.dot_scaled runs e2m1 x e2m1 with E4M3 scales on FP4 tensor cores (sm_100+)."""
    if INTERPRET or device.type != "cuda":
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 10


def has_fp8_convert(device: torch.device) -> bool:
    """True where Triton can convert float8e4nv (sm_89+, and the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return True
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)
