"""NVFP4 in plain torch: the reference every kernel is tested against (docs/design.md §2).

An NVFP4 tensor stands for ``x ~= e2m1 * fp32(s_block) * g_dec``: 4-bit E2M1 codes, one float8 E4M3
scale per 16 elements (1x16) or per 16x16 tile, and one fp32 tensor amax from which the global decode
scale ``g_dec`` is derived. The two-level scale is what makes 4 bits usable for training: E4M3 block
scales carry 3 mantissa bits (unlike MXFP4's power-of-two E8M0), and the fp32 global scale maps the
tensor's range into E4M3's, so block scales do not underflow.

Round-to-nearest is a bit-exact contract; every step below is fp32 with IEEE rounding, in this order,
because that is what Transformer Engine computes and kernels must reproduce it exactly:
  1. g_enc = min(2688 / amax, FLT_MAX) (2688 = 448 * 6); g_enc = 1 if it is 0 (amax = inf) or NaN.
     g_dec = 1 / g_enc.
  2. mult = g_enc * fp32(1/6): the fp32 reciprocal of 6, then one multiply (not a division by 6).
  3. s_block = e4m3_rne(clamp(min(b * mult, FLT_MAX), -448, 448)) with b the block's max |x|.
  4. enc = min(1 / (fp32(s_block) * g_dec), FLT_MAX): a product, then a reciprocal.
  5. v = clamp(x * enc, -6, 6) rounds to the nearest E2M1 magnitude with ties to the even code
     (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
  6. decode: (e2m1 * fp32(s_block)) * g_dec, g_dec recomputed from amax by step 1.
Stochastic rounding replaces step 5's nearest choice by a random choice between the two neighbouring
E2M1 values, P(up) = (|v| - lo) / (hi - lo) (exact: hi - lo is a power of two), using the Philox
stream of :mod:`ds_fp4.rng` with the element's row-major index as counter.

Non-finite input poisons the whole tensor: g_dec is NaN whenever amax is not finite, so every decoded
value is NaN and a training step can detect and skip it; nothing silently turns finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import hadamard as _hadamard
from . import rng as _rng

FP4_MAX = 6.0
E4M3_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max
BLOCK = 16
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TILES = ((1, 16), (16, 16))
ROUNDINGS = ("nearest", "stochastic")
SCALE_ROUNDINGS = ("nearest", "up")
BACKENDS = ("auto", "torch", "triton")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



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


def _f32(value: float, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """Step 1: g_enc = min(2688 / amax, FLT_MAX), replaced by 1 when it is 0 or NaN."""
    amax = amax.to(torch.float32)
    g_enc = torch.minimum(_f32(E4M3_MAX * FP4_MAX, amax.device) / amax, _f32(FLT_MAX, amax.device))
    return torch.where((g_enc == 0) | torch.isnan(g_enc), torch.ones_like(g_enc), g_enc)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """g_dec = 1 / g_enc, or NaN when amax is not finite (so that decoding poisons the tensor)."""
    g_dec = 1.0 / global_encode_scale(amax)
    return torch.where(torch.isfinite(amax), g_dec, torch.full_like(g_dec, float("nan")))


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
            out = _hadamard.inverse_rht(out, self.hadamard_signs)
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


# Every E2M1 rounding threshold (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) and every E2M1 value is a multiple
# of 1/4, so the code of |v| depends only on q = floor(4|v|) in 0..24 and on whether 4|v| == q exactly:
# rounding becomes a lookup instead of a chain of comparisons (a CPU speed-up of ~2-4x; same bits).
def _quarter_tables() -> tuple[list[int], list[int], list[float], list[float]]:
    """(nearest codes at q/4 exactly, nearest codes inside (q/4, (q+1)/4), SR lower index, SR step^-1)."""
    exact, inside, lower, inv_step = [], [], [], []
    for q in range(25):
        a = q / 4
        exact.append(_nearest_code(a))
        inside.append(_nearest_code(a + 1 / 8))
        lo = max(i for i, m in enumerate(E2M1_MAGNITUDES) if m <= a)
        lower.append(lo)
        inv_step.append(0.0 if lo == 7 else 1.0 / (E2M1_MAGNITUDES[lo + 1] - E2M1_MAGNITUDES[lo]))
    return exact, inside, lower, inv_step


def _nearest_code(a: float) -> int:
    """The spec's table (step 5): ties at 0.25, 1.25, 2.5, 5 go down and at 0.75, 1.75, 3.5 up (even code)."""
    for code, (bound, inclusive) in enumerate(((0.25, True), (0.75, False), (1.25, True), (1.75, False),
                                               (2.5, True), (3.5, False), (5.0, True))):
        if a < bound or (inclusive and a == bound):
            return code
    return 7


