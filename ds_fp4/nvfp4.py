"""NVFP4 quantization and GEMM, the public entry (docs/design.md §2, §4): validate once, then dispatch.

The numerics are split one idea per module, and this one re-exports their names:
  e2m1.py          the 4-bit element code: values, nibble packing, rounding tables
  nvfp4_tensor.py  the format: block and tile sizes, global scales, NVFP4Tensor
  reference.py     the torch reference quantizer and GEMM (the spec in executable form)
  kernels/         the Triton kernels, with the reference's interface
  nvfp4.py         (this file) argument validation and backend dispatch

Arguments are checked here and nowhere below (docs/design.md §7.18): both backends get the same
normalized call (a 2D float tensor and one QuantizeArgs: tile tuple, rounding name, RHT sign tuple or
None, int seed, scale rounding), so they accept and refuse exactly the same calls, and an error names
the argument the user wrote rather than an internal one. The price is that the backend functions are
not safe entry points on their own; tests/kernels calls them with known-good arguments only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import hadamard as _hadamard
from . import kernels, reference
from . import rng as _rng
from .e2m1 import (
    E2M1_MAGNITUDES,
    FP4_MAX,
    decode_e2m1,
    decode_packed,
    encode_nearest,
    encode_stochastic,
    pack_nibbles,
    unpack_nibbles,
)
from .nvfp4_tensor import (
    BLOCK,
    E4M3_MAX,
    FLT_MAX,
    TILES,
    NVFP4Tensor,
    QuantizeArgs,
    global_decode_scale,
    global_encode_scale,
    normalize_tile,
)

__all__ = [
    "BACKENDS", "BLOCK", "E2M1_MAGNITUDES", "E4M3_MAX", "FLT_MAX", "FP4_MAX", "INPUT_DTYPES", "OUT_DTYPES",
    "ROUNDINGS", "SCALE_ROUNDINGS", "TILES", "NVFP4Tensor", "QuantizeArgs", "check_gemm_operands", "decode_e2m1",
    "decode_packed", "dequantize", "encode_nearest", "encode_stochastic", "global_decode_scale",
    "global_encode_scale", "matmul", "normalize_tile", "pack_nibbles", "quantize", "quantize_weight",
    "resolve_backend", "unpack_nibbles",
]

ROUNDINGS = ("nearest", "stochastic")
SCALE_ROUNDINGS = ("nearest", "up")
BACKENDS = ("auto", "torch", "triton")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when the kernels can run there, else 'torch'.

    'triton' is honoured wherever :func:`ds_fp4.kernels.available` says the kernels run (CUDA, or the
    CPU under TRITON_INTERPRET=1); otherwise it is an error that says why, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    ok, reason = kernels.available(device)
    if ok:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run on {device}: {reason}; use backend='torch'")
    return "torch"


def _backend(backend: str, device: torch.device):
    """The module that implements the resolved backend: both have quantize, quantize_weight, matmul."""
    return reference if resolve_backend(backend, device) == "torch" else kernels


def _as_2d(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"quantize expects float32, bfloat16 or float16 input; got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % BLOCK:  # zero rows are fine, a zero last dim is not
        raise ValueError(
            f"NVFP4 needs the last dim divisible by {BLOCK}; got shape {tuple(x.shape)} "
            "(pad it, or keep this tensor in high precision)"
        )
    x2 = x.reshape(-1, x.shape[-1])
    if tile == (16, 16) and x2.shape[0] % BLOCK:
        raise ValueError(
            f"16x16 tiles need the flattened row count divisible by {BLOCK}; got shape {tuple(x.shape)} "
            f"({x2.shape[0]} rows); use tile (1, 16) for this tensor"
        )
    return x2


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def _seed(rounding: str, seed: int | None) -> int | None:
    """A given seed must be an integer in [0, 2**63 - 1]; stochastic rounding without one draws one from
    torch's CPU generator, so torch.manual_seed reproduces it on either backend."""
    if seed is None:
        return _rng.draw_seed() if rounding == "stochastic" else None
    return _rng.check_seed(seed)


