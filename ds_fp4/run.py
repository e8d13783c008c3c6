"""Run an unmodified training script with ds_fp4.patch_deepspeed() applied (docs/integrations.md).

    python -m ds_fp4.run SCRIPT [ARGS...]
    python -m ds_fp4.run -m MODULE [ARGS...]
    deepspeed --num_gpus 8 --module ds_fp4.run train.py --deepspeed ds.json
    torchrun --nproc_per_node 8 -m ds_fp4.run train.py ...
    accelerate launch --config_file acc.yaml -m ds_fp4.run train.py ...

The script runs as ``python SCRIPT ARGS`` would run it: as ``__main__``, with ``sys.argv`` = [SCRIPT, ARGS...],
its directory first on ``sys.path``, and its exit code (SystemExit, or 1 with the traceback for an
uncaught exception). DeepSpeed's launcher puts ``--local_rank=N`` before the script's name when it
starts a module; it is handed on to the script, which would have received it when launched directly.

On a CPU-only machine, under a launcher (WORLD_SIZE > 1), it also starts DeepSpeed's process group
(gloo) before the script: see :func:`start_cpu_group` (a script that then calls
``torch.distributed.init_process_group`` without checking ``is_initialized`` first fails there). When the
script ends, a process group it left up is destroyed (:func:`end_process_group`), which spares gloo
ranks an abort at exit. DeepSpeed is imported before the script's first line, so it detects the
accelerator before the script runs: set CUDA_VISIBLE_DEVICES or DS_ACCELERATOR in the environment, not
inside the script.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m ds_fp4.run SCRIPT [ARGS...]  |  python -m ds_fp4.run -m MODULE [ARGS...]"


def split_argv(argv: list[str]) -> tuple[str, str, list[str]]:
    """("path" or "module", target, the target's own arguments) from ds_fp4.run's arguments."""
    launcher_args = []
    rest = list(argv)
    while rest and rest[0].startswith(("--local_rank", "--local-rank")):
        launcher_args.append(rest.pop(0))
        if "=" not in launcher_args[-1] and rest:
            launcher_args.append(rest.pop(0))  # "--local_rank N"
    if not rest or rest[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    if rest[0] == "-m":
        if len(rest) < 2:
            raise SystemExit(f"ds_fp4.run: -m needs a module name\n{USAGE}")
        return "module", rest[1], [*launcher_args, *rest[2:]]
    if rest[0].startswith("-"):
        raise SystemExit(f"ds_fp4.run: unknown option {rest[0]!r}; the script comes first, its options after "
                         f"it\n{USAGE}")
    return "path", rest[0], [*launcher_args, *rest[1:]]


def start_cpu_group() -> bool:
    """Start DeepSpeed's process group (gloo) now, on a machine without CUDA under a multi-rank launcher.

    On GPUs, HF Trainer and Accelerate start DeepSpeed's group themselves. On CPU (``--use_cpu``) they
    start only torch's and leave DeepSpeed's to ``deepspeed.initialize``, which is too late for ZeRO-3: a
    model built partitioned before it (``from_config``/``from_pretrained`` under zero.Init) reads a world
    size of 1 and fails DeepSpeed's batch-size check. Both frameworks keep a group that already exists.
    DeepSpeed's CPU shared-memory all-reduce op, used only for inference, is not built (ds_fp4's
    deepspeed_patches.disable_cpu_shm_comm: it costs a ~60 s JIT build on a fresh machine).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":  # CUDA, XPU, HPU, ...: the frameworks start the group
        return False

    from .deepspeed_patches import disable_cpu_shm_comm

    disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    return True


def main(argv: list[str] | None = None) -> None:
    kind, target, args = split_argv(sys.argv[1:] if argv is None else argv)
    if kind == "path" and not os.path.isfile(target):
        raise SystemExit(f"ds_fp4.run: no such script: {target!r}")

    import ds_fp4

    ds_fp4.patch_deepspeed()
    start_cpu_group()
    clean = False
    try:
        sys.argv = [target, *args]  # for a module, runpy then sets argv[0] to its file
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python SCRIPT`: its dir, not the cwd
            runpy.run_path(target, run_name="__main__")
        clean = True
    except SystemExit as e:
        clean = e.code in (None, 0)
        raise
    finally:
        end_process_group(clean)


def end_process_group(clean: bool) -> None:
    """Destroy the default process group if the script left it up (HF Trainer and Accelerate do).

    A gloo group still alive at interpreter exit aborts the process ("terminate called without an active
    exception", SIGABRT) after the script has finished: 8 of 24 two-rank runs of a plain torch script did
    here, and 0 of 24 that destroyed the group first (torch 2.13). After a clean finish the ranks meet
    at a barrier first, so that none tears the group down while another still uses it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    except Exception as e:  # a peer gone or timed out: the script's own exit code stands
        print(f"ds_fp4.run: the end-of-script barrier failed ({type(e).__name__}: {e})", file=sys.stderr)
    try:
        dist.destroy_process_group()
    except Exception as e:
        print(f"ds_fp4.run: destroying the process group failed ({type(e).__name__}: {e})", file=sys.stderr)


if __name__ == "__main__":
    main()
