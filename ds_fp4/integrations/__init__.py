"""What a framework's user sees when ds_fp4 comes in through ``deepspeed.initialize`` (docs/integrations.md).

:func:`started` runs once per engine that the patched ``deepspeed.initialize`` built with NVFP4:
  * rank 0 prints the conversion report's summary (every layer kept in high precision, with its reason)
    and the communication settings, once;
  * inside a Hugging Face ``Trainer`` (found on the call stack: Accelerate calls deepspeed.initialize
    from the Trainer's training loop), it puts :class:`ds_fp4.integrations.hf.NVFP4TrainerCallback` first
    among the Trainer's callbacks, so the NVFP4 scalars reach its logs, its log_history and every
    reporting integration (TensorBoard, W&B, ...).
"""

from __future__ import annotations

import inspect
import sys
import weakref

_engines: list[weakref.ref] = []


def latest_engine():
    """The newest live engine that ds_fp4 set up through the patched deepspeed.initialize, or None."""
    while _engines:
        engine = _engines[-1]()
        if engine is not None:
            return engine
        _engines.pop()
    return None


def describe(engine) -> str:
    """The start-up lines: the conversion report, the communication and the seeding."""
    import deepspeed.comm as ds_dist

    state = engine.nvfp4
    cfg = state.config
    if state.report is None:
        lines = ["NVFP4 disabled (nvfp4.enabled is false)"]
    else:  # the head line and every layer kept in high precision; the converted ones are in engine.nvfp4.report
        lines = [str(state.report).splitlines()[0]]
        lines += [f"  keep {d.name} [{d.out_features}x{d.in_features}]: {d.reason}"
                  for d in state.report.layers if not d.converted]
    world = ds_dist.get_world_size()
    seeds = ("folded with the data-parallel rank" if cfg.sr_rank_seeds and world > 1
             else "as torch's generator draws them")
    comm = (f"NVFP4 communication: gradients {cfg.grad_comm}, ZeRO-3 weight all-gathers {cfg.weight_comm} "
            f"(ZeRO stage {engine.zero_optimization_stage()}, {world} ranks); stochastic-rounding seeds {seeds}")
    checked = state.selftest
    lines += [str(checked).splitlines()[0] if checked is not None else "self-test off (nvfp4.selftest is false)"]
    return "\n".join(f"ds_fp4: {line}" for line in [*lines, comm])


def started(engine) -> None:
    """Announce ``engine`` (rank 0) and hook it into the framework that built it."""
    import deepspeed.comm as ds_dist

    _engines.append(weakref.ref(engine))
    if ds_dist.get_rank() == 0:
        print(describe(engine), flush=True)
    trainer = _calling_hf_trainer()
    if trainer is not None:
        from .hf import attach

        attach(trainer, engine)


def _calling_hf_trainer():
    """The transformers.Trainer whose method (directly or through Accelerate) called us, if any."""
    transformers_trainer = sys.modules.get("transformers.trainer")
    if transformers_trainer is None:
        return None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, transformers_trainer.Trainer):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None