_EXACT, _INSIDE, _LOWER, _INV_STEP = _quarter_tables()
_NEAREST_TABLE = [c for pair in zip(_EXACT, _INSIDE, strict=True) for c in pair]  # index 2q + (4|v| != q)
_SR_OFFSET = [E2M1_MAGNITUDES[lo] * inv for lo, inv in zip(_LOWER, _INV_STEP, strict=True)]
_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def _lookup(device: torch.device) -> tuple[torch.Tensor, ...]:
    if device not in _tables:
        _tables[device] = (
            torch.as_tensor(_NEAREST_TABLE, dtype=torch.uint8, device=device),
            torch.as_tensor(_LOWER, dtype=torch.uint8, device=device),
            torch.as_tensor(_INV_STEP, dtype=torch.float32, device=device),
            torch.as_tensor(_SR_OFFSET, dtype=torch.float32, device=device),
            torch.as_tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), dtype=torch.float32,
                            device=device),
        )
    return _tables[device]


def _sign_bit(v: torch.Tensor) -> torch.Tensor:
    return (v < 0).to(torch.uint8) << 3


def encode_nearest(v: torch.Tensor) -> torch.Tensor:
    """Step 5, nearest: fp32 v already clamped to [-6, 6] -> uint8 codes 0..15 (bit 3 = sign)."""
    nearest = _lookup(v.device)[0]
    four_a = v.abs() * 4  # exact
    q = four_a.to(torch.int32).clamp_(0, 24)  # floor, since four_a >= 0; NaN lands on 0 (decodes to NaN)
    index = q * 2 + (four_a != q)
    codes = torch.index_select(nearest, 0, index.view(-1)).view(v.shape)
    return codes | _sign_bit(v)


