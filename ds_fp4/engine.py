"""ds_fp4.initialize: deepspeed.initialize plus one "nvfp4" section in the config you already have.

    engine, optimizer, loader, scheduler = ds_fp4.initialize(model=model, config="ds_config.json",
                                                             model_parameters=model.parameters())

It reads the top-level "nvfp4" section, converts the model's linear layers *before* DeepSpeed sees the
model (docs/design.md §5: swapping modules afterwards breaks ZeRO-2/3 bookkeeping), calls deepspeed.initialize
with the rest of the config, and routes gradient (and optionally ZeRO-3 weight) communication through
NVFP4 collectives. The engine gains an ``nvfp4`` attribute (:class:`NVFP4EngineState`) with the
conversion report and the communication byte counters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import comm, deepspeed_patches
from .convert import ConversionReport, convert_to_nvfp4
from .linear import NVFP4Linear
from .recipe import NVFP4Recipe

# Top-level keys of the run JSON that belong to ds_fp4 / the trainer, not to DeepSpeed (docs/design.md §4).
OWN_SECTIONS = ("nvfp4", "model", "data", "trainer")
COMM_MODES = ("nvfp4", "none")


@dataclass(frozen=True)
class NVFP4Config:
    """The "nvfp4" section of the DeepSpeed JSON."""

    recipe: NVFP4Recipe = field(default_factory=NVFP4Recipe)
    """Recipe fields (enabled, input, weight, grad, keep_first_blocks, ..., preset) sit directly in the section."""
    grad_comm: str = "none"
    """"nvfp4": gradients are reduced as NVFP4 (stochastic rounding, unbiased); "none": DeepSpeed's own."""
    weight_comm: str = "none"
    """"nvfp4": ZeRO-3 all-gathers NVFP4Linear weights as NVFP4 (stage 3 only); "none": full precision."""
    seed: int = 0
    """Seed of the communication's stochastic rounding (layer SR seeds follow torch.manual_seed)."""
    stats_interval: int = 0
    """Every N steps the trainer logs per-layer quantization health (0: never)."""

    _OWN = ("grad_comm", "weight_comm", "seed", "stats_interval")

    def __post_init__(self) -> None:
        for name in ("grad_comm", "weight_comm"):
            if getattr(self, name) not in COMM_MODES:
                raise ValueError(f"nvfp4.{name} must be one of {COMM_MODES}; got {getattr(self, name)!r}")
        for name in ("seed", "stats_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"nvfp4.{name} must be an integer >= 0; got {value!r}")

    @classmethod
    def valid_keys(cls) -> list[str]:
        return sorted([*cls._OWN, *NVFP4Recipe.field_names(), "preset"])

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> NVFP4Config:
        section = dict(section or {})
        unknown = sorted(set(section) - set(cls.valid_keys()))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the \"nvfp4\" config section; valid keys: {cls.valid_keys()}"
            )
        own = {k: section.pop(k) for k in cls._OWN if k in section}
        return cls(recipe=NVFP4Recipe.from_dict(section), **own)

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}}


@dataclass
class NVFP4EngineState:
    """What ds_fp4 attaches to the engine as ``engine.nvfp4``."""

    config: NVFP4Config
    report: ConversionReport | None
    comm: comm.CommState
    layers: dict[str, NVFP4Linear]

    def set_comm_active(self, engine, active: bool) -> None:
        """NVFP4 communication as configured (True), or DeepSpeed's own collectives (False), e.g. for a
        BF16 tail (paper App. D) where the whole model, its gradient traffic included, runs in BF16."""
        deepspeed_patches.activate_grad_comm(engine, self.comm if active and self.config.grad_comm == "nvfp4" else None)
        deepspeed_patches.activate_weight_comm([m.weight for m in self.layers.values()],
                                   self.comm if active and self.config.weight_comm == "nvfp4" else None)

    def comm_stats(self, reset: bool = True) -> dict[str, float]:
        """Bytes sent through NVFP4 collectives since the last call, and the uncompressed equivalents."""
        out = {}
        for kind, stats in (("grad", self.comm.grad_stats), ("weight", self.comm.weight_stats)):
            s = stats.snapshot_and_reset() if reset else stats
            out.update({
                f"{kind}_bytes_sent": s.bytes_sent,
                f"{kind}_bytes_baseline": s.bytes_baseline,
                f"{kind}_bytes_bf16": s.bytes_bf16,
                f"{kind}_bytes_saved": s.bytes_baseline - s.bytes_sent,
            })
        return out


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The run config as a dict: a JSON file path or a mapping (copied)."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config))  # deep copy, and proof that it is JSON
    with open(config) as f:
        return json.load(f)


