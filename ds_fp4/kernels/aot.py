"""Compile the kernels of this package for a GPU architecture on a machine without a GPU.

Triton's frontend, its MLIR passes, LLVM and the ptxas bundled with the triton wheel all run on the
CPU, so a kernel goes through the whole pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin) for any
target. What a launch would need is known at that point: Triton's dynamic shared memory
(``metadata.shared``, the figure Triton checks against the device at launch), and from ptxas's
verbose report the registers per thread, the spill stores and any static shared memory.

Used by ``bench/kernel_resources.py`` (every variant a launcher can pick, on every target) and by
tests/kernels/compile_targets.py (what the PTX contains). Must run with TRITON_INTERPRET=0: under the
interpreter @triton.jit hands out functions that cannot be compiled.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes. sm_86 and sm_89
# (consumer Ampere / Ada, L4, L40S) have the smaller limit of sm_120.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376,
                  121: 101376}
# The targets measured by bench/kernel_resources.py: Ampere, Hopper, datacenter and consumer Blackwell.
ARCHS = (80, 90, 100, 120)

_DIVISIBLE = ("M", "K", "N", "R", "n", "stride_am", "stride_asm", "stride_bn", "stride_bsn", "stride_cm",
              "stride_xm", "stride_xk", "stride_dr", "stride_sr", "stride_or")
_TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compile_kernel(jit_fn, args: dict, arch: int, *, num_warps: int = 4, num_stages: int = 3,
                   divisible=_DIVISIBLE):
    """Compile ``jit_fn`` for sm_<arch>; returns (compiled kernel, ptxas -v report).

    args: name -> type string ('*u8', 'i32', ...) for runtime arguments, any other value for a
    constexpr. Pointers and the integer arguments named in ``divisible`` are declared 16-divisible, as
    Triton specializes them at a real launch. The kernel is always compiled (Triton's cache skipped),
    so the report is the one ptxas gave for exactly the cubin Triton would load, with Triton's flags.
    """
    if interpreter_on():
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET=0: interpreter functions cannot be compiled")
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, compile

    names = jit_fn.arg_names
    mismatch = set(names) ^ set(args)
    if mismatch:
        raise ValueError(f"{jit_fn.__name__}: arguments do not match the kernel: {sorted(mismatch)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = args[name]
        if isinstance(value, str) and (value.startswith("*") or value[0] in "iuf"):
            signature[name] = value
            if value.startswith("*") or (name in divisible and value[0] in "iu"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    src = ASTSource(jit_fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"enable_fp_fusion": False, "num_warps": num_warps, "num_stages": num_stages}
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        kernel = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, log.getvalue()


def parse_ptxas(report: str) -> dict:
    """registers, spill stores/loads, stack frame and static shared memory from a ptxas -v report."""
    def grab(pattern):
        m = re.search(pattern, report)
        return int(m.group(1)) if m else 0

    if not re.search(r"Used \d+ registers", report):
        raise ValueError(f"not a ptxas -v report: {report[:500]!r}")
    return {"regs": grab(r"Used (\d+) registers"), "spill_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"), "stack_bytes": grab(r"(\d+) bytes stack frame"),
            "static_smem_bytes": grab(r"(\d+) bytes smem")}


def resources(kernel, report: str, arch: int) -> dict:
    """What launching ``kernel`` (compiled for sm_<arch> by compile_kernel, with its report) needs."""
    usage = parse_ptxas(report)
    shared = int(kernel.metadata.shared)
    return {**usage, "smem_bytes": shared + usage["static_smem_bytes"], "smem_limit": SMEM_PER_BLOCK[arch]}


# --- the kernels and the variants their launchers can pick -------------------------------------------

def autotuned_kernels() -> dict:
    """Every autotuned kernel, by name, with the configs it autotunes over on a GPU (whatever mode this
    process runs in): importing the kernel modules registers them (_launch.autotune)."""
    from . import amax, decode, gemm, gemm_epilogue, quantize_1x16, quantize_16x16  # noqa: F401
    from ._launch import GPU_CONFIGS

    return GPU_CONFIGS


def gemm_args(native: bool, fp8: bool, bm=128, bn=128, bk=128, group_m=8) -> dict:
    return {
        "a_ptr": "*u8", "as_ptr": "*u8", "a_amax_ptr": "*fp32", "b_ptr": "*u8", "bs_ptr": "*u8",
        "b_amax_ptr": "*fp32", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_asm": "i32", "stride_bn": "i32", "stride_bsn": "i32",
        "stride_cm": "i32", "stride_cn": 1,
        "NATIVE": native, "FP8_CVT": fp8, "BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m,
    }


def quantize_args(kernel_name: str, dtype: str, strided: bool, *, HADAMARD=False, STOCHASTIC=False,
                  SCALE_UP=False, WRITE_T=False, **meta) -> dict:
    """Arguments of the amax / quantize_1x16 / quantize_16x16 kernels; meta: the config's block sizes."""
    common = {"x_ptr": f"*{dtype}", "amax_bits_ptr": "*i32", "M": "i32", "K": "i32",
              "stride_xm": 1 if strided else "i32", "stride_xk": "i32" if strided else 1,
              "HADAMARD": HADAMARD, "SIGNS": 0x0E8B if HADAMARD else 0}
    if kernel_name == "amax":
        return {**common, "ROW_CONTIG": not strided, "BM": 32, "G": 16, **meta}
    out = {**common, "data_ptr": "*u8", "scale_ptr": "*u8", "seed": "i64", "STOCHASTIC": STOCHASTIC,
           "SCALE_UP": SCALE_UP}
    if kernel_name == "quantize_1x16":
        return {**out, "data_ptr": "*i32", "ROW_CONTIG": not strided, "BM": 32, "G": 16, **meta}
    return {**out, "data_t_ptr": "*u8", "scale_t_ptr": "*u8", "WRITE_T": WRITE_T, "BM": 32, "BK": 128, **meta}


def _quantize_maker(kernel_name: str, dtype: str, flags: dict):
    flags = {k: v for k, v in flags.items() if k != "dtype"}
    strided = flags.pop("strided", False)
    return lambda cfg: quantize_args(kernel_name, _TRITON_DTYPE[dtype], strided, **flags, **cfg)


def _flag_grid(**choices):
    keys = list(choices)
    for values in itertools.product(*(choices[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def launcher_variants(arch: int):
    """Every (kernel, flags) a launcher of this package can pick on sm_<arch>, without the config.

    Yields (kernel_name, jit_fn, flags, make_args) with make_args(config_kwargs) -> compile args. The
    flags are those ``_launch.launch_flags`` reads off a real launch, so measured figures can be looked
    up per variant. Input dtypes: fp32 and bf16 (fp16 is looked up as bf16: a 16-bit load and a convert).
    """
    from . import amax, decode, gemm, gemm_epilogue, quantize_1x16, quantize_16x16

    fp8 = arch >= 89
    yield ("gemm_emulated", gemm._nvfp4_gemm_kernel, {"FP8_CVT": fp8},
           lambda cfg: gemm_args(False, fp8, cfg["BM"], cfg["BN"], cfg["BK"], cfg["GROUP_M"]))
    if arch >= 100:
        yield ("gemm_native", gemm._nvfp4_gemm_kernel, {"FP8_CVT": True},
               lambda cfg: gemm_args(True, True, cfg["BM"], cfg["BN"], cfg["BK"], cfg["GROUP_M"]))
    quantizers = (("quantize_1x16", quantize_1x16._quantize_1x16_kernel.fn, "strided"),
                  ("quantize_16x16", quantize_16x16._quantize_16x16_kernel.fn, "WRITE_T"))
    for dtype in ("float32", "bfloat16"):
        for f in _flag_grid(HADAMARD=(False, True), strided=(False, True)):
            yield ("amax", amax._amax_kernel.fn, {"dtype": dtype, **f}, _quantize_maker("amax", dtype, f))
        for name, fn, third in quantizers:
            for f in _flag_grid(HADAMARD=(False, True), STOCHASTIC=(False, True), **{third: (False, True)}):
                f = {"dtype": dtype, **f, "SCALE_UP": False}
                yield (name, fn, f, _quantize_maker(name, dtype, f))
    for name, fn, third in quantizers:  # NVFP4 gradient communication: fp32, stochastic, scaled up, no RHT
        f = {"dtype": "float32", "HADAMARD": False, "STOCHASTIC": True, third: False, "SCALE_UP": True}
        yield (name, fn, f, _quantize_maker(name, "float32", f))
    for out in ("float32", "float16", "bfloat16"):
        for glob in (False, True):
            yield ("decode", decode._dequantize_kernel.fn, {"out": out, "GLOBAL": glob},
                   lambda cfg, out=out, glob=glob: {
                       "data_ptr": "*u8", "scale_ptr": "*u8", "amax_ptr": "*fp32", "out_ptr": f"*{_TRITON_DTYPE[out]}",
                       "R": "i32", "K": "i32", "stride_dr": "i32", "stride_sr": "i32", "stride_or": "i32",
                       "GLOBAL": glob, **cfg})
        yield ("gemm_epilogue", gemm_epilogue._gemm_epilogue_kernel.fn, {"out": out},
               lambda cfg, out=out: {"acc_ptr": "*fp32", "a_amax_ptr": "*fp32", "b_amax_ptr": "*fp32",
                                     "out_ptr": f"*{_TRITON_DTYPE[out]}", "n": "i32", **cfg})
