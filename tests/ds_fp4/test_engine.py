"""ds_fp4.initialize on real DeepSpeed engines, and the NVFP4 collectives alone: 2-3 gloo ranks started by
torchrun (engine_worker.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds_fp4
from ds_fp4 import comm, deepspeed_patches
from ds_fp4.engine import NVFP4Config

WORKER = Path(__file__).with_name("engine_worker.py")


def run_scenario(name: str, out_dir: Path, world: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(WORKER), name, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_scenario(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("grad_comm", ["none", "nvfp4"])
def test_every_stage_trains_with_identical_parameters_on_all_ranks(results, stage, grad_comm):
    ranks = results("train")
    run = [r[f"stage{stage}-{grad_comm}"] for r in ranks]
    losses = run[0]["losses"] + run[1]["losses"]
    assert sum(losses[12:16] + losses[28:32]) < 0.75 * sum(losses[0:4] + losses[16:20])
    assert run[0]["digest"] == run[1]["digest"], "ranks diverged"
    assert run[0]["converted"] == 3


@pytest.mark.parametrize("variant", ["stage2-nvfp4-use_multi_rank_bucket_allreduce=False",
                                     "stage1-nvfp4-reduce_scatter=False", "stage3-weight_comm"])
def test_other_reduction_paths_and_weight_comm_train(results, variant):
    run = [r[variant] for r in results("train")]
    assert run[0]["digest"] == run[1]["digest"]
    losses = run[0]["losses"]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert run[0]["stats"]["grad_bytes_sent"] > 0


def test_nvfp4_grad_comm_stays_close_to_exact_communication(results):
    """Same seed, same data: after 16 steps the NVFP4-communicated run is within 10% of the exact one
    (this tiny model is entirely NVFP4, and each step's gradient carries ~20% relative SR noise)."""
    for stage in (0, 1, 2, 3):
        exact = results("train")[0][f"stage{stage}-none"]["losses"]
        fp4 = results("train")[0][f"stage{stage}-nvfp4"]["losses"]
        assert abs(sum(fp4[-4:]) - sum(exact[-4:])) < 0.10 * sum(exact[-4:])


def test_gradient_bytes_are_at_most_0_30_of_bf16(results):
    for name, run in results("train")[0].items():
        stats = run["stats"]
        if name.endswith("-none"):
            assert stats["grad_bytes_sent"] == 0
            continue
        ratio = stats["grad_bytes_sent"] / stats["grad_bytes_bf16"]
        assert 0.25 < ratio <= 0.30, (name, ratio)
        # fp32 training communicates fp32 gradients: the configured-dtype baseline is twice bf16.
        assert stats["grad_bytes_baseline"] == 2 * stats["grad_bytes_bf16"]
    weights = results("train")[0]["stage3-weight_comm"]["stats"]
    assert 0 < weights["weight_bytes_sent"] <= 0.30 * weights["weight_bytes_bf16"]


def test_disabled_recipe_without_grad_comm_is_plain_deepspeed_bit_for_bit(results):
    for rank in results("plain"):
        for stage, run in rank.items():
            assert run["nvfp4_layers"] == 0
            assert run["plain"] == run["ds_fp4"], stage  # exact float equality, step by step


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nvfp4_reduced_gradient_is_unbiased(results, stage):
    """64 repetitions of one step (Adam lr 0 keeps the weights fixed). If the estimator is unbiased,
    the mean's error shrinks like 1/sqrt(64) and the summed error is consistent with zero."""
    run = results("unbiased")[0][f"stage{stage}"]
    exact, mean, first, std = (torch.tensor(run[k], dtype=torch.float64) for k in ("exact", "mean", "first", "std"))
    reps = run["reps"]
    single = (first - exact).norm() / exact.norm()
    averaged = (mean - exact).norm() / exact.norm()
    assert 0.02 < single < 0.5
    assert averaged < 2.0 * single / math.sqrt(reps)
    # The total signed error, and its projection on the gradient, are within 4 standard errors of 0.
    var_of_mean = std.pow(2) / reps
    z_sum = (mean - exact).sum() / var_of_mean.sum().sqrt()
    z_dir = ((mean - exact) * exact).sum() / (var_of_mean * exact.pow(2)).sum().sqrt()
    assert abs(z_sum) < 4 and abs(z_dir) < 4, (z_sum, z_dir)


def test_zero3_weight_comm_quantizes_forward_gathers_and_keeps_checkpoint_gathers_exact(tmp_path):
    ranks = run_scenario("weight_gather", tmp_path, world=3)
    for rank in ranks:
        layers = {k: v for k, v in rank.items() if k not in ("losses", "stats", "digest")}
        assert len(layers) == 3
        assert any(v["shard_numel"] % 16 for v in layers.values())  # padded blocks at the shard ends
        for name, v in layers.items():
            assert v["checkpoint_gather_exact"], name
            assert 0.01 < v["forward_rel_error"] < 0.2, (name, v)  # NVFP4 per shard: close, not equal
        assert all(math.isfinite(x) for x in rank["losses"])
        assert 0 < rank["stats"]["weight_bytes_sent"] <= 0.30 * rank["stats"]["weight_bytes_bf16"]
    assert ranks[0]["digest"] == ranks[1]["digest"] == ranks[2]["digest"]  # the same model on every rank


def test_collectives_reduce_close_to_exact_and_count_their_bytes_exactly(tmp_path):
    """comm.py on 3 ranks, where shards do not line up with ranks or blocks. A packed row of k elements
    (k a multiple of 16) is k/2 code bytes + k/16 scale bytes + 4 amax bytes; every rank sends W-1 rows."""
    ranks = run_scenario("collectives", tmp_path, world=3)
    for rank, r in enumerate(ranks):
        # 1000 fp32 elements: shards of 334 (k = 336, rows of 193 bytes); 2 x 334 elements x 4 or 2 bytes.
        assert r["reduce_scatter"]["bytes"] == [2 * 193, 2 * 334 * 4, 2 * 334 * 2, 1]
        assert r["reduce_scatter"]["numel"] == 334 and r["reduce_scatter"]["padding"] == [0.0] * (2 if rank == 2 else 0)
        # The same in bf16, twice: the reduce-scatter, then the all-gather of the reduced 334-element shards.
        assert r["all_reduce"]["bytes"] == [4 * 193, 4 * 334 * 2, 4 * 334 * 2, 2]
        # Reduce to rank 1: the others send all 1000 elements (k = 1008, 571 bytes), rank 1 sends nothing.
        assert r["reduce"]["bytes"] == ([0, 0, 0, 1] if rank == 1 else [571, 1000 * 4, 1000 * 2, 1])
        # Weights: 37 elements in bf16 (k = 48, 31 bytes) to each of 2 other ranks.
        assert r["all_gather"]["bytes"] == [2 * 31, 2 * 37 * 2, 2 * 37 * 2, 1]
        # Coalesced tensors of 100, 5, 48, 1: chunks of 34 + 2 + 16 + 1 = 53 elements (k = 64, 40 bytes).
        assert r["coalesced"]["bytes"] == [2 * 40, 2 * 53 * 4, 2 * 53 * 2, 1]
        assert r["coalesced"]["numels"] == [[34, 2, 16, 1], [34, 2, 16, 0], [32, 1, 16, 0]][rank]
        assert r["seeds_drawn"] == 5  # one per stochastic-rounding quantization; the weight gather rounds to nearest
        for name in ("reduce_scatter", "all_reduce", "all_gather", "coalesced") + (("reduce",) if rank == 1 else ()):
            assert 0.05 < r[name]["rel_error"] < 0.3, (rank, name, r[name])  # NVFP4: close, never exact


def test_zero3_keeps_its_memory_saving(results):
    for rank in results("zero3_memory"):
        assert rank["local_numel_under_init"] == [0], "zero.Init should leave only empty local partitions"
        assert rank["converted"] == 14
        assert all(rank["released_after_forward"]), "DeepSpeed could not release the gathered weights"
        assert rank["violations"] == [], rank["violations"][:5]
        assert rank["params_saved"] > 0  # the Parameter itself goes into apply (docs/design.md §5)
        assert rank["losses"][-1] < rank["losses"][0]
        # The Function's backward gathered the released weight itself and released it again.
        assert rank["status_before_backward"] == "NOT_AVAILABLE" == rank["status_after_backward"]
        assert rank["dgrad_rel_err"] < 0.3


# Configuration errors: no processes needed, they are raised before DeepSpeed starts. -------------------
def _cfg(stage=0, **nvfp4):
    return {"train_batch_size": 2, "zero_optimization": {"stage": stage}, "nvfp4": nvfp4}


@pytest.mark.parametrize(
    "config, match",
    [
        (_cfg(bogus=1), r"unknown key\(s\) \['bogus'\] in the \"nvfp4\" config section; valid keys: .*grad_comm"),
        (_cfg(2, weight_comm="nvfp4"), "weight_comm=\"nvfp4\" compresses ZeRO-3 .*stage is 2;"),
        # Each message names the key as nvfp4.<key>, what it must be, and the value given.
        (_cfg(grad_comm="int4"), r"nvfp4\.grad_comm must be .*'nvfp4'.*'none'.*; got 'int4'"),
        (_cfg(stats_interval=-1), r"nvfp4\.stats_interval must be .*(>= 0|greater than or equal to 0); got -1"),
        (_cfg(keep_last_blocks="two"), r"nvfp4\.keep_last_blocks must be .*integer.*; got 'two'"),
        ({**_cfg(grad_comm="nvfp4"), "fp16": {"enabled": True}}, "not supported with fp16 dynamic loss scaling"),
        ({"train_batch_size": 2, "zero_optimization": {"stage": 3, "zero_quantized_weights": True},
          "nvfp4": {"weight_comm": "nvfp4"}}, "zero_quantized_weights"),
        ({"train_batch_size": 2, "zero_optimization": {"stage": 2, "zero_quantized_gradients": True},
          "nvfp4": {"grad_comm": "nvfp4"}}, "zero_quantized_gradients"),
    ],
)
def test_bad_configs_fail_before_deepspeed_starts(config, match):
    with pytest.raises(ValueError, match=match):
        ds_fp4.initialize(model=torch.nn.Linear(16, 16), config=config)


def test_deepspeed_moe_experts_are_refused_with_nvfp4_gradients_and_the_alternative_named():
    """DeepSpeed's own MoE layer (expert-parallel, allreduce=False parameters): NVFP4 gradient communication
    would not reach its experts, so initialize refuses before DeepSpeed starts; without it, it is not refused."""
    from deepspeed.moe.layer import MoE

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), MoE(hidden_size=32, expert=torch.nn.Linear(32, 32),
                                                             num_experts=4, ep_size=1, k=1))
    refused = r"expert-parallel parameters: 8 parameters .*Qwen3-MoE.*grad_comm to \"none\""
    with pytest.raises(ValueError, match=refused):
        ds_fp4.initialize(model=model, config=_cfg(grad_comm="nvfp4"))
    ds_fp4.engine.validate_model(NVFP4Config.from_dict({"grad_comm": "none"}), model)


