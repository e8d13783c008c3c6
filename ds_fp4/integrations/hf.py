"""NVFP4 scalars in a Hugging Face Trainer's logs: communication bytes and quantization health.

The patched ``deepspeed.initialize`` adds :class:`NVFP4TrainerCallback` by itself (ds_fp4.integrations);
a script that calls ``ds_fp4.initialize`` some other way may add it as any callback,
``Trainer(..., callbacks=[NVFP4TrainerCallback()])``. At every log it adds:

  nvfp4/grad_bytes_sent, nvfp4/grad_ratio_vs_bf16       NVFP4 gradient traffic since the previous log
  nvfp4/weight_bytes_sent, nvfp4/weight_ratio_vs_bf16   the same for ZeRO-3 weight all-gathers
  nvfp4/{input,weight,grad}_sqnr_db_min                 the worst layer's quantization SQNR, and the
  nvfp4/{input,weight,grad}_underflow_max               worst underflow and saturation fractions
  nvfp4/{input,weight,grad}_saturated_max               (ds_fp4.stats), from the step just logged

Health is collected on the steps the Trainer logs (``logging_steps``) unless the "nvfp4" section sets
``stats_interval``; it costs one dequantize per quantized tensor on those steps only. The ratios count
only traffic that went through NVFP4 collectives (none when grad_comm and weight_comm are "none").
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from ..stats import collect_stats

ROLES = ("input", "weight", "grad")


def summarize_health(figures: dict) -> dict[str, float]:
    """The worst layer's figures per role: minimum SQNR, maximum underflow and saturation."""
    out: dict[str, float] = {}
    for role in ROLES:
        rows = [tensors[role] for tensors in figures.values() if role in tensors]
        if not rows:
            continue
        sqnr = [r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])]
        if sqnr:
            out[f"nvfp4/{role}_sqnr_db_min"] = min(sqnr)
        out[f"nvfp4/{role}_underflow_max"] = max(r["underflow"] for r in rows)
        out[f"nvfp4/{role}_saturated_max"] = max(r["saturated"] for r in rows)
    return out


def comm_scalars(engine) -> dict[str, float]:
    """Bytes through NVFP4 collectives since the last call, and their ratio to the same traffic in bf16."""
    stats = engine.nvfp4.comm_stats(reset=True)
    out: dict[str, float] = {}
    for kind in ("grad", "weight"):
        if stats[f"{kind}_bytes_bf16"]:
            out[f"nvfp4/{kind}_bytes_sent"] = float(stats[f"{kind}_bytes_sent"])
            out[f"nvfp4/{kind}_ratio_vs_bf16"] = stats[f"{kind}_bytes_sent"] / stats[f"{kind}_bytes_bf16"]
    return out


class NVFP4TrainerCallback(TrainerCallback):
    """Adds the NVFP4 scalars (module docstring) to every log of the Trainer it is attached to."""

    def __init__(self, engine=None) -> None:
        self.engine = engine  # None: the newest engine ds_fp4 set up (ds_fp4.integrations.latest_engine)
        self._collecting = None
        self._health: dict[str, float] = {}

    def _engine(self):
        if self.engine is None:
            from . import latest_engine

            self.engine = latest_engine()
        return self.engine if getattr(self.engine, "nvfp4", None) is not None else None

    def _health_due(self, args, state) -> bool:
        engine = self._engine()
        if engine is None or not engine.nvfp4.layers:
            return False
        interval = engine.nvfp4.config.stats_interval
        if not interval and str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps":
            interval = int(state.logging_steps or 0)  # the Trainer's absolute figure (args may hold a ratio)
        return bool(interval) and (state.global_step + 1) % interval == 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self._collecting is None and self._health_due(args, state):
            self._collecting = collect_stats(self._engine().module)
            self._figures = self._collecting.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._collecting is not None:
            self._collecting.__exit__(None, None, None)
            self._collecting = None
            self._health = summarize_health(self._figures)

    def on_log(self, args, state, control, logs=None, **kwargs):
        engine = self._engine()
        if engine is None or logs is None or "loss" not in logs:
            return  # evaluation logs and the end-of-training summary carry no step's traffic
        extra = {**comm_scalars(engine), **self._health}
        self._health = {}
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
            last.update(extra)  # the Trainer appended its copy of logs before calling the callbacks


def attach(trainer, engine) -> NVFP4TrainerCallback:
    """Put an NVFP4TrainerCallback for ``engine`` first among ``trainer``'s callbacks (reusing one the user
    added), so that the reporting callbacks after it log its scalars too."""
    callbacks = trainer.callback_handler.callbacks
    mine = next((cb for cb in callbacks if isinstance(cb, NVFP4TrainerCallback)), None)
    if mine is None:
        mine = NVFP4TrainerCallback()
    else:
        callbacks.remove(mine)
    mine.engine = engine
    callbacks.insert(0, mine)
    return mine
