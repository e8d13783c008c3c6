"""ds_fp4.selftest: it passes where the numbers are right, and fails, saying why, where a kernel is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ds_fp4
from ds_fp4 import kernels, reference
from ds_fp4 import selftest as selftest_module
from ds_fp4.selftest import selftest

_CPU_KERNELS = kernels.available(torch.device("cpu"))
TRITON = pytest.mark.skipif(not _CPU_KERNELS[0], reason=f"Triton kernels cannot run on CPU here: {_CPU_KERNELS[1]}")


def _zeroing_stochastic(quantize):
    """``quantize`` whose stochastic-rounding output is all-zero codes, as TE #3281's kernel on sm_120."""

    def broken(x2d, args):
        data, scale, amax = quantize(x2d, args)
        return (torch.zeros_like(data) if args.stochastic else data), scale, amax

    return broken


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
def test_selftest_passes_on_cpu(backend):
    result = selftest("cpu", backend)
    assert result.ok, str(result)
    assert result.backend == backend and result.reason == ""
    assert set(result.checks) == {"quantize", "stochastic", "linear"}
    assert result.checks["quantize"]["cases"] == 28
    assert abs(result.checks["stochastic"]["z"]) < 5 and result.checks["stochastic"]["nonzero_fraction"] > 0.9
    linear = result.checks["linear"]
    assert all(v >= 40 for v in linear["sqnr_vs_reference_db"].values())
    assert all(8 <= v <= 30 for v in linear["sqnr_vs_unquantized_db"].values())  # NVFP4's own error
    assert "passed on cpu" in str(result)


@TRITON
def test_selftest_fails_with_a_clear_reason_when_the_sr_kernel_zeroes_its_output(monkeypatch):
    monkeypatch.setattr(kernels, "quantize", _zeroing_stochastic(kernels.quantize))
    result = selftest("cpu", "triton")
    assert not result.ok
    assert result.checks["quantize"]["ok"]  # round-to-nearest is untouched
    assert not result.checks["stochastic"]["ok"]
    assert "mostly zero codes" in result.reason and "TE #3281" in result.reason
    assert result.checks["stochastic"]["nonzero_fraction"] < 0.5
    assert "FAIL stochastic" in str(result)


@TRITON
def test_a_kernel_that_differs_from_the_reference_or_crashes_fails(monkeypatch):
    original = kernels.quantize

    def off_by_one_scale(x2d, args):
        data, scale, amax = original(x2d, args)
        bumped = scale.view(torch.uint8).clone()
        bumped[0, 0] += 1
        return data, bumped.view(scale.dtype), amax

    monkeypatch.setattr(kernels, "quantize", off_by_one_scale)
    result = selftest("cpu", "triton")
    assert not result.checks["quantize"]["ok"] and "differs from the torch reference: scale" in result.reason

    def crash(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(kernels, "quantize_weight", crash)
    result = selftest("cpu", "triton")
    assert not result.ok and any("raised RuntimeError: out of shared memory" in c["reason"]
                                 for c in result.checks.values())


def test_initialize_refuses_to_train_when_the_selftest_fails_and_says_how_to_override(monkeypatch):
    monkeypatch.setattr(reference, "quantize", _zeroing_stochastic(reference.quantize))
    monkeypatch.setattr(selftest_module, "_cache", {})
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(RuntimeError) as err:
        ds_fp4.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "nvfp4": {}})
    message = str(err.value)
    assert "self-test FAILED on cpu" in message and "mostly zero codes" in message
    assert '"selftest": false' in message
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], ds_fp4.NVFP4Linear)  # untouched


def test_selftest_leaves_torchs_random_state_as_it_was():
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    assert selftest("cpu", "torch").ok
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_result_is_cached_per_process_for_initialize():
    first = selftest("cpu", "torch", cached=True)
    assert selftest("cpu", "torch", cached=True) is first
    assert selftest("cpu", "torch") is not first


def test_cli_prints_json_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "ds_fp4.selftest", "--device", "cpu", "--backend", "torch", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["ok"] and out["backend"] == "torch" and out["seconds"] > 0 and out["warm_seconds"] > 0
