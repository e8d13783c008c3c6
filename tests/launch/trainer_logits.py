"""A rank of the export test's reference: resume a run's latest checkpoint through the Trainer, exactly as
training would, and write the model's logits for the ids in $PROBE_IDS (JSON) to $PROBE_OUT (rank 0).

    RANK=.. WORLD_SIZE=.. python tests/launch/trainer_logits.py --deepspeed_config CFG
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def main() -> None:
    import torch

    import ds_fp4
    from launch import distributed
    from launch.config import parse_run_config
    from launch.trainer import Trainer

    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    distributed.init()
    trainer = Trainer(parse_run_config(args.deepspeed_config, args.set))
    trainer.setup()
    ids = torch.tensor([json.loads(os.environ["PROBE_IDS"])])
    model = trainer.engine.module
    with torch.no_grad():
        nvfp4 = model(ids).logits
        ds_fp4.set_nvfp4_active(model, False)
        high = model(ids).logits
    if trainer.rank == 0:
        torch.save({"step": trainer.step, "nvfp4": nvfp4, "high": high}, os.environ["PROBE_OUT"])
    trainer.close()
    distributed.shutdown(trainer.engine)


if __name__ == "__main__":
    main()
