"""E2M1, NVFP4's 4-bit element code: its values, nibble packing, and rounding to and from fp32.

A code is 4 bits: bit 3 is the sign, codes 0..7 have the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Two codes
share a byte, the even element in the low nibble (docs/design.md §2).

Rounding (step 5 of the spec) is a table lookup instead of a chain of comparisons: every E2M1 rounding
threshold (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) and every E2M1 value is a multiple of 1/4, so the code of
|v| depends only on q = floor(4|v|) in 0..24 and on whether 4|v| == q exactly. Same bits as the spec's
table, a CPU speed-up of ~2-4x. The tables are computed once here from the spec's table (readable Python)
and copied to a device on first use; :func:`tables` keeps one named :class:`Tables` per device, so the
cost is a dictionary lookup per call, traded against a few hundred bytes held per device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP4_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_QUARTERS = range(25)  # q = floor(4 |v|) for |v| in [0, 6]


def _nearest_code(a: float) -> int:
    """The spec's table (step 5): ties at 0.25, 1.25, 2.5, 5 go down and at 0.75, 1.75, 3.5 up (even code)."""
    for code, (bound, inclusive) in enumerate(((0.25, True), (0.75, False), (1.25, True), (1.75, False),
                                               (2.5, True), (3.5, False), (5.0, True))):
        if a < bound or (inclusive and a == bound):
            return code
    return 7


def _lower_code(a: float) -> int:
    """The code of the largest E2M1 magnitude <= a."""
    return max(i for i, m in enumerate(E2M1_MAGNITUDES) if m <= a)


def _inverse_gap(lo: int) -> float:
    """1 / (distance from magnitude ``lo`` to the next one), a power of two; 0 above the largest."""
    return 0.0 if lo == 7 else 1.0 / (E2M1_MAGNITUDES[lo + 1] - E2M1_MAGNITUDES[lo])


# Index 2q + (4|v| != q): the code at q/4 exactly, then the code inside (q/4, (q+1)/4).
_NEAREST = [_nearest_code(q / 4 + inside / 8) for q in _QUARTERS for inside in (0, 1)]
_LOWER = [_lower_code(q / 4) for q in _QUARTERS]
_INV_GAP = [_inverse_gap(lo) for lo in _LOWER]
_OFFSET = [E2M1_MAGNITUDES[lo] * inv for lo, inv in zip(_LOWER, _INV_GAP, strict=True)]
_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)


class Tables(NamedTuple):
    """The lookup tables on one device, indexed by q = floor(4 |v|) unless said otherwise."""

    nearest: torch.Tensor
    """uint8 [50]: the nearest code of |v|, at index 2q + (4|v| != q)."""
    lower: torch.Tensor
    """uint8 [25]: the code of the E2M1 magnitude at or below |v| (stochastic rounding rounds up from it)."""
    inv_gap: torch.Tensor
    """fp32 [25]: 1 / (gap from that magnitude to the next), exact powers of two; 0 at 6."""
    offset: torch.Tensor
    """fp32 [25]: that magnitude times inv_gap, so (|v| - lo) / gap = |v| * inv_gap - offset, exactly."""
    values: torch.Tensor
    """fp32 [16]: code -> value (code 8 is -0.0)."""
    pairs: torch.Tensor
    """fp32 [256, 2]: a packed byte -> the values of its low and high nibble."""


_tables: dict[torch.device, Tables] = {}


def tables(device: torch.device) -> Tables:
    """The tables on ``device``, built on first use. Allocated with torch.as_tensor (docs/design.md §5)."""
    if device not in _tables:
        values = torch.as_tensor(_VALUES, dtype=torch.float32, device=device)
        every_byte = torch.arange(256, dtype=torch.uint8, device=device).view(256, 1)
        _tables[device] = Tables(
            nearest=torch.as_tensor(_NEAREST, dtype=torch.uint8, device=device),
            lower=torch.as_tensor(_LOWER, dtype=torch.uint8, device=device),
            inv_gap=torch.as_tensor(_INV_GAP, dtype=torch.float32, device=device),
            offset=torch.as_tensor(_OFFSET, dtype=torch.float32, device=device),
            values=values,
            pairs=values[unpack_nibbles(every_byte).long()].view(256, 2),
        )
    return _tables[device]


def _sign_bit(v: torch.Tensor) -> torch.Tensor:
    return (v < 0).to(torch.uint8) << 3


def _quarter_index(four_a: torch.Tensor) -> torch.Tensor:
    """q = floor(4|v|) from 4|v| >= 0 (an exact product), clamped to the tables; NaN lands on 0."""
    return four_a.to(torch.int32).clamp_(0, 24)


def encode_nearest(v: torch.Tensor) -> torch.Tensor:
    """Step 5, nearest: fp32 v already clamped to [-6, 6] -> uint8 codes 0..15 (bit 3 = sign)."""
    four_a = v.abs() * 4
    q = _quarter_index(four_a)
    index = q * 2 + (four_a != q)
    codes = torch.index_select(tables(v.device).nearest, 0, index.view(-1)).view(v.shape)
    return codes | _sign_bit(v)


def encode_stochastic(v: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Step 5, stochastic: round |v| up to the next E2M1 value with probability (|v| - lo) / (hi - lo)."""
    t = tables(v.device)
    a = v.abs()
    q = _quarter_index(a * 4).view(-1)
    # (a - lo) / (hi - lo) = a * inv_gap - lo * inv_gap: exact, as hi - lo is a power of two.
    frac = a.view(-1) * torch.index_select(t.inv_gap, 0, q) - torch.index_select(t.offset, 0, q)
    up = uniforms.view(-1) < frac
    codes = (torch.index_select(t.lower, 0, q) + up.to(torch.uint8)).view(v.shape)
    return codes | _sign_bit(v)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> fp32 values."""
    return tables(codes.device).values[codes.long()]


def decode_packed(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K // 2] -> fp32 values [..., K], through the 256-entry table of value pairs."""
    pairs = torch.nn.functional.embedding(packed.long(), tables(packed.device).pairs)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K // 2]; element 2i in the low nibble, 2i+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
