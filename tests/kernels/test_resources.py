"""Kernel resources per architecture: bench/results/kernel_resources.json and the pruning built on it.

The JSON is written by bench/kernel_resources.py (every autotune config of every kernel, compiled for
sm_80, sm_90, sm_100 and sm_120 by Triton's bundled ptxas). These tests check that it is current (it
covers every config the code autotunes over, and a fresh compile reproduces its figures), that what a
launcher can run by default on each architecture fits shared memory and spills nothing, and that the
launchers prune, per device, the configs that would not fit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton

from ds_fp4.kernels import _resource_table, aot
from ds_fp4.kernels._launch import config_key, fitting_configs, launch_flags, measured_arch, variant_key

ROOT = Path(__file__).resolve().parents[2]
JSON = ROOT / "bench" / "results" / "kernel_resources.json"
SCRIPT = ROOT / "bench" / "kernel_resources.py"
GPU_CONFIGS = aot.autotuned_kernels()

# The GEMM each architecture runs unless a strategy is forced (gemm.pick_strategy): tl.dot_scaled on
# FP4 tensor cores from sm_100, decode-in-the-K-loop + tl.dot below.
DEFAULT_GEMM = {80: "gemm_emulated", 90: "gemm_emulated", 100: "gemm_native", 120: "gemm_native"}
OTHER_KERNELS = ("amax", "quantize_1x16", "quantize_16x16", "decode", "gemm_epilogue")


def _rows():
    return json.loads(JSON.read_text())["rows"]


def _expected_keys(arch):
    names = list(OTHER_KERNELS) + ["gemm_emulated"] + (["gemm_native"] if arch >= 100 else [])
    return {(n, config_key(c)) for n in names for c in GPU_CONFIGS[n]}


def test_every_kernel_has_a_gpu_autotune_list():
    assert set(GPU_CONFIGS) == set(OTHER_KERNELS) | {"gemm_emulated", "gemm_native"}
    assert all(len(v) > 1 for v in GPU_CONFIGS.values())  # Triton prunes only when there is a choice


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_json_covers_every_config_for_the_installed_triton(arch):
    rows = [r for r in _rows() if r["arch"] == arch and r["triton"] == triton.__version__]
    assert rows, (f"{JSON.name} has no rows for sm_{arch} under triton {triton.__version__}: "
                  f"run python {SCRIPT.relative_to(ROOT)} with this triton")
    for r in rows:
        assert set(r) >= {"kernel", "config", "arch", "triton", "regs", "spill_bytes", "smem_bytes", "smem_limit"}
        assert r["smem_limit"] == aot.SMEM_PER_BLOCK[arch]
        assert not r["errors"], f"{r['kernel']} {r['config']} does not compile for sm_{arch}: {r['errors'][0]}"
    missing = _expected_keys(arch) - {(r["kernel"], r["config"]) for r in rows}
    assert not missing, f"configs never measured on sm_{arch} (rerun {SCRIPT.name}): {sorted(missing)}"


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_what_runs_by_default_fits_shared_memory_and_spills_nothing(arch):
    """For every variant a launcher picks by default on this arch, the configs left after pruning (there
    is at least one, without the all-spill warning) need at most the arch's shared memory per block
    (99 KiB on sm_120) and spill no register, under every Triton version measured."""
    rows = {(r["kernel"], r["config"], r["triton"]): r for r in _rows() if r["arch"] == arch}
    versions = {t for _, _, t in rows}
    checked = 0
    for name, _fn, flags, _make in aot.launcher_variants(arch):
        if name.startswith("gemm_") and name != DEFAULT_GEMM[arch]:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "every config ... spills" fails the test
            kept = fitting_configs(name, GPU_CONFIGS[name], arch, aot.SMEM_PER_BLOCK[arch], flags)
        assert kept, (name, flags)
        for cfg in kept:
            for t in versions:
                r = rows[(name, config_key(cfg), t)]
                assert variant_key(flags) not in r["spilling_variants"], (name, flags, arch, t, r)
                assert r["smem_bytes"] <= r["smem_limit"], (name, arch, t, r)
        checked += 1
    assert checked > 40


def test_pruning_drops_what_does_not_fit_and_refuses_when_nothing_does():
    native = GPU_CONFIGS["gemm_native"]
    over = [c for c in native if _resource_table.MEASURED["gemm_native"][config_key(c)][120][0] > 101376]
    flags = {"FP8_CVT": True}
    assert over, "expected a native GEMM config over sm_120's 99 KiB (128x256x256, 3 stages)"
    kept = fitting_configs("gemm_native", native, 120, 101376, flags)
    assert kept and not set(map(config_key, over)) & set(map(config_key, kept))
    # The same configs fit sm_100's 227 KiB.
    on_sm100 = fitting_configs("gemm_native", native, 100, 232448, flags)
    assert set(map(config_key, over)) <= set(map(config_key, on_sm100))
    # A config never measured is kept: Triton's autotuner skips it if it fails to launch.
    extra = triton.Config({"BM": 16, "BN": 16, "BK": 256, "GROUP_M": 8}, num_warps=1, num_stages=1)
    assert extra in fitting_configs("gemm_native", [*native, extra], 120, 101376, flags)
    with pytest.raises(RuntimeError, match="no config of the gemm_native kernel fits sm_120"):
        fitting_configs("gemm_native", native, 120, 1024, flags)


def test_a_launch_is_looked_up_as_the_variant_that_was_measured():
    """launch_flags reads the variant off a launch's arguments; every variant it can name was measured."""
    x16, x32 = torch.empty(4, 16, dtype=torch.float16), torch.empty(4, 16)
    cases = {
        "amax": {"x_ptr": x16, "HADAMARD": True, "ROW_CONTIG": False},
        "quantize_1x16": {"x_ptr": x32, "HADAMARD": False, "STOCHASTIC": True, "ROW_CONTIG": True, "SCALE_UP": True},
        "quantize_16x16": {"x_ptr": x16, "HADAMARD": True, "STOCHASTIC": True, "WRITE_T": False, "SCALE_UP": False},
        "decode": {"out_ptr": x16, "GLOBAL": False},
        "gemm_epilogue": {"out_ptr": torch.empty(1, dtype=torch.bfloat16)},
        "gemm_native": {"FP8_CVT": True},
    }
    for name, args in cases.items():
        key = variant_key(launch_flags(name, args))
        assert any(key in keys for keys in _resource_table.VARIANTS[name].values()), (name, key)
    assert launch_flags("amax", {"x_ptr": x16, "HADAMARD": True, "ROW_CONTIG": False})["dtype"] == "bfloat16"
    assert launch_flags("quantize_1x16", {"x_ptr": x32}) is None  # incomplete: the worst case is used
    # sm_89 takes sm_80's figures, where the GEMM was measured without FP8_CVT: the worst case applies.
    cfgs = GPU_CONFIGS["gemm_emulated"]
    worst = fitting_configs("gemm_emulated", cfgs, 89, 101376, None)
    assert fitting_configs("gemm_emulated", cfgs, 89, 101376, {"FP8_CVT": True}) == worst


