"""Process-group setup for every launcher: deepspeed, torchrun, Slurm's srun, mpirun.

The deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under ``srun`` only Slurm's variables exist, so they are mapped here: RANK = SLURM_PROCID,
WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of the allocation
(``scontrol show hostnames``), and MASTER_PORT is derived from the job id so that two jobs sharing a
node do not collide (DeepSpeed's own MPI discovery always picks 29500).

MPI launchers (``mpirun``, ``srun --mpi=pmix``) are asked through mpi4py (the ``mpi`` extra) when it is
installed: one MPI_Init, rank / size / node-local rank from COMM_WORLD, rank 0's host name and port
broadcast, MPI_Finalize. MPI's only job is this discovery; training talks gloo/NCCL. Without mpi4py,
Open MPI's OMPI_COMM_WORLD_* variables are mapped instead, and MASTER_ADDR is the first host of the
Slurm allocation or must be exported (``mpirun -x MASTER_ADDR``).
Order matters: ``mpirun`` inside an sbatch allocation inherits the batch step's SLURM_PROCID=0 on
every rank, so Open MPI's variables are read before Slurm's. ``srun --mpi=pmix`` is recognised by
PMIX_RANK; with ``--mpi=none`` (slurm/train.sbatch's default) MPI is never initialised.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable

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


# (rank, world size, local rank, MASTER_ADDR, MASTER_PORT) as strings, or None when MPI cannot be started.
Discovery = Callable[[dict], "tuple[str, str, str, str, str] | None"]


def mpi_discovery(env: dict[str, str]) -> tuple[str, str, str, str, str] | None:
    """Ask MPI through mpi4py: rank, size, node-local rank; rank 0's host and port, broadcast to all.

    Returns None when mpi4py or an MPI library is missing. An MPI that cannot reach its launcher's PMI
    (e.g. Open MPI under ``srun --mpi=pmi2`` or ``--mpi=none``) aborts in MPI_Init: use ``--mpi=pmix``.
    """
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # MPI is started and stopped here, not at import / exit
        mpi4py.rc.finalize = False
        from mpi4py import MPI
    except Exception:  # ImportError, or RuntimeError when libmpi is not installed
        return None
    started = not MPI.Is_initialized()
    if started:
        MPI.Init()
    try:
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank = node.Get_rank()
        node.Free()
        addr = port = None
        if rank == 0:
            addr = env.get("MASTER_ADDR") or socket.gethostname()
            port = env.get("MASTER_PORT") or str(port_for_job(env["SLURM_JOB_ID"]) if "SLURM_JOB_ID" in env
                                                 else free_port())
        addr, port = comm.bcast((addr, port), root=0)
    finally:
        if started:
            MPI.Finalize()
    return str(rank), str(world), str(local_rank), addr, port


def free_port(host: str = "") -> int:
    """A TCP port that is free now on ``host`` ("" = every interface), for a rendezvous about to start.
    The one helper for this in the project: the MPI discovery below, the tests and the benchmarks use it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Where each launcher puts a process's rank, in the order map_launcher_env trusts them: torchrun / the
# deepspeed launcher, Open MPI (before Slurm's: mpirun in an allocation inherits SLURM_PROCID=0), PMIx and
# PMI (MPI under srun; the same number mpi4py reports), Slurm.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def env_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank from the launcher's variables alone, before the process group exists (0 when
    none is set): enough to let one rank speak for all, as train.py does for a config error."""
    env = os.environ if env is None else env
    value = next((env[name] for name in RANK_VARIABLES if env.get(name, "").isdigit()), "0")
    return int(value)


def map_launcher_env(env: dict[str, str] | None = None, discover: Discovery | None = None) -> str:
    """Fill the torch.distributed variables from the launcher; returns the launcher's name.

    ``discover`` (init passes mpi_discovery) is asked first under an MPI launcher; the environment
    mapping below is the fallback when it returns None."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun/deepspeed"
    mpi = "mpirun" if "OMPI_COMM_WORLD_RANK" in env else "srun --mpi=pmix" if "PMIX_RANK" in env else None
    found = discover(env) if mpi and discover is not None else None
    if found is not None:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = found[:3]
        env.setdefault("MASTER_ADDR", found[3])
        env.setdefault("MASTER_PORT", found[4])
        return f"{mpi} (mpi4py)"
    if "OMPI_COMM_WORLD_RANK" in env:  # before Slurm's: mpirun in an allocation inherits SLURM_PROCID=0
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:  # mpirun puts rank 0 on the first node
            env["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
        if "MASTER_ADDR" in env:
            env.setdefault("MASTER_PORT", str(port_for_job(env.get("SLURM_JOB_ID", os.getppid()))))
        return "mpirun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
        env.setdefault("MASTER_PORT", str(port_for_job(env.get("SLURM_JOB_ID", "0"))))
        return "slurm"
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

    from ds_fp4 import deepspeed_patches

    deepspeed_patches.disable_cpu_shm_comm()
    launcher = map_launcher_env(discover=mpi_discovery)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = get_accelerator().communication_backend_name()
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        _init_elastic_group(backend)
        launcher = f"torchrun (attempt {os.environ['TORCHELASTIC_RESTART_COUNT']})"
    port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None
    kwargs = {"distributed_port": port} if port else {}
    deepspeed.init_distributed(dist_backend=backend, **kwargs)  # keeps an existing group
    if dist.get_rank() == 0:
        print(f"distributed: {launcher}, {dist.get_world_size()} ranks, {backend} via "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", flush=True)
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
    """Free the engine, then barrier and destroy the group: otherwise gloo can abort at exit (docs/design.md §5).

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
