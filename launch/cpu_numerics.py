"""Run CPU training that gives the same bits on any x86-64 CPU: the environment that pins the numerics.

On CPU, torch's float results depend on the machine. Each of these sums or rounds differently on another
CPU, and stochastic rounding turns a last-bit difference into a different loss curve within a few steps
(the golden run moved by 0.16 in loss between ATen's AVX2 and default builds; docs/trainer.md):
  * ATen's own kernels (reductions, softmax, norms, elementwise math, its bf16 GEMM fallback) are compiled
    once per capability (default, avx2, avx512) and dispatched by the CPU; ``ATEN_CPU_CAPABILITY`` caps it;
  * MKL's GEMMs (fp32, and the bf16 ones torch hands it) pick a code path per CPU; ``MKL_CBWR`` fixes it;
  * oneDNN runs torch's bf16 GEMMs when the CPU has AVX-512 (torch asks oneDNN whether bf16 is supported,
    and oneDNN answers within ``ONEDNN_MAX_CPU_ISA``); elsewhere they fall back to MKL or ATen;
  * MKL's vector math, which torch uses for ``sqrt`` (and ``pow(x, 0.5)``) of float tensors, rounds per
    CPU, and no variable pins it: seen, 20% of float32 square roots one ulp off on one CPU and none on
    another, with MKL_CBWR set. The unfused torch AdamW and DeepSpeed's gradient-norm clipping go through
    it; torch's fused AdamW (``"fused": true`` in the optimizer params) does not, and neither does ds_fp4.

:data:`PORTABLE_CPU_ENV` caps the first three at a level every x86-64 CPU has, with one thread per
process. With it, and with fused AdamW and no gradient clipping, the golden run gave the same bits natively
on an AVX2 CPU and, under qemu's user-mode emulator, on an emulated Haswell (AVX2, FMA) and Nehalem (SSE4.2,
no FMA): bench/cpu_numerics.py. It must be in the environment before the process starts (the libraries
read it once), and it costs speed: ATen's scalar build is slower than its AVX2 one.
"""

from __future__ import annotations

import os
import platform

PORTABLE_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's baseline x86-64 build, on every CPU
    "MKL_CBWR": "COMPATIBLE,STRICT",  # MKL's SSE2 code path, bitwise reproducible whatever the alignment
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # no oneDNN bf16 GEMMs: torch uses its ATen fallback everywhere
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""Set these before starting the ranks (e.g. ``env $(python -m launch.cpu_numerics) make train``)."""


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (what decides the unpinned numerics)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    widest = next((isa for isa in ("avx512f", "avx2", "avx", "sse4_2") if isa in flags), "baseline")
    return f"{name} ({widest})"


def is_pinned(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in PORTABLE_CPU_ENV.items())


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in PORTABLE_CPU_ENV.items()))