def test_all_spilling_keeps_what_fits_with_a_warning():
    """The emulated GEMM (not sm_120's default: that is the native one) spills in every config there."""
    cfgs = GPU_CONFIGS["gemm_emulated"]
    table = _resource_table.MEASURED["gemm_emulated"]
    if any(not table[config_key(c)][120][1] for c in cfgs):
        pytest.skip("some emulated GEMM config no longer spills on sm_120")
    with pytest.warns(RuntimeWarning, match="every config of the gemm_emulated kernel spills registers on sm_120"):
        kept = fitting_configs("gemm_emulated", cfgs, 120, 101376, {"FP8_CVT": True})
    assert len(kept) == len(cfgs)


@pytest.mark.parametrize("cc,arch", [(80, 80), (86, 80), (89, 80), (90, 90), (100, 100), (103, 100), (120, 120),
                                     (121, 120)])
def test_a_device_takes_the_figures_of_the_nearest_measured_arch_below(cc, arch):
    assert measured_arch(cc) == arch


def test_devices_older_than_ampere_are_refused():
    with pytest.raises(ValueError, match="below sm_80"):
        measured_arch(75)


def _bench_module(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # the module sets 0
    spec = importlib.util.spec_from_file_location("kernel_resources_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pruning_table_is_generated_from_the_json(monkeypatch):
    bench = _bench_module(monkeypatch)
    table = ROOT / "ds_fp4" / "kernels" / "_resource_table.py"
    expected = bench.table_source(_rows(), bench.measured_variants())
    assert table.read_text() == expected, f"rerun python {SCRIPT.relative_to(ROOT)}"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The bench script run now, for sm_120's native GEMM and the epilogue (13 compiles, ~15 s)."""
    out = tmp_path_factory.mktemp("resources") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "120", "--kernel", "gemm_native", "--kernel",
                           "gemm_epilogue", "--no-table", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


def test_a_fresh_compile_reproduces_the_committed_figures(fresh):
    stdout, rows = fresh
    assert "do not fit or spill" in stdout
    committed = {(r["kernel"], r["config"], r["arch"]): r for r in _rows() if r["triton"] == triton.__version__}
    assert {r["kernel"] for r in rows} == {"gemm_native", "gemm_epilogue"} and {r["arch"] for r in rows} == {120}
    for r in rows:
        c = committed[(r["kernel"], r["config"], r["arch"])]
        got = (r["regs"], r["spill_bytes"], r["smem_bytes"])
        assert got == (c["regs"], c["spill_bytes"], c["smem_bytes"]), (r["kernel"], r["config"], got, c)
