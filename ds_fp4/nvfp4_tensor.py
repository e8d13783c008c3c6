"""The NVFP4 format: block and tile sizes, the two-level scales, and :class:`NVFP4Tensor`.

An NVFP4 tensor stands for ``x ~= e2m1 * fp32(s_block) * g_dec``: 4-bit E2M1 codes (:mod:`ds_fp4.e2m1`),
one float8 E4M3 scale per 16 elements (1x16) or per 16x16 tile, and one fp32 tensor amax from which the
global decode scale ``g_dec`` is derived (docs/design.md §2). The two-level scale is what makes 4 bits
usable for training: E4M3 block scales carry 3 mantissa bits (unlike MXFP4's power-of-two E8M0), and the
fp32 global scale maps the tensor's range into E4M3's, so block scales do not underflow.

Only what a quantized tensor *is* lives here (how to decode it and transpose it), and the validated
arguments that describe one quantization (:class:`QuantizeArgs`). How a tensor is quantized is
:mod:`ds_fp4.reference` (torch) and :mod:`ds_fp4.kernels` (Triton), behind :mod:`ds_fp4.nvfp4`.
Storing a 16x16 tile's scale once per row of the tile costs 15 redundant bytes per tile, and buys one
indexing rule for both layouts (every consumer reads ``scale[row, k // 16]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import hadamard
from .e2m1 import FP4_MAX, decode_packed, pack_nibbles, unpack_nibbles

E4M3_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max
BLOCK = 16
TILES = ((1, 16), (16, 16))


def normalize_tile(tile: Sequence[int] | str) -> tuple[int, int]:
    """(1, 16), (16, 16), "1x16" or "16x16" -> a tuple; ValueError naming the allowed values."""
    if isinstance(tile, str):
        parts = tile.lower().split("x")
        try:
            tile = tuple(int(p) for p in parts)
        except ValueError:
            tile = (tile,)  # reported below
    tile = tuple(tile)
    if tile not in TILES:
        raise ValueError(f"tile must be one of (1, 16) / '1x16' or (16, 16) / '16x16'; got {tile!r}")
    return tile  # type: ignore[return-value]


def f32(value: float, device: torch.device) -> torch.Tensor:
    """An fp32 scalar tensor (torch.as_tensor: zero.Init does not recast it, docs/design.md §5)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """Step 1: g_enc = min(2688 / amax, FLT_MAX), replaced by 1 when it is 0 or NaN."""
    amax = amax.to(torch.float32)
    g_enc = torch.minimum(f32(E4M3_MAX * FP4_MAX, amax.device) / amax, f32(FLT_MAX, amax.device))
    return torch.where((g_enc == 0) | torch.isnan(g_enc), torch.ones_like(g_enc), g_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """g_dec = 1 / g_enc, or NaN when amax is not finite (so that decoding poisons the tensor)."""
    g_dec = 1.0 / global_encode_scale(amax)
    return torch.where(torch.isfinite(amax), g_dec, torch.full_like(g_dec, float("nan")))


@dataclass(frozen=True)
class QuantizeArgs:
    """The arguments of one quantization once ds_fp4.nvfp4.quantize has validated them: exactly what the
    torch reference and the Triton kernels receive, so the two backends cannot take different ones."""

    tile: tuple[int, int] = (1, 16)
    """(1, 16) or (16, 16)."""
    rounding: str = "nearest"
    """"nearest" or "stochastic"."""
    signs: tuple[int, ...] | None = None
    """None, or the 16 RHT signs (+1/-1) applied along K before quantizing."""
    seed: int | None = None
    """The Philox key of stochastic rounding, 0 <= seed < 2**63; unused for "nearest"."""
    scale_rounding: str = "nearest"
    """Block scales rounded to "nearest" E4M3 (the spec) or "up" (no clamping)."""

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"


@dataclass
class NVFP4Tensor:
    """A quantized 2D view [M, K] of a tensor of logical shape ``shape`` (leading dims flattened).

    data:  uint8 [M, K // 2], two E2M1 codes per byte, the even element in the low nibble.
    scale: float8_e4m3fn [M, K // 16]; for 16x16 tiles each tile's scale is repeated on its 16 rows.
    amax:  fp32 scalar tensor, max |x| of the (Hadamard-transformed, if any) input.
    hadamard_signs: None, or the RHT sign vector that was applied along K before quantization; the
        codes then stand for the transformed values.
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    shape: torch.Size
    tile: tuple[int, int]
    hadamard_signs: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def cols(self) -> int:
        return self.data.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def global_decode_scale(self) -> torch.Tensor:
        return global_decode_scale(self.amax)

    @property
    def nbytes(self) -> int:
        """Bytes of codes + block scales + amax: what a collective would move."""
        return self.data.numel() + self.scale.numel() + 4

    def scaled_codes(self) -> torch.Tensor:
        """fp32 [M, K] of e2m1 * s_block, exact (5 significant bits at most), before g_dec."""
        values = decode_packed(self.data).view(self.rows, self.cols // BLOCK, BLOCK)
        return (values * self.scale.to(torch.float32).unsqueeze(-1)).view(self.rows, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32, undo_hadamard: bool = False) -> torch.Tensor:
        """Decode to ``dtype`` in the logical shape (step 6). With ``undo_hadamard`` the RHT is inverted."""
        out = self.scaled_codes() * self.global_decode_scale
        if undo_hadamard and self.hadamard_signs is not None:
            out = hadamard.inverse_rht(out, self.hadamard_signs)
        return out.reshape(self.shape).to(dtype)

    def t(self) -> NVFP4Tensor:
        """The transpose [K, M] of a 16x16-tiled tensor, without requantizing.

        16x16 scaling is what makes this legal: a tile's scale and amax do not depend on the
        direction of reading, so quantize(x).t() decodes exactly like quantize(x.t()).
        """
        if self.tile != (16, 16) or self.hadamard_signs is not None or len(self.shape) != 2:
            raise ValueError(
                "only a 2D, 16x16-tiled NVFP4Tensor without Hadamard can be transposed in place; got "
                f"shape={tuple(self.shape)}, tile={self.tile}, hadamard={self.hadamard_signs is not None}"
            )
        codes = unpack_nibbles(self.data).t().contiguous()
        tiles = self.scale[::BLOCK].t().contiguous()  # [K/16, M/16]: one row of scales per tile row
        return NVFP4Tensor(
            data=pack_nibbles(codes),
            scale=tiles.repeat_interleave(BLOCK, dim=0),
            amax=self.amax,
            shape=torch.Size((self.shape[1], self.shape[0])),
            tile=self.tile,
        )