def test_config_section_round_trip_and_path(tmp_path):
    section = {"preset": "no_sr", "grad_comm": "nvfp4", "seed": 3, "keep_first_blocks": 2, "stats_interval": 10}
    cfg = NVFP4Config.from_dict(section)
    assert cfg.recipe.grad.rounding == "nearest" and cfg.recipe.keep_first_blocks == 2
    assert NVFP4Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_cfg(weight_comm="nvfp4")))
    with pytest.raises(ValueError, match="weight_comm"):
        ds_fp4.initialize(model=torch.nn.Linear(16, 16), config=str(path))


# The seam module ----------------------------------------------------------------------------------------
def test_every_seam_exists_in_the_pinned_deepspeed():
    import deepspeed
    from packaging.version import Version

    assert Version("0.19") <= Version(deepspeed.__version__) < Version("0.20"), (
        f"DeepSpeed {deepspeed.__version__} is outside {deepspeed_patches.SUPPORTED_DEEPSPEED}: "
        "re-check every seam in ds_fp4/deepspeed_patches.py"
    )
    assert deepspeed_patches.check_seams() == []


def test_install_is_idempotent_and_uninstall_restores():
    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    original = stage3.reduce_scatter_coalesced
    original_bucket = DeepSpeedZeroOptimizer.allreduce_bucket
    try:
        assert deepspeed_patches.install() is True
        assert deepspeed_patches.install() is False  # second call: nothing to do
        assert stage3.reduce_scatter_coalesced is not original
        assert DeepSpeedZeroOptimizer.allreduce_bucket is not original_bucket
    finally:
        deepspeed_patches.uninstall()
    assert stage3.reduce_scatter_coalesced is original
    assert DeepSpeedZeroOptimizer.allreduce_bucket is original_bucket


