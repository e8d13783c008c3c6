"""Compile the kernels for GPU targets without a GPU, and check what Triton emits.

* sm_100: the native GEMM (tl.dot_scaled with E4M3 scales) must lower to the block-scaled FP4 MMA,
  ``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16`` (one E4M3 scale per 16 elements: NVFP4).
* sm_90 / sm_80: the emulated GEMM must use wgmma / mma.sync on fp16, and the quantize kernels must
  compile (this catches code that only works in the interpreter) with IEEE divisions only.

The compilation runs in a subprocess with TRITON_INTERPRET=0 (tests/kernels/compile_targets.py): in
this process the interpreter is on and @triton.jit returns uncompilable interpreter functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("compile_targets.py")


def _toolchain_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as nvidia
    except Exception as exc:  # pragma: no cover - depends on the installed triton
        return f"triton's NVIDIA backend cannot be imported: {exc}"
    try:
        ptxas = nvidia.get_ptxas(100).path
    except Exception:  # other triton versions locate ptxas differently; let the compile say
        return None
    if not ptxas or not os.path.exists(ptxas):  # pragma: no cover
        return f"triton {triton.__version__}: ptxas for sm_100 not found ({ptxas!r})"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = _toolchain_missing()
    if reason:
        pytest.skip(f"cannot compile for GPU targets here: {reason}")
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _ok(results, name):
    r = results[name]
    assert r["ok"], f"{name} failed to compile: {r.get('error')}"
    assert r["cubin_bytes"] > 0, f"{name}: ptxas produced no cubin"
    return r


def test_native_gemm_lowers_to_block_scaled_fp4_mma_on_sm100(compiled):
    r = _ok(compiled, "gemm_native_sm100")
    # One E4M3 scale per 16 FP4 values: Triton 3.9 spells it "block_scale.block16", 3.6 "block_scale.scale_vec::4X"
    # (four scales per 64-value K step): the same instruction.
    assert any("kind::mxf4nvf4" in i and ("block_scale.block16" in i or "block_scale.scale_vec::4X" in i)
               for i in r["tcgen05_mma"]), r["tcgen05_mma"]
    assert not r["wgmma"] and not r["mma_sync"]


def test_emulated_gemm_uses_fp16_tensor_cores_on_sm90_and_sm80(compiled):
    r = _ok(compiled, "gemm_emulated_sm90")
    assert any(".f32.f16.f16" in i for i in r["wgmma"]) and not r["tcgen05_mma"], r
    r = _ok(compiled, "gemm_emulated_nofp8_sm80")
    assert any("f16.f16" in i for i in r["mma_sync"]), r


@pytest.mark.parametrize("name", [
    "amax_rht_bf16_strided_sm90", "amax_bf16_contig_sm90", "quantize_1x16_bf16_contig_sm90",
    "quantize_1x16_rht_sr_bf16_strided_sm90", "quantize_1x16_rht_sr_bf16_contig_sm90",
    "quantize_1x16_fp32_contig_sm80", "quantize_weight_fp32_sm90", "quantize_16x16_rht_sr_bf16_sm80",
    "quantize_1x16_sr_scale_up_fp32_contig_sm90", "quantize_16x16_sr_scale_up_fp32_sm90",
    "decode_fp16_sm90", "gemm_epilogue_bf16_sm90",
])
def test_quantize_and_helper_kernels_compile_with_ieee_division(compiled, name):
    r = _ok(compiled, name)
    assert r["div_approx"] == 0, f"{name} uses an approximate division"
