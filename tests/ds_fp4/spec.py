"""An independent, deliberately naive implementation of the NVFP4 spec (docs/design.md §2) in numpy float32.

It shares no code with ds_fp4's numerics (ds_fp4.reference, ds_fp4.e2m1): E4M3 rounding is done with
frexp/rint instead of torch's cast, E2M1 rounding with the spec's threshold table instead of lookup
tables. Tests compare the reference against it bit for bit.
"""

import numpy as np

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max


def e4m3_rne(v: np.ndarray) -> np.ndarray:
    """Round non-negative float32 values <= 448 to float8 E4M3 (3 mantissa bits), ties to even."""
    v = v.astype(np.float64)  # exact copy; the rounding below is exact arithmetic on powers of two
    out = np.zeros_like(v)
    sub = v < 2.0**-6
    out[sub] = np.rint(v[sub] / 2.0**-9) * 2.0**-9
    _, exp = np.frexp(v[~sub])  # v = m * 2**exp, m in [0.5, 1)
    step = np.ldexp(1.0, exp - 4)  # 2**(E - 3) with E = exp - 1
    out[~sub] = np.rint(v[~sub] / step) * step
    return out.astype(np.float32)


def e2m1_nearest(v: np.ndarray) -> np.ndarray:
    """The spec's table: |v| <= .25 -> 0, < .75 -> .5, <= 1.25 -> 1, < 1.75 -> 1.5, <= 2.5 -> 2,
    < 3.5 -> 3, <= 5 -> 4, else 6."""
    a = np.abs(v)
    mag = np.select(
        [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0],
        6.0,
    ).astype(np.float32)
    return np.where(v < 0, -mag, mag)


def quantize_dequantize(x: np.ndarray, tile=(1, 16)):
    """Returns (amax, block scales as float32 [M, K/16], decoded float32 [M, K]) per the spec."""
    x = x.astype(np.float32)
    m, k = x.shape
    amax = F32(np.abs(x).max())
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        g_enc = np.minimum(F32(2688.0) / amax, FLT_MAX).astype(np.float32)
    if g_enc == 0 or np.isnan(g_enc):
        g_enc = F32(1.0)
    g_dec = F32(F32(1.0) / g_enc)
    mult = F32(g_enc * F32(F32(1.0) / F32(6.0)))
    blocks = np.abs(x).reshape(m, k // 16, 16).max(-1)
    if tile == (16, 16):
        t = np.abs(x).reshape(m // 16, 16, k // 16, 16).max(axis=(1, 3))
        blocks = np.repeat(t, 16, axis=0)
    with np.errstate(over="ignore"):
        s = np.clip(np.minimum(blocks * mult, FLT_MAX), -448, 448).astype(np.float32)
    s = e4m3_rne(s)
    with np.errstate(divide="ignore", over="ignore"):
        enc = np.minimum(F32(1.0) / (s * g_dec), FLT_MAX).astype(np.float32)
    with np.errstate(over="ignore"):
        v = np.clip(x.reshape(m, k // 16, 16) * enc[..., None], -6, 6).astype(np.float32)
    q = e2m1_nearest(v)
    dec = ((q * s[..., None]).astype(np.float32) * g_dec).astype(np.float32)
    return amax, s, dec.reshape(m, k)
