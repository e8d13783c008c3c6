"""slurm/train.sbatch and slurm/submit.sh on a real single-node Slurm (2 CPUs, no GPU; see conftest.py).

A run to the end; USR1 preemption: checkpoint, self-requeue, resume, the same steps as an uninterrupted run;
a chain link stopped with USR2 handing over to the next link on fewer ranks (universal checkpoint); the
failure requeue limit; the MPI launches (srun --mpi=pmix with mpi4py discovery, mpirun).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from launch.distributed import port_for_job

from .conftest import (
    CPU_JOB,
    REPO,
    SUBMIT,
    job,
    job_env,
    log,
    sbatch,
    steps,
    submitted,
    wait_for_steps,
    wait_job,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]
SUBMIT_CPU = {"NODES": "1", "GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1", "TIME": "15"}


@pytest.fixture(scope="module")
def reference(slurm, corpus, tmp_path_factory):
    """An uninterrupted 16-step run (checkpoints at 8 and 16): the reference for the resume tests."""
    cfg = write_config(tmp_path_factory.mktemp("reference") / "cfg.json", corpus)
    job_id = sbatch(cfg)
    return cfg, job_id, wait_job(job_id)


def copy_config(ref_cfg, tmp_path):
    cfg = json.loads(ref_cfg.read_text())
    cfg["trainer"]["out_dir"] = str(tmp_path / "run")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "cfg.json", tmp_path / "run"


def test_a_run_trains_to_the_end_checkpoints_and_is_not_requeued(reference):
    cfg, job_id, info = reference
    text = log(cfg, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-4000:]
    # The port train.sbatch exports is launch/distributed.py's port_for_job: one formula.
    assert f"distributed: slurm, 2 ranks, gloo via localhost:{port_for_job(job_id)}" in text
    assert "done: 16 steps" in text and "ds_fp4: finished" in text and "requeueing" not in text
    out = cfg.parent / "run"
    assert sorted(steps(out)) == list(range(1, 17))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000016"
    assert sorted(d.name for d in ckpts.glob("step_*") if (d / "COMPLETE").is_file()) == \
        ["step_00000008", "step_00000016"]


def test_usr1_checkpoints_requeues_the_job_and_it_finishes_like_an_uninterrupted_run(reference, tmp_path):
    ref_cfg = reference[0]
    cfg, out = copy_config(ref_cfg, tmp_path)
    t0 = time.time()
    job_id = sbatch(cfg)
    wait_for_steps(out, 3, job_id)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)  # what --signal=B:USR1@... does
    info = wait_job(job_id)
    print(f"preemption round trip: {time.time() - t0:.0f} s")
    text = log(cfg, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    saved = re.search(r"checkpoint saved at step (\d+) \(.*\)\npreempted \((?:SIGUSR1|signal on another rank)\): "
                      r"exiting with 75; a restart resumes from step (\d+)\n", text)
    assert saved and saved.group(1) == saved.group(2), text[-4000:]
    step = int(saved.group(1))
    assert 3 <= step < 16
    assert f"ds_fp4: preempted, checkpoint saved; requeueing job {job_id}" in text
    assert f"ds_fp4: job {job_id} start 2" in text  # --open-mode=append: both runs in one log
    assert f"resumed from {out}/checkpoints/step_{step:08d} (checkpoint) at step {step}" in text
    assert len((out / "steps.jsonl").read_text().splitlines()) == 16  # no step lost or repeated
    ours, ref = steps(out), steps(ref_cfg.parent / "run")
    assert sorted(ours) == sorted(ref) == list(range(1, 17))
    for s in ref:
        assert ours[s]["digest"] == ref[s]["digest"], s  # the same samples in the same order
        assert ours[s]["lr"] == ref[s]["lr"], s
        assert ours[s]["loss"] == ref[s]["loss"], s  # bitwise: the resume repeats the uninterrupted run


def submit(cfg, tmp_path, *args, **env) -> tuple[str, subprocess.CompletedProcess]:
    """slurm/submit.sh for a 2-rank CPU job: (job id, the finished sbatch process)."""
    r = subprocess.run([str(SUBMIT), "--parsable", f"--output={tmp_path}/job-%j.out", *args], cwd=tmp_path,
                       env=job_env(CONFIG=str(cfg), **{**SUBMIT_CPU, **env}), capture_output=True, text=True)
    assert r.stdout.strip(), r.stderr
    return submitted(r.stdout), r


def test_a_chain_link_stopped_with_usr2_hands_over_to_the_next_on_fewer_ranks(reference, tmp_path):
    ref_cfg = reference[0]
    cfg, out = copy_config(ref_cfg, tmp_path)
    name = f"chain-{tmp_path.name}"
    first, _ = submit(cfg, tmp_path, NAME=name)
    second, _ = submit(cfg, tmp_path, NAME=name, TASKS_PER_NODE="1")  # resized: 1 rank instead of 2
    assert job(second)["Dependency"].startswith("singleton")
    wait_for_steps(out, 3, first)
    subprocess.run(["scancel", "--batch", "--signal=USR2", first], check=True)
    a, b = wait_job(first), wait_job(second)
    text_a, text_b = log(cfg, first), log(cfg, second)
    assert (a["ExitCode"], a["Restarts"]) == ("75:0", "0"), text_a[-4000:]
    assert "ds_fp4: checkpoint saved, stopped" in text_a
    assert (b["JobState"], b["ExitCode"]) == ("COMPLETED", "0:0"), text_b[-4000:]
    assert b["StartTime"] >= a["EndTime"]  # singleton: one link at a time
    assert "universal checkpoint from 2 ranks" in text_b and "2 micro-steps per step" in text_b
    resumed = int(re.search(r"at step (\d+)", text_b).group(1))
    ours, ref = steps(out), steps(ref_cfg.parent / "run")
    assert sorted(ours) == list(range(1, 17))
    for s in ref:
        assert ours[s]["digest"] == ref[s]["digest"], s  # the same samples in the same order
        if s <= resumed:  # the first link's steps
            assert ours[s]["loss"] == ref[s]["loss"], s
        else:  # 1 rank sums in another order and draws other stochastic-rounding bits
            assert ours[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.02), s


def test_a_failing_run_is_requeued_max_restarts_times_then_left_failed(corpus, tmp_path):
    """A crash (here: rank 0 cannot create its run directory under /dev/null) is requeued, as a lost node is."""
    cfg = write_config(tmp_path / "cfg.json", corpus)
    # submit.sh passes --wait to sbatch, which then returns the job's exit code.
    job_id, r = submit(cfg, tmp_path, "--wait", SET='trainer.out_dir="/dev/null/run"', MAX_RESTARTS="1")
    text = log(cfg, job_id)
    assert r.returncode == 1, (r.stderr, text[-4000:])
    info = job(job_id)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1")
    assert f"ds_fp4: failed with exit code 1 (1 of MAX_RESTARTS=1); requeueing job {job_id}" in text
    assert text.rstrip().endswith("ds_fp4: failed with exit code 1; not requeued (restart 1, MAX_RESTARTS=1)")


def test_a_config_error_is_said_once_and_not_requeued(corpus, tmp_path):
    """Exit 78: a restart would fail the same way, so the job fails at once, whatever MAX_RESTARTS allows."""
    cfg = write_config(tmp_path / "cfg.json", corpus)
    job_id, r = submit(cfg, tmp_path, "--wait", SET="trainer.no_such_key=1", MAX_RESTARTS="3")
    text = log(cfg, job_id)
    assert r.returncode == 78, (r.stderr, text[-4000:])
    assert (job(job_id)["JobState"], job(job_id)["Restarts"]) == ("FAILED", "0")
    assert text.count("unknown key(s) ['no_such_key'] in the \"trainer\" config section") == 1, text[-4000:]
    assert "Traceback" not in text and "requeueing" not in text
    assert text.rstrip().endswith(f"ds_fp4: config error (the message above); not requeued: fix {cfg} and submit "
                                  "again")


# MPI launches ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi4py(slurm):
    r = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, text=True)
    if r.returncode:
        pytest.fail("mpi4py cannot load an MPI library; the cluster's tests need the `mpi` extra "
                    f"(EXTRAS=dev,mpi make setup, as .ci/run does) and Open MPI (cluster.sh installs it):\n{r.stderr}")


@pytest.mark.parametrize("env, launcher", [({"SRUN_MPI": "pmix"}, "srun --mpi=pmix (mpi4py)"),
                                           ({"LAUNCHER": "mpirun"}, "mpirun (mpi4py)")])
def test_mpi_launches_find_their_ranks_through_mpi4py(mpi4py, corpus, tmp_path, env, launcher):
    cfg = write_config(tmp_path / "cfg.json", corpus, max_steps=2, save_interval=0)
    job_id = sbatch(cfg, **env)
    info = wait_job(job_id)
    text = log(cfg, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert f"distributed: {launcher}, 2 ranks, gloo via " in text
    assert "done: 2 steps" in text


@pytest.mark.parametrize("mpi, works", [("pmix", True), ("pmi2", False), ("none", False)])
def test_open_mpi_under_srun_needs_pmix(mpi4py, mpi, works):
    """The fact behind SRUN_MPI=pmix (and behind launch/distributed.py asking MPI only when PMIX_RANK is set)."""
    cmd = ["srun", "-n", "2", f"--mpi={mpi}", *CPU_JOB[2:], sys.executable, "-c",
           "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"]
    r = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    if works:
        assert r.returncode == 0 and r.stdout.split() == ["size", "2"] * 2, r.stdout + r.stderr
    else:
        assert r.returncode != 0 and "MPI_INIT" in r.stdout + r.stderr, r.stdout + r.stderr