def split_config(full: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed's config without our sections, our sections)."""
    ds = {k: v for k, v in full.items() if k not in OWN_SECTIONS}
    own = {k: full[k] for k in OWN_SECTIONS if k in full}
    return ds, own


def _zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def validate(cfg: NVFP4Config, ds_config: Mapping[str, Any]) -> None:
    """Reject combinations that cannot work, saying why."""
    stage = _zero_stage(ds_config)
    zero = ds_config.get("zero_optimization") or {}
    if cfg.weight_comm == "nvfp4" and stage != 3:
        raise ValueError(
            f"nvfp4.weight_comm=\"nvfp4\" compresses ZeRO-3 weight all-gathers, but zero_optimization.stage is "
            f"{stage}; use stage 3 or set weight_comm to \"none\""
        )
    zeropp_weights = zero.get("zero_quantized_weights") or zero.get("zero_hpz_partition_size", 1) > 1
    if cfg.weight_comm == "nvfp4" and zeropp_weights:
        raise ValueError(
            "nvfp4.weight_comm=\"nvfp4\" cannot be combined with DeepSpeed's zero_quantized_weights / "
            "zero_hpz_partition_size (ZeRO++): both replace the same weight all-gather; pick one"
        )
    if cfg.grad_comm == "nvfp4" and zero.get("zero_quantized_gradients"):
        raise ValueError(
            "nvfp4.grad_comm=\"nvfp4\" cannot be combined with zero_quantized_gradients (ZeRO++ qgZ): both "
            "replace the gradient reduction; pick one"
        )
    if cfg.grad_comm == "nvfp4" and (ds_config.get("fp16") or {}).get("enabled"):
        raise ValueError(
            "nvfp4.grad_comm=\"nvfp4\" is not supported with fp16 dynamic loss scaling: loss-scaled gradients are "
            "checked for overflow after the reduction, a path ds_fp4 cannot test (no fp16 on the CPU "
            "accelerator). Train in bf16 (\"bf16\": {\"enabled\": true}), as the NVFP4 recipe does, or set "
            "grad_comm to \"none\""
        )


def initialize(model: torch.nn.Module | None = None, config: Any = None, **kwargs):
    """Drop-in for ``deepspeed.initialize``; same arguments, same 4-tuple. See the module docstring."""
    import deepspeed

    if model is None:
        raise ValueError("ds_fp4.initialize needs model=...")
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None and getattr(kwargs.get("args"), "deepspeed_config", None):
        config = kwargs["args"].deepspeed_config
    if config is None:
        raise ValueError("ds_fp4.initialize needs config=<DeepSpeed JSON path or dict>")
    full = load_config(config)
    ds_config, own = split_config(full)
    cfg = NVFP4Config.from_dict(own.get("nvfp4"))
    validate(cfg, ds_config)

    report = convert_to_nvfp4(model, cfg.recipe) if cfg.recipe.enabled else None
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    state = comm.CommState(seed=cfg.seed, backend=cfg.recipe.backend)

    if "args" in kwargs and getattr(kwargs["args"], "deepspeed_config", None):
        kwargs["args"].deepspeed_config = None  # we pass the (filtered) dict instead
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=ds_config, **kwargs)

    engine.nvfp4 = NVFP4EngineState(config=cfg, report=report, comm=state, layers=layers)
    engine.nvfp4.set_comm_active(engine, True)
    return engine, optimizer, loader, scheduler
