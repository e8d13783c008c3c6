"""Process-group setup for every launcher: deepspeed, torchrun, Slurm's srun, mpirun.

The deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under ``srun`` only Slurm's variables exist, so they are mapped here: RANK = SLURM_PROCID,
WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of the allocation
(``scontrol show hostnames``), and MASTER_PORT is derived from the job id so that two jobs sharing a
node do not collide (DeepSpeed's own MPI discovery always picks 29500). Under ``mpirun`` without Slurm,
Open MPI's OMPI_COMM_WORLD_* variables are mapped the same way; MASTER_ADDR must then be exported
(``mpirun -x MASTER_ADDR``), or DeepSpeed's mpi4py discovery (the ``mpi`` extra) finds it.
"""

from __future__ import annotations

import os
import re
import subprocess

import torch
import torch.distributed as dist

PORT_BASE, PORT_SPAN = 20000, 20000


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port in [20000, 40000) derived from the job id."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist ("node[03-05,07]" -> "node03"), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    m = re.match(r"^([^\[]+)\[(\d+)", head)
    return m.group(1) + m.group(2) if m else head


def map_launcher_env(env: dict[str, str] | None = None) -> str:
    """Fill the torch.distributed variables from Slurm or Open MPI; returns the launcher's name."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun/deepspeed"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
        env.setdefault("MASTER_PORT", str(port_for_job(env.get("SLURM_JOB_ID", "0"))))
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        if "MASTER_ADDR" in env:
            env.setdefault("MASTER_PORT", str(port_for_job(env.get("SLURM_JOB_ID", os.getppid()))))
        return "mpirun"
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(port_for_job(os.getpid())))
    return "single process"


def init() -> str:
    """Map the launcher's variables and start the process group (gloo on CPU, the accelerator's backend on GPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ds_fp4 import seams

    seams.disable_cpu_shm_comm()
    launcher = map_launcher_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = get_accelerator().communication_backend_name()
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        _init_elastic_group(backend)
        launcher = f"torchrun (attempt {os.environ['TORCHELASTIC_RESTART_COUNT']})"
    port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None
    kwargs = {"distributed_port": port} if port else {}
    deepspeed.init_distributed(dist_backend=backend, **kwargs)  # keeps an existing group
    return launcher


def _init_elastic_group(backend: str) -> None:
    """Start the group on a store namespaced by the restart attempt.

    Under torchrun's elastic agent every restart reuses MASTER_ADDR/MASTER_PORT and the agent's store.
    With torch 2.13 + gloo the restarted ranks sometimes read the previous attempt's addresses from it
    and fail with "connectFullMesh ... Connection refused" (3 of 8 restarts here); a store prefix of our
    own per attempt removed the failures (0 of 5).
    """
    import datetime

    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent_hosts_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=not agent_hosts_store and rank == 0, timeout=datetime.timedelta(minutes=10))
    store = dist.PrefixStore(f"/ds_fp4/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def shutdown(engine=None, barrier: bool = True) -> None:
    """Free the engine, then barrier and destroy the group: otherwise gloo can abort at exit (DESIGN §5).

    After an error, pass barrier=False: the other ranks may never arrive."""
    if engine is not None:
        destroy = getattr(engine, "destroy", None)
        if callable(destroy):
            destroy()
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