def quantize(
    x: torch.Tensor,
    *,
    tile: Sequence[int] | str = (1, 16),
    rounding: str = "nearest",
    hadamard: bool | Sequence[int] = False,
    seed: int | None = None,
    backend: str = "auto",
    scale_rounding: str = "nearest",
) -> NVFP4Tensor:
    """Quantize x (fp32/bf16/fp16, any shape whose last dim divides by 16) to NVFP4.

    tile: (1, 16) blocks along the last dim, or (16, 16) tiles (both flattened dims must divide by 16).
    rounding: "nearest" (bit-exact spec) or "stochastic" (unbiased; ``seed`` fixes the bits, None draws
        one from torch's CPU generator). hadamard: False, True (default signs) or a 16-sign vector.
    scale_rounding: "nearest" (the spec) or "up" (no clamping; see :func:`ds_fp4.reference.quantize`).
    """
    tile = normalize_tile(tile)
    x2 = _as_2d(x, tile)
    rounding = _choice("rounding", rounding, ROUNDINGS)
    scale_rounding = _choice("scale_rounding", scale_rounding, SCALE_ROUNDINGS)
    signs = None
    if hadamard is not False and hadamard is not None:
        signs = _hadamard.validate_signs(None if hadamard is True else hadamard)
    impl = _backend(backend, x.device)
    seed = _seed(rounding, seed)  # last: a drawn seed advances torch's generator only for a valid call
    args = QuantizeArgs(tile=tile, rounding=rounding, signs=signs, seed=seed, scale_rounding=scale_rounding)
    data, scale, amax = impl.quantize(x2, args)
    return NVFP4Tensor(data=data, scale=scale, amax=amax, shape=x.shape, tile=tile, hadamard_signs=signs)


def quantize_weight(w: torch.Tensor, *, backend: str = "auto") -> tuple[NVFP4Tensor, NVFP4Tensor]:
    """16x16 round-to-nearest quantization of a 2D weight and of its transpose, in one pass.

    fprop uses W [N, K] and dgrad uses W^T [K, N]; with 16x16 tiles both decode identically, so the
    kernel writes both layouts at once and dgrad needs no second quantization.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = f"shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_weight expects a 2D weight tensor; got {got}")
    tile = reference.WEIGHT.tile
    _as_2d(w, tile)
    impl = _backend(backend, w.device)
    data, scale, data_t, scale_t, amax = impl.quantize_weight(w)
    wq = NVFP4Tensor(data=data, scale=scale, amax=amax, shape=w.shape, tile=tile)
    shape_t = torch.Size((w.shape[1], w.shape[0]))
    return wq, NVFP4Tensor(data=data_t, scale=scale_t, amax=amax, shape=shape_t, tile=tile)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an NVFP4Tensor (step 6); same as ``t.dequantize(dtype)``."""
    return t.dequantize(dtype)


def check_gemm_operands(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.float32) -> None:
    """ValueError naming the mismatch unless a @ b^T is an NVFP4 GEMM that both backends can run."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, NVFP4Tensor):
            raise TypeError(f"NVFP4 GEMM operand {name} must be an NVFP4Tensor (ds_fp4.quantize); got "
                            f"{type(t).__name__}")
    if a.cols != b.cols:
        raise ValueError(f"NVFP4 GEMM needs matching K: a is [{a.rows}, {a.cols}], b is [{b.rows}, {b.cols}]")
    if a.hadamard_signs != b.hadamard_signs:
        raise ValueError(
            "NVFP4 GEMM operands must share the Hadamard transform (it cancels only in pairs); got "
            f"a.hadamard_signs={a.hadamard_signs}, b.hadamard_signs={b.hadamard_signs}"
        )
    if a.device != b.device:
        raise ValueError(f"NVFP4 GEMM operands on different devices: {a.device} and {b.device}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"NVFP4 GEMM out_dtype must be one of {OUT_DTYPES}; got {out_dtype}")


def matmul(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """a @ b^T with fp32 accumulation, output in ``out_dtype`` (float32, bfloat16 or float16)."""
    check_gemm_operands(a, b, out_dtype)
    return _backend(backend, a.device).matmul(a, b, out_dtype=out_dtype)
