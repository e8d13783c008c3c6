"""Ahead-of-time compilation of the NVFP4 kernels for GPU targets, without a GPU.

Run as a script (``python -m tests.kernels.compile_targets OUT.json``) in a process where
TRITON_INTERPRET is 0: the test session itself runs with the interpreter switched on, and then
@triton.jit hands out interpreter functions that cannot be compiled. Triton's frontend, its MLIR
passes, LLVM and the bundled ptxas all run on the CPU, so each kernel goes through the whole
pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin) for the requested architecture. The script writes,
per compiled variant, what the tests check: the MMA instructions found in the PTX and whether ptxas
produced a cubin.
"""

from __future__ import annotations

import json
import os
import re
import sys

from ds_fp4.kernels.aot import compile_kernel, gemm_args, quantize_args


def _summary(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    return {
        "tcgen05_mma": sorted(set(re.findall(r"tcgen05\.mma[\w.:]*", ptx))),
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async[\w.:]*", ptx))),
        "mma_sync": sorted(set(re.findall(r"\bmma\.sync[\w.:]*", ptx))),
        "div_rn": len(re.findall(r"div\.rn\.f32", ptx)),
        "div_approx": len(re.findall(r"div\.(?:full|approx)\.f32", ptx)),
        "cubin_bytes": len(kernel.asm.get("cubin", b"")),
        "local_alloc": kernel.asm["ttgir"].count("ttg.local_alloc"),
        "convert_layout": kernel.asm["ttgir"].count("ttg.convert_layout"),
    }


def variants():
    """(name, arch, jit function, args, divisible) for every variant the tests compile."""
    from ds_fp4.kernels import amax, decode, gemm, gemm_epilogue, quantize_1x16, quantize_16x16

    gemm_fn = gemm._nvfp4_gemm_kernel
    div = ("M", "K", "N", "stride_am", "stride_asm", "stride_bn", "stride_bsn", "stride_cm",
           "stride_xm", "stride_xk")
    q1x16 = quantize_1x16._quantize_1x16_kernel.fn
    out = [
        ("gemm_native_sm100", 100, gemm_fn, gemm_args(True, True, 128, 128, 256), div),
        ("gemm_emulated_sm90", 90, gemm_fn, gemm_args(False, True), div),
        ("gemm_emulated_nofp8_sm80", 80, gemm_fn, gemm_args(False, False), div),
        ("amax_rht_bf16_strided_sm90", 90, amax._amax_kernel.fn,
         quantize_args("amax", "bf16", True, HADAMARD=True), div),
        ("amax_bf16_contig_sm90", 90, amax._amax_kernel.fn,
         quantize_args("amax", "bf16", False, HADAMARD=False), div),
        ("quantize_1x16_rht_sr_bf16_contig_sm90", 90, q1x16,
         quantize_args("quantize_1x16", "bf16", False, HADAMARD=True, STOCHASTIC=True), div),
        ("quantize_1x16_bf16_contig_sm90", 90, q1x16,
         quantize_args("quantize_1x16", "bf16", False, HADAMARD=False, STOCHASTIC=False), div),
        ("quantize_1x16_rht_sr_bf16_strided_sm90", 90, q1x16,
         quantize_args("quantize_1x16", "bf16", True, HADAMARD=True, STOCHASTIC=True), div),
        ("quantize_1x16_sr_scale_up_fp32_contig_sm90", 90, q1x16,  # the NVFP4 communication variant
         quantize_args("quantize_1x16", "fp32", False, HADAMARD=False, STOCHASTIC=True, SCALE_UP=True), div),
        ("quantize_1x16_fp32_contig_sm80", 80, q1x16,
         quantize_args("quantize_1x16", "fp32", False, HADAMARD=False, STOCHASTIC=True), div),
        ("decode_fp16_sm90", 90, decode._dequantize_kernel.fn,
         {"data_ptr": "*u8", "scale_ptr": "*u8", "amax_ptr": "*fp32", "out_ptr": "*fp16", "R": "i32", "K": "i32",
          "stride_dr": "i32", "stride_sr": "i32", "stride_or": "i32", "GLOBAL": False, "BR": 32, "BK": 256},
         ("R", "K", "stride_dr", "stride_sr", "stride_or")),
        ("gemm_epilogue_bf16_sm90", 90, gemm_epilogue._gemm_epilogue_kernel.fn,
         {"acc_ptr": "*fp32", "a_amax_ptr": "*fp32", "b_amax_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32",
          "BLOCK": 4096}, ("n",)),
    ]
    out.append(("quantize_weight_fp32_sm90", 90, quantize_16x16._quantize_16x16_kernel.fn,
                quantize_args("quantize_16x16", "fp32", False, HADAMARD=False, STOCHASTIC=False, WRITE_T=True), div))
    out.append(("quantize_16x16_rht_sr_bf16_sm80", 80, quantize_16x16._quantize_16x16_kernel.fn,
                quantize_args("quantize_16x16", "bf16", False, HADAMARD=True, STOCHASTIC=True, WRITE_T=False), div))
    out.append(("quantize_16x16_sr_scale_up_fp32_sm90", 90, quantize_16x16._quantize_16x16_kernel.fn,
                quantize_args("quantize_16x16", "fp32", False, HADAMARD=False, STOCHASTIC=True, WRITE_T=False,
                               SCALE_UP=True), div))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: interpreter functions cannot be compiled")
    only = set(argv[1:])
    results = {}
    for name, arch, fn, args, div in variants():
        if only and name not in only:
            continue
        try:
            kernel, _report = compile_kernel(fn, args, arch, divisible=div)
            results[name] = {"ok": True, **_summary(kernel)}
            dump = os.environ.get("DS_FP4_DUMP_ASM")
            if dump:
                os.makedirs(dump, exist_ok=True)
                for ext in ("ttgir", "ptx"):
                    with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                        f.write(kernel.asm[ext])
                with open(os.path.join(dump, f"{name}.cubin"), "wb") as f:
                    f.write(kernel.asm["cubin"])
        except Exception as exc:  # reported per variant; the test shows the message
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    with open(argv[0], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
