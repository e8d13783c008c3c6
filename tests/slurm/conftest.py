"""A real single-node Slurm for the tests in this folder: find it, submit to it, wait for jobs, dump its logs.

tests/slurm/cluster.sh starts the cluster (CI does so as root before `make test`) and writes
$SLURM_CI_DIR/status first thing. The `slurm` fixture reads it:
  * no status file: nobody started a cluster here -> skip, saying why (not root, or not started);
  * "ready" (and sinfo answers): run;
  * anything else: the start was attempted and failed -> FAIL with the reason and the daemons' logs,
    so a broken CI setup is red, not silently skipped.
The daemons' logs are attached to every failing test of this folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_runs
from tiny_runs import steps  # noqa: F401  (re-exported for the tests here)

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "train.sbatch"
SUBMIT = REPO / "slurm" / "submit.sh"
CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
STATE = Path(os.environ.get("SLURM_CI_DIR", "/tmp/ds_fp4-slurm"))
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The test cluster's node: 2 CPUs, no GPU. These override train.sbatch's GPU-node #SBATCH lines.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def cluster_logs() -> str:
    return subprocess.run(["bash", str(CLUSTER), "logs"], capture_output=True, text=True).stdout


def _cluster_state() -> tuple[str, str]:
    """("ready" | "skip" | "fail", reason)."""
    status_file = STATE / "status"
    if not status_file.exists():
        if os.geteuid() != 0:
            return "skip", ("not root: a single-node Slurm needs root to install and start "
                            "(CI runs `bash tests/slurm/cluster.sh start` as root)")
        return "skip", (f"no Slurm cluster was started ({status_file} is missing): "
                        "run `bash tests/slurm/cluster.sh start` first, as .ci/run does")
    status = status_file.read_text().strip()
    if status != "ready":
        return "fail", f"tests/slurm/cluster.sh start did not finish: {status}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        return "fail", f"the cluster says ready but sinfo failed: {e}"
    if not out or not all(s in ("idle", "mix", "alloc", "comp") for s in out):
        return "fail", f"the cluster says ready but its node is {out or 'missing'}"
    return "ready", ""


@pytest.fixture(scope="session")
def slurm() -> None:
    state, reason = _cluster_state()
    if state == "skip":
        pytest.skip(reason)
    if state == "fail":
        pytest.fail(f"{reason}\n{cluster_logs()}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call") and (STATE / "status").exists():
        rep.sections.append(("Slurm daemons' logs", cluster_logs()))


# Runs ------------------------------------------------------------------------------------------------------
def write_config(path: Path, corpus: Path, **trainer) -> Path:
    """The tiny test run (tests/support/tiny_runs.py) for 16 steps with a checkpoint at 8, plus overrides."""
    return tiny_runs.write_config(path, corpus, trainer={"max_steps": 16, "save_interval": 8, **trainer})


def job_env(**extra: str) -> dict[str, str]:
    """The submitter's environment, which sbatch hands to the job: no torch.distributed variables of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and (not k.startswith("SLURM_") or k == "SLURM_CONF")}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "MAX_RESTARTS": "0",  # a broken run fails at once instead of requeueing
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})  # mpirun as root (CI)
    env.update(extra)
    return env


def sbatch(config: Path, *options: str, **env: str) -> str:
    """Submit slurm/train.sbatch for a 2-rank CPU job; returns the job id. Its log is <config dir>/job-<id>.out."""
    cmd = ["sbatch", "--parsable", *CPU_JOB, f"--output={config.parent}/job-%j.out", *options, str(SBATCH)]
    out = subprocess.run(cmd, cwd=REPO, env=job_env(CONFIG=str(config), **env), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return submitted(out.stdout)


SUBMITTED: list[str] = []


def submitted(parsable_stdout: str) -> str:
    """The job id from `sbatch --parsable` output, remembered so that the test's teardown can cancel it."""
    job_id = parsable_stdout.strip().split()[0].split(";")[0]
    SUBMITTED.append(job_id)
    return job_id


@pytest.fixture(autouse=True)
def cancel_leftover_jobs():
    """A failed test must not leave its jobs running into the next one (the node has 2 CPUs)."""
    yield
    if SUBMITTED:
        subprocess.run(["scancel", "--quiet", *SUBMITTED], capture_output=True)
        SUBMITTED.clear()


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_job(job_id: str, timeout: float = 300) -> dict[str, str]:
    """Poll until the job has finished for good (a requeued job passes through PENDING again).

    Polls every half second: `sbatch --wait` sleeps 2, 8, then 32 s between its checks."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job(job_id)}")


def log(config: Path, job_id: str) -> str:
    path = config.parent / f"job-{job_id}.out"
    return path.read_text() if path.exists() else f"(no {path})"


def wait_for_steps(out_dir: Path, n: int, job_id: str, timeout: float = 180) -> None:
    path = out_dir / "steps.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if job(job_id).get("JobState") in FINISHED:
            break
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not log {n} steps: {job(job_id)}")