def encode_stochastic(v: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Step 5, stochastic: round |v| up to the next E2M1 value with probability (|v| - lo) / (hi - lo)."""
    _, lower, inv_step, offset, _ = _lookup(v.device)
    a = v.abs()
    q = (a * 4).to(torch.int32).clamp_(0, 24).view(-1)
    # frac = (a - lo) / (hi - lo) = a * inv_step - lo * inv_step: exact, as hi - lo is a power of two.
    frac = a.view(-1) * torch.index_select(inv_step, 0, q) - torch.index_select(offset, 0, q)
    up = uniforms.view(-1) < frac
    codes = (torch.index_select(lower, 0, q) + up.to(torch.uint8)).view(v.shape)
    return codes | _sign_bit(v)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> fp32 values."""
    return _lookup(codes.device)[4][codes.long()]


def decode_packed(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K // 2] -> fp32 values [..., K], through a 256-entry table of value pairs."""
    if packed.device not in _pair_tables:
        codes = torch.arange(256, dtype=torch.uint8, device=packed.device)
        _pair_tables[packed.device] = decode_e2m1(unpack_nibbles(codes.view(256, 1))).view(256, 2)
    pairs = torch.nn.functional.embedding(packed.long(), _pair_tables[packed.device])
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


_pair_tables: dict[torch.device, torch.Tensor] = {}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K // 2]; element 2i in the low nibble, 2i+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


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


def _block_amax(a: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Per-block max of |x| (a >= 0), broadcastable back to [M, K // 16]."""
    m, k = a.shape
    if tile == (1, 16):
        return a.view(m, k // BLOCK, BLOCK).amax(dim=-1)
    tiles = a.view(m // BLOCK, BLOCK, k // BLOCK, BLOCK).amax(dim=(1, 3))
    return tiles.repeat_interleave(BLOCK, dim=0)


def _check_roundings(rounding: str, scale_rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}; got {scale_rounding!r}")


def e4m3_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 value >= s, for 0 <= s <= 448 (RNE, then one code up where RNE went down)."""
    rne = s.to(torch.float8_e4m3fn)
    below = (rne.to(torch.float32) < s).to(torch.uint8)
    return (rne.view(torch.uint8) + below).view(torch.float8_e4m3fn)  # codes are monotonic for s >= 0


def quantize_reference(
    x: torch.Tensor,
    tile: Sequence[int] | str = (1, 16),
    rounding: str = "nearest",
    hadamard: bool | Sequence[int] = False,
    seed: int | None = None,
    scale_rounding: str = "nearest",
) -> NVFP4Tensor:
    """Quantize with plain torch ops (CPU or CUDA); the spec in executable form.

    ``scale_rounding="up"`` departs from the spec on purpose (it is not what the GEMM recipe or
    Transformer Engine computes): block scales round up instead of to nearest, so no element exceeds
    6 after scaling and none is clamped. Clamping shrinks a block's maximum by up to 6.25%, a small
    bias towards zero that stochastic rounding cannot remove; the communication path uses "up" so
    that its reduced gradients are unbiased.
    """
    tile = normalize_tile(tile)
    _check_roundings(rounding, scale_rounding)
    x2 = _as_2d(x, tile)
    signs = None
    if hadamard is not False and hadamard is not None:
        signs = _hadamard.validate_signs(None if hadamard is True else hadamard)
        xf = _hadamard.rht(x2, signs)
    else:
        xf = x2.to(torch.float32).contiguous()  # wgrad operands arrive transposed
    dev = xf.device
    a = xf.abs()
    amax = a.amax() if a.numel() else a.new_zeros(())
    g_enc = global_encode_scale(amax)
    g_dec = 1.0 / g_enc
    mult = g_enc * (_f32(1.0, dev) / _f32(6.0, dev))
    b = _block_amax(a, tile)
    s = torch.clamp(torch.minimum(b * mult, _f32(FLT_MAX, dev)), -E4M3_MAX, E4M3_MAX)
    # A NaN block's scale is NaN; CPU min/clamp may return it with the sign bit set: store the positive
    # NaN (0x7F), as the kernels do, so the bytes do not depend on the device.
    s = torch.where(torch.isnan(s), _f32(float("nan"), dev), s)
    scale = s.to(torch.float8_e4m3fn) if scale_rounding == "nearest" else e4m3_round_up(s)
    enc = torch.minimum(1.0 / (scale.to(torch.float32) * g_dec), _f32(FLT_MAX, dev))
    m, k = xf.shape
    v = torch.clamp(xf.view(m, k // BLOCK, BLOCK) * enc.unsqueeze(-1), -FP4_MAX, FP4_MAX).view(m, k)
    if rounding == "nearest":
        codes = encode_nearest(v)
    else:
        if seed is None:
            seed = _rng.draw_seed()
        codes = encode_stochastic(v, _rng.uniform(v.numel(), seed, device=dev))
    return NVFP4Tensor(
        data=pack_nibbles(codes),
        scale=scale,
        amax=amax.to(torch.float32),
        shape=x.shape,
        tile=tile,
        hadamard_signs=signs,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when the kernels can run there, else 'torch'.

    'triton' is honoured wherever :func:`ds_fp4.kernels.available` says the kernels run (CUDA, or the
    CPU under TRITON_INTERPRET=1); otherwise it is an error that says why, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from . import kernels

    ok, reason = kernels.available(device)
    if ok:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run on {device}: {reason}; use backend='torch'")
    return "torch"


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
    scale_rounding: "nearest" (the spec) or "up" (no clamping; see :func:`quantize_reference`).
    """
    if resolve_backend(backend, x.device) == "torch":
        return quantize_reference(x, tile=tile, rounding=rounding, hadamard=hadamard, seed=seed,
                                  scale_rounding=scale_rounding)
    from . import kernels

    tile = normalize_tile(tile)
    _check_roundings(rounding, scale_rounding)
    x2 = _as_2d(x, tile)
    signs = None
    if hadamard is not False and hadamard is not None:
        signs = _hadamard.validate_signs(None if hadamard is True else hadamard)
    if rounding == "stochastic" and seed is None:
        seed = _rng.draw_seed()
    data, scale, amax = kernels.quantize(x2, tile=tile, rounding=rounding, signs=signs, seed=seed,
                                         scale_rounding=scale_rounding)
    return NVFP4Tensor(data=data, scale=scale, amax=amax, shape=x.shape, tile=tile, hadamard_signs=signs)


def quantize_weight(w: torch.Tensor, *, backend: str = "auto") -> tuple[NVFP4Tensor, NVFP4Tensor]:
    """16x16 round-to-nearest quantization of a 2D weight and of its transpose, in one pass.

    fprop uses W [N, K] and dgrad uses W^T [K, N]; with 16x16 tiles both decode identically, so the
    kernel writes both layouts at once and dgrad needs no second quantization.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2D weight; got shape {tuple(w.shape)}")
    if resolve_backend(backend, w.device) == "torch":
        wq = quantize_reference(w, tile=(16, 16))
        return wq, wq.t()
    from . import kernels

    _as_2d(w, (16, 16))
    data, scale, data_t, scale_t, amax = kernels.quantize_weight(w)
    wq = NVFP4Tensor(data=data, scale=scale, amax=amax, shape=w.shape, tile=(16, 16))
    shape_t = torch.Size((w.shape[1], w.shape[0]))
    return wq, NVFP4Tensor(data=data_t, scale=scale_t, amax=amax, shape=shape_t, tile=(16, 16))


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an NVFP4Tensor (step 6); same as ``t.dequantize(dtype)``."""
    return t.dequantize(dtype)


def matmul_reference(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b^T for a [M, K] and b [N, K], both quantized along K: the emulated NVFP4 GEMM.

    Codes times block scales are exact in fp32 (and in bf16), so the products inside the dot are exact;
    accumulation is fp32, and the two global decode scales are applied once at the end, one after the
    other (their product alone could underflow).
    """
    check_gemm_operands(a, b)
    acc = a.scaled_codes() @ b.scaled_codes().t()
    return ((acc * a.global_decode_scale) * b.global_decode_scale).to(out_dtype)


def check_gemm_operands(a: NVFP4Tensor, b: NVFP4Tensor) -> None:
    if a.cols != b.cols:
        raise ValueError(f"NVFP4 GEMM needs matching K: a is [{a.rows}, {a.cols}], b is [{b.rows}, {b.cols}]")
    if a.hadamard_signs != b.hadamard_signs:
        raise ValueError(
            "NVFP4 GEMM operands must share the Hadamard transform (it cancels only in pairs); got "
            f"a.hadamard_signs={a.hadamard_signs}, b.hadamard_signs={b.hadamard_signs}"
        )
    if a.device != b.device:
        raise ValueError(f"NVFP4 GEMM operands on different devices: {a.device} and {b.device}")


def matmul(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """a @ b^T with fp32 accumulation, output in ``out_dtype``."""
    if resolve_backend(backend, a.device) == "torch":
        return matmul_reference(a, b, out_dtype)
    from . import kernels

    check_gemm_operands(a, b)
    return kernels.matmul(a, b, out_dtype=out_dtype)
