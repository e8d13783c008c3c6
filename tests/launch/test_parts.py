"""The trainer's parts that need no processes: checkpoint bookkeeping, the schedule, launcher env mapping."""

from __future__ import annotations

import json

import pytest

from launch.checkpoint import COMPLETE, META, CheckpointManager
from launch.distributed import first_host, map_launcher_env, port_for_job
from launch.metrics import Throughput, wsd_lambda


def _fake_checkpoint(root, step, complete=True, world=2):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / META).write_text(json.dumps({"step": step, "dp_world_size": world, "zero_stage": 1}))
    if complete:
        (d / COMPLETE).write_text("")
    return d


def test_latest_never_names_a_half_written_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    _fake_checkpoint(tmp_path, 100)
    _fake_checkpoint(tmp_path, 200, complete=False)  # a crash during the save at step 200
    (tmp_path / "latest").write_text("step_00000200")  # even a pointer that names it is not trusted
    assert mgr.latest().step == 100
    (tmp_path / "latest").write_text("garbage")
    assert mgr.latest().step == 100


def test_prune_keeps_the_newest_complete_and_removes_partials(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (10, 20, 30):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 40, complete=False)
    (tmp_path / "step_00000010_universal").mkdir()
    mgr.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]
    assert mgr.latest().step == 30


def test_wsd_schedule_warms_up_holds_and_decays():
    f = wsd_lambda(total_steps=100, warmup_steps=10, decay_fraction=0.2, shape="linear", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(79) == 1.0
    assert f(80) == pytest.approx(0.1 + 0.9 * (1 - 1 / 20))
    assert f(99) == pytest.approx(0.1)
    cos = wsd_lambda(100, 0, 0.2, "cosine", 0.0)
    assert cos(89) == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 10 / 20)))


def test_throughput_window_resets_but_the_overall_rate_does_not(monkeypatch):
    clock = iter([0.0, 2.0, 4.0, 4.0])  # start, report, overall, (spare)
    monkeypatch.setattr("launch.metrics.time.perf_counter", lambda: next(clock))
    speed = Throughput()
    speed.add(100)
    speed.add(100)
    assert speed.report() == 100.0  # 200 tokens in 2 s
    assert speed.tokens == 0
    speed.add(200)
    assert speed.overall() == 100.0  # 400 tokens in 4 s: the progress bar's figure, never 0 after a report


def test_slurm_variables_map_to_torch_distributed():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert map_launcher_env(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(port_for_job("123456")) and 20000 <= int(env["MASTER_PORT"]) < 40000
    assert port_for_job(1) != port_for_job(2)


def test_launcher_variables_win_and_mpirun_is_mapped():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
    assert map_launcher_env(env) == "torchrun/deepspeed" and env["RANK"] == "0"
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.1"}
    assert map_launcher_env(env) == "mpirun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1") and "MASTER_PORT" in env


@pytest.mark.parametrize("nodelist, host", [("node01", "node01"), ("gpu[07-08]", "gpu07"),
                                            ("a[3,5],b1", "a3")])
def test_first_host_without_scontrol_parses_the_nodelist(nodelist, host, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol here: the fallback parser answers
    assert first_host(nodelist) == host


def test_batch_digest_wraps_like_int64_and_ignores_how_the_batch_is_split():
    import torch

    from launch.metrics import sample_digest, wrap_int64

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 50000, (8, 65), generator=g)
    whole = sample_digest(batch)
    halves = wrap_int64(sample_digest(batch[:4]) + sample_digest(batch[4:]))
    assert halves == whole
    assert wrap_int64(2**63) == -(2**63) and wrap_int64(-(2**63) - 1) == 2**63 - 1
    assert torch.tensor([halves], dtype=torch.int64).item() == whole  # always fits the all-reduce tensor


def test_a_preemption_signal_is_recorded_not_fatal(monkeypatch):
    import signal

    from launch import runtime

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        for sig in handlers:
            monkeypatch.setattr(runtime, "_received", [])
            runtime.install_signal_handlers()
            assert runtime.preemption_signal() is None
            signal.raise_signal(sig)  # to this thread; its handler has run when raise_signal returns
            assert runtime.preemption_signal() == sig.name
    finally:
        for sig, handler in handlers.items():  # pytest's own handlers back
            signal.signal(sig, handler)


def test_step_seeds_depend_on_seed_step_and_rank_only():
    from launch.runtime import step_seed

    seeds = {step_seed(seed, step, rank) for seed in (0, 1) for step in range(50) for rank in range(4)}
    assert len(seeds) == 2 * 50 * 4 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 7, 1) == step_seed(0, 7, 1)
