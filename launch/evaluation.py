"""The trainer's held-out evaluation: which loader (if any) a run gets, and the loss over it.

When ``trainer.eval_interval`` is 0 nothing about evaluation is opened or required. Otherwise the data
pipeline picks the held-out sources (data_pipeline.evaluation.held_out_sources): ``data.eval_sources``
when given, and then they must work, since the user asked for them (else a ConfigError, which
launch/train.py prints once); without them, the ``eval/`` split of every source that has one, so that
mixing in a source prepared without a split leaves it out of the evaluation (said once) instead of
stopping the run. With no split anywhere, evaluation is off (said once). Traded off: a default
evaluation over fewer sources measures a different mix than training; the message names the sources
evaluated, so the curve is not mistaken for the whole mix's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from data_pipeline import EvalLoader, build_eval_loader
from data_pipeline.evaluation import NoHeldOutSplit

from .config import ConfigError, RunConfig


def open_eval_loader(cfg: RunConfig, rank: int, world: int, say: Callable[[str], None]) -> EvalLoader | None:
    """This rank's held-out loader, or None when evaluation is off; ``say`` reports (rank 0) why, and which
    sources a default evaluation leaves out."""
    data, t = cfg.data, cfg.trainer
    if not t.eval_interval:
        if data.eval_sources is not None:
            say("eval off: data.eval_sources is set but trainer.eval_interval is 0")
        return None
    try:
        loader = build_eval_loader(data, cfg.global_batch, cfg.micro_batch, rank, world, num_batches=t.eval_batches)
    except NoHeldOutSplit as e:
        say(f"eval off: {e}")
        return None
    except (ValueError, FileNotFoundError) as e:  # eval_sources or eval_batches that cannot work, on every rank
        raise ConfigError(f"evaluation (trainer.eval_interval {t.eval_interval}, trainer.eval_batches "
                          f"{t.eval_batches}): {e}") from e
    if loader.left_out:
        say(f"eval: no held-out split in {', '.join(loader.left_out)}; evaluating on "
            f"{', '.join(loader.dataset.sources)} only")
    return loader


def held_out_loss(engine, loader: EvalLoader, micro_loss: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The mean loss over every rank's held-out batches (collective): the losses stay on the device until
    one all-reduce (docs/design.md §7.19)."""
    engine.eval()
    total, n = torch.zeros((), device=engine.device), 0
    with torch.no_grad():
        for batch in loader:
            total += micro_loss(batch).float()
            n += 1
    engine.train()
    t = torch.stack([total, total.new_tensor(float(n))])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()
