"""Train a model with the NVFP4 recipe from one DeepSpeed JSON: parse, build, train, close.

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config configs/demo-cpu.json
    torchrun --nproc_per_node 8 launch/train.py --deepspeed_config configs/llama-1b-zero2.json
    srun python launch/train.py --deepspeed_config configs/llama-8b-zero3.json      (see slurm/)

Exit codes: 0 done, 75 preempted (checkpoint saved; requeue), 65 stopped on repeated non-finite steps.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import distributed  # noqa: E402
from launch.config import parse_run_config  # noqa: E402
from launch.runtime import install_signal_handlers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed_config", required=True,
                   help="the run's JSON (DeepSpeed keys + nvfp4/model/data/trainer)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (JSON-parsed), e.g. --set trainer.max_steps=20")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    cfg = parse_run_config(args.deepspeed_config, args.set)  # fail on a bad config before starting ranks
    install_signal_handlers()  # before the slow start-up: a preemption signal now is not fatal

    from launch.trainer import Trainer  # torch, DeepSpeed, transformers: seconds to import

    distributed.init()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        code = trainer.fit()
    except BaseException:
        trainer.close()
        distributed.shutdown(trainer.engine, barrier=False)  # peers may be gone: do not wait for them
        raise
    trainer.close()
    distributed.shutdown(trainer.engine)
    return code


if __name__ == "__main__":
    sys.exit(main())