def test_cpu_shm_comm_seam_exists():
    import importlib

    assert callable(importlib.import_module("deepspeed.comm.torch").build_shm_op)


def test_a_missing_seam_fails_loudly_with_the_supported_range(monkeypatch):
    from deepspeed.runtime.zero import stage3

    monkeypatch.delattr(stage3, "reduce_scatter_coalesced")
    assert "deepspeed.runtime.zero.stage3.reduce_scatter_coalesced" in deepspeed_patches.check_seams()
    with pytest.raises(deepspeed_patches.SeamError,
                       match=r"reduce_scatter_coalesced.*Supported DeepSpeed: >=0.19,<0.20"):
        deepspeed_patches.install()
    assert not deepspeed_patches.installed()


def test_without_nvfp4_comm_a_missing_seam_does_not_matter(monkeypatch):
    """grad_comm "none" patches nothing, so it keeps working where a seam moved (the error's advice)."""
    import types

    from deepspeed.runtime.zero import stage3

    monkeypatch.delattr(stage3, "reduce_scatter_coalesced")
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace())
    deepspeed_patches.activate_grad_comm(engine, None)
    assert engine._ds_fp4_comm is None and engine.optimizer._ds_fp4_comm is None
    assert not deepspeed_patches.installed()
    with pytest.raises(deepspeed_patches.SeamError):
        deepspeed_patches.activate_grad_comm(engine, comm.CommState(seed=0))
