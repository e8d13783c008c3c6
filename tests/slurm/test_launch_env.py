"""launch/distributed.py under each launcher of slurm/train.sbatch, without a cluster: which source of rank,
world size and rendezvous wins, and when MPI is asked at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.distributed import map_launcher_env, port_for_job

SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0"}


class Discovery:
    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def __call__(self, env):
        self.calls += 1
        return self.answer


def test_mpirun_inside_an_allocation_is_not_mistaken_for_srun():
    # mpirun's ranks inherit the batch step's SLURM_PROCID=0 and SLURM_NTASKS: Open MPI's variables must win.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert map_launcher_env(env) == "mpirun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", str(port_for_job("4242")))


def test_srun_with_pmix_asks_mpi_and_keeps_its_answer():
    ask = Discovery(("1", "2", "1", "gpu07", "23456"))
    env = {**SRUN, "PMIX_RANK": "1"}
    assert map_launcher_env(env, discover=ask) == "srun --mpi=pmix (mpi4py)"
    assert ask.calls == 1
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "2", "1", "gpu07", "23456")


@pytest.mark.parametrize("extra", [{}, {"PMI_RANK": "1", "PMI_SIZE": "2"}], ids=["mpi=none", "mpi=pmi2"])
def test_srun_without_pmix_never_starts_mpi(extra):
    """Open MPI aborts in MPI_Init under --mpi=none and --mpi=pmi2: Slurm's variables are used instead."""
    ask = Discovery(("9", "9", "9", "x", "1"))
    env = {**SRUN, **extra}
    assert map_launcher_env(env, discover=ask) == "slurm"
    assert ask.calls == 0 and (env["RANK"], env["MASTER_ADDR"]) == ("1", "gpu07")


def test_without_mpi4py_the_environment_mapping_is_the_fallback():
    env = {**SRUN, "PMIX_RANK": "1"}
    assert map_launcher_env(env, discover=Discovery(None)) == "slurm"
    assert env["RANK"] == "1"


def test_torchrun_variables_are_never_second_guessed():
    ask = Discovery(("9", "9", "9", "x", "1"))
    env = {**SRUN, "PMIX_RANK": "1", "RANK": "0", "WORLD_SIZE": "1"}
    assert map_launcher_env(env, discover=ask) == "torchrun/deepspeed" and ask.calls == 0


def test_mpi_discovery_in_a_single_mpi_process():
    probe = "from mpi4py import MPI"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode:
        pytest.skip("mpi4py with an MPI library is not installed (the `mpi` extra and Open MPI)")
    code = ("import json; from launch.distributed import mpi_discovery; "
            "print(json.dumps(mpi_discovery({'SLURM_JOB_ID': '4242'})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    rank, world, local, addr, port = json.loads(r.stdout.splitlines()[-1])
    assert (rank, world, local, port) == ("0", "1", "0", str(port_for_job("4242"))) and addr
