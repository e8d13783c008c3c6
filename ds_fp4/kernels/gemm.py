"""NVFP4 x NVFP4 GEMM: C = A @ B^T with A [M, K], B [N, K] both quantized along K (1x16 or 16x16).

Three strategies, all with the reference's exact products (only the fp32 summation order differs):

* ``native`` (compute capability >= 10): ``tl.dot_scaled(a, sa, "e2m1", b, sb, "e2m1")`` with the
  E4M3 block scales bitcast to float8e4nv. Triton lowers this for sm_100 to
  ``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16``, the FP4 tensor-core MMA with one E4M3
  scale per 16 elements (tests/kernels/test_compile.py checks the PTX).
* ``fused`` (emulation anywhere, the interpreter included): codes and scales are decoded to fp16 in
  registers inside the K loop and multiplied with ``tl.dot``. e2m1 x e4m3 has at most 6
  significant bits and lies in [2**-10, 2688], so every decoded value is exact in fp16 (as in bf16)
  and the tensor-core products are exact. fp16 rather than bf16 because the Triton interpreter
  computes bf16 arithmetic on the raw bits, and the same code path must run there.
  An E2M1 nibble ``s e e m`` becomes the E4M3 byte ``s 0 0 e e m 0 0``, which is exactly
  ``e2m1 * 2**-6`` (subnormal 0.5 included): two bit operations, then the hardware fp8 -> fp16
  conversion (sm_89+); the scale is pre-multiplied by 64 to compensate. Where fp8 conversion is
  missing (sm_80) ``FP8_CVT=False`` builds the fp16 bits with integer ops instead.
  The dot product does not care about the order of K, so the low nibbles (even k) and the high
  nibbles (odd k) of a byte tile are multiplied as two separate dots: no interleaving shuffle.
* ``dequant``: decode.py writes both operands as exact fp16, cuBLAS multiplies them with fp32 output,
  gemm_epilogue.py applies the global scales. On sm_90 the fused loop is issue-bound: compiled for
  128x256x64 tiles it needs about 1.6 issue cycles of decode per cycle of wgmma (SASS count,
  unmeasured), so it cannot reach bf16 matmul speed, while decoding once costs a memory pass
  (~8% of an 8192^3 GEMM). ``pick_strategy`` uses it for large GEMMs below sm_100.

The interpreter never takes the ``native`` branch: it would decode the scales as E8M0.
Both global decode scales are applied once, at the end, as ``(acc * g_dec_a) * g_dec_b`` (their
product alone could underflow), and are computed on the device from the amax tensors (no host sync).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import nvfp4_math as nm
from ._launch import INTERPRET, OUT_DTYPES, autotune, has_fp8_convert, is_native_fp4, launch_options
from .decode import dequantize
from .gemm_epilogue import gemm_epilogue


def _emulated_configs(interpret: bool):
    if interpret:
        return [triton.Config({"BM": 32, "BN": 32, "BK": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfg = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 3), (32, 64, 128, 4, 3),
    ]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfg


def _native_configs(interpret: bool):
    cfg = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 256, 8, 3), (128, 128, 256, 4, 4), (128, 128, 128, 4, 4), (128, 64, 256, 4, 4),
    ]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfg


@triton.jit
def _decode_fp16(byte, scale, NIBBLE: tl.constexpr, FP8_CVT: tl.constexpr, ROWS: tl.constexpr,
                 BK: tl.constexpr):
    """uint8 [ROWS, BK/2] bytes + uint8 [ROWS, BK/16] E4M3 scales -> fp16 e2m1 * scale of one nibble.

    Column j of the result is element 2j (NIBBLE=0) or 2j + 1 (NIBBLE=1) of the K tile; both use
    block scale j // 8.
    """
    b = byte.to(tl.int32)
    if NIBBLE == 0:
        c = b & 0xF
    else:
        c = b >> 4
    if FP8_CVT:
        e4m3 = (((c & 0x8) << 4) | ((c & 0x7) << 2)).to(tl.uint8)  # = e2m1 * 2**-6 as E4M3
        val = e4m3.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        sc = scale.to(tl.float8e4nv, bitcast=True).to(tl.float16) * 64.0
    else:
        mag = c & 0x7
        bits = tl.where(mag > 1, (mag << 9) + 0x3800, mag * 0x3800) | ((c & 0x8) << 12)
        val = bits.to(tl.int16).to(tl.float16, bitcast=True)
        sc = nm.e4m3_to_f32(scale.to(tl.int32)).to(tl.float16)
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], [ROWS, BK // 16, 8]), [ROWS, BK // 2])
    return val * sc


@triton.jit
def _nvfp4_gemm_kernel(a_ptr, as_ptr, a_amax_ptr, b_ptr, bs_ptr, b_amax_ptr, c_ptr, M, N, K,
                       stride_am, stride_asm, stride_bn, stride_bsn, stride_cm, stride_cn,
                       NATIVE: tl.constexpr, FP8_CVT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row tiles share their B tiles while they are hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)  # out-of-range rows read row 0; never stored
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
    rkb = tl.arange(0, BK // 2)
    rks = tl.arange(0, BK // 16)
    a_ptrs = a_ptr + rm_safe[:, None] * stride_am + rkb[None, :]
    b_ptrs = b_ptr + rn_safe[:, None] * stride_bn + rkb[None, :]
    as_ptrs = as_ptr + rm_safe[:, None] * stride_asm + rks[None, :]
    bs_ptrs = bs_ptr + rn_safe[:, None] * stride_bsn + rks[None, :]

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kb_ok = (k0 // 2 + rkb) < K // 2
        ks_ok = (k0 // 16 + rks) < K // 16
        a = tl.load(a_ptrs, mask=kb_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=kb_ok[None, :], other=0)
        sa = tl.load(as_ptrs, mask=ks_ok[None, :], other=0)
        sb = tl.load(bs_ptrs, mask=ks_ok[None, :], other=0)
        if NATIVE:
            acc = tl.dot_scaled(a, sa.to(tl.float8e4nv, bitcast=True), "e2m1",
                                tl.trans(b), sb.to(tl.float8e4nv, bitcast=True), "e2m1", acc)
        else:
            a_lo = _decode_fp16(a, sa, 0, FP8_CVT, BM, BK)
            b_lo = _decode_fp16(b, sb, 0, FP8_CVT, BN, BK)
            acc = tl.dot(a_lo, tl.trans(b_lo), acc)
            a_hi = _decode_fp16(a, sa, 1, FP8_CVT, BM, BK)
            b_hi = _decode_fp16(b, sb, 1, FP8_CVT, BN, BK)
            acc = tl.dot(a_hi, tl.trans(b_hi), acc)
        a_ptrs += BK // 2
        b_ptrs += BK // 2
        as_ptrs += BK // 16
        bs_ptrs += BK // 16

    g_a = nm.decode_scale(tl.load(a_amax_ptr))
    g_b = nm.decode_scale(tl.load(b_amax_ptr))
    out = (acc * g_a) * g_b
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, nm.cast_out(out, c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


_KEY = ["M", "N", "K"]
_gemm_emulated = autotune("gemm_emulated", _emulated_configs, _KEY)(_nvfp4_gemm_kernel)
_gemm_native = autotune("gemm_native", _native_configs, _KEY)(_nvfp4_gemm_kernel)


def _check_operand(name, data, scale, amax):
    for what, t in (("data", data), ("scale", scale), ("amax", amax)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"nvfp4_gemm: {name}.{what} must be a tensor; got {type(t).__name__}")
    if data.dim() != 2 or data.dtype != torch.uint8:
        raise ValueError(f"nvfp4_gemm: {name}.data must be 2D uint8; got {data.dtype} {tuple(data.shape)}")
    rows, k = data.shape[0], data.shape[1] * 2
    if k % 16:
        raise ValueError(f"nvfp4_gemm: {name} K must divide by 16; got {name}.data shape {tuple(data.shape)}")
    if scale.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(scale.shape) != (rows, k // 16):
        raise ValueError(
            f"nvfp4_gemm: {name}.scale must be float8_e4m3fn [{rows}, {k // 16}]; "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    if amax.numel() != 1 or amax.dtype != torch.float32:
        raise ValueError(f"nvfp4_gemm: {name}.amax must be one fp32 value; got {amax.dtype} {tuple(amax.shape)}")
    if data.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError(
            f"nvfp4_gemm: {name}.data and {name}.scale need unit stride along K; "
            f"got strides {data.stride()} and {scale.stride()}"
        )
    return rows, k


STRATEGIES = ("native", "fused", "dequant")
# Below this many rows or columns of output the GEMM is bound by reading the operands, where decoding
# in the K loop (no dense copy) beats decoding to memory first. Not measured yet: bench/kernels.py
# reports both strategies so the threshold can be set from a GPU run.
DEQUANT_MIN_MN = 1024


@functools.cache
def _mm_fp32_out_supported(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        x = torch.empty_strided((16, 16), (16, 1), dtype=torch.float16, device="cuda").zero_()
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def pick_strategy(device: torch.device, m: int, n: int) -> str:
    """native on sm_100+, dequant for large GEMMs where cuBLAS can take fp16 -> fp32, else fused."""
    if is_native_fp4(device):
        return "native"
    if min(m, n) >= DEQUANT_MIN_MN and _mm_fp32_out_supported(device.type):
        return "dequant"
    return "fused"


def _matmul_fp32(a16: torch.Tensor, b16: torch.Tensor) -> torch.Tensor:
    """fp32 a16 @ b16^T of exactly-decoded fp16 operands (products exact, fp32 accumulation)."""
    if _mm_fp32_out_supported(a16.device.type):
        return torch.mm(a16, b16.t(), out_dtype=torch.float32)
    return a16.float() @ b16.float().t()  # CPU (tests under the interpreter)


def nvfp4_gemm(
    a_data: torch.Tensor, a_scale: torch.Tensor, a_amax: torch.Tensor,
    b_data: torch.Tensor, b_scale: torch.Tensor, b_amax: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    *, strategy: str | None = None, fp8_convert: bool | None = None,
) -> torch.Tensor:
    """(A @ B^T) for NVFP4 operands given as (codes, block scales, amax): [M, N] in ``out_dtype``.

    strategy: None picks with :func:`pick_strategy`; "native" (tl.dot_scaled, sm_100+), "fused"
    (decode in the K loop + tl.dot) or "dequant" (decode both operands to fp16, cuBLAS, epilogue).
    fp8_convert: force the fused decode variant (tests); None picks from the device.
    """
    m, k = _check_operand("a", a_data, a_scale, a_amax)
    n, kb = _check_operand("b", b_data, b_scale, b_amax)
    if k != kb:
        raise ValueError(f"nvfp4_gemm: K mismatch, a is [{m}, {k}] and b is [{n}, {kb}]")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"nvfp4_gemm: out_dtype must be one of {OUT_DTYPES}; got {out_dtype}")
    devices = {t.device for t in (a_data, a_scale, a_amax, b_data, b_scale, b_amax)}
    if len(devices) != 1:
        raise ValueError(f"nvfp4_gemm: operands on different devices: {sorted(map(str, devices))}")
    dev = a_data.device
    strategy = pick_strategy(dev, m, n) if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"nvfp4_gemm: strategy must be one of {STRATEGIES}; got {strategy!r}")
    if strategy == "native" and INTERPRET:
        raise ValueError("nvfp4_gemm: strategy='native' (tl.dot_scaled) cannot run in the Triton interpreter, "
                         "which decodes the scales as E8M0")
    if m == 0 or n == 0 or k == 0:
        return a_data.new_zeros((m, n), dtype=out_dtype)
    if strategy == "dequant":
        a16 = dequantize(a_data, a_scale, a_amax, torch.float16, apply_global_scale=False)
        b16 = dequantize(b_data, b_scale, b_amax, torch.float16, apply_global_scale=False)
        return gemm_epilogue(_matmul_fp32(a16, b16), a_amax, b_amax, out_dtype)

    fp8_convert = has_fp8_convert(dev) if fp8_convert is None else fp8_convert
    c = a_data.new_empty((m, n), dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    kernel = _gemm_native if strategy == "native" else _gemm_emulated
    kernel[grid](
        a_data, a_scale.view(torch.uint8), a_amax.reshape(1), b_data, b_scale.view(torch.uint8), b_amax.reshape(1),
        c, m, n, k, a_data.stride(0), a_scale.stride(0), b_data.stride(0), b_scale.stride(0), c.stride(0), c.stride(1),
        NATIVE=strategy == "native", FP8_CVT=fp8_convert, **launch_options(),
    )
    return c
