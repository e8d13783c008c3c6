"""ds_fp4.initialize: deepspeed.initialize plus one "nvfp4" section in the config you already have.

    engine, optimizer, loader, scheduler = ds_fp4.initialize(model=model, config="ds_config.json",
                                                             model_parameters=model.parameters())

It reads the top-level "nvfp4" section, converts the model's linear layers *before* DeepSpeed sees the
model (docs/design.md §5: swapping modules afterwards breaks ZeRO-2/3 bookkeeping), calls deepspeed.initialize
with the rest of the config, and routes gradient (and optionally ZeRO-3 weight) communication through
NVFP4 collectives. The engine gains an ``nvfp4`` attribute (:class:`NVFP4EngineState`) with the
conversion report and the communication byte counters.

A caller that has parsed its config already (launch/ parses the run JSON once, docs/design.md §7) passes
the section as an object instead, ``nvfp4=NVFP4Config(...)``, and a config that is DeepSpeed's alone.
The plugin knows only its own section: every other top-level key goes to DeepSpeed untouched, and
DeepSpeed ignores keys it does not know (checked with 0.19.8), such as a trainer's own sections.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch

from . import comm, deepspeed_patches, rng
from .config_errors import STRICT_FIELDS, NonNegInt, section_errors
from .convert import ConversionReport, convert_to_nvfp4
from .linear import NVFP4Linear
from .recipe import NVFP4Recipe
from .selftest import SelfTestResult

COMM_MODES = ("nvfp4", "none")


@pydantic.dataclasses.dataclass(frozen=True, config=STRICT_FIELDS)
class NVFP4Config:
    """The "nvfp4" section of the DeepSpeed JSON (:meth:`from_dict`), or the same settings built in Python."""

    recipe: NVFP4Recipe = field(default_factory=NVFP4Recipe)
    """Recipe fields (enabled, input, weight, grad, keep_first_blocks, ..., preset) sit directly in the section."""
    grad_comm: Literal[COMM_MODES] = "none"
    """"nvfp4": gradients are reduced as NVFP4 (stochastic rounding, unbiased); "none": DeepSpeed's own."""
    weight_comm: Literal[COMM_MODES] = "none"
    """"nvfp4": ZeRO-3 all-gathers NVFP4Linear weights as NVFP4 (stage 3 only); "none": full precision."""
    seed: NonNegInt = 0
    """Seed of the communication's stochastic rounding (layer SR seeds follow torch.manual_seed)."""
    sr_rank_seeds: pydantic.StrictBool = True
    """Fold the data-parallel rank into the layers' stochastic-rounding seeds (ds_fp4.rng.set_rank_fold), so
    that ranks which seed torch alike (HF Trainer, most scripts) draw independent rounding noise, which
    then averages out in the gradient reduction. Rank 0 draws as before. launch/ turns it off: the trainer
    seeds every rank from (seed, step, rank) itself."""
    stats_interval: NonNegInt = 0
    """Every N steps the trainer logs per-layer quantization health (0: never)."""
    selftest: pydantic.StrictBool = True
    """Run ds_fp4.selftest once per process on the run's device and backend before converting, and refuse
    to train if it fails (a kernel computing wrong numbers on this GPU). false: skip it."""

    @classmethod
    def own_keys(cls) -> list[str]:
        """The section's keys that are not the recipe's."""
        return [name for name in cls.__pydantic_fields__ if name != "recipe"]

    @classmethod
    def valid_keys(cls) -> list[str]:
        return sorted([*cls.own_keys(), *NVFP4Recipe.field_names(), "preset"])

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> NVFP4Config:
        """Parse the flat "nvfp4" section; a bad value names nvfp4.<key>, an unknown key lists the valid ones."""
        if section is not None and not isinstance(section, Mapping):
            raise ValueError(f"the \"nvfp4\" config section must be an object; got {section!r}")
        section = dict(section or {})
        own = {k: section.pop(k) for k in cls.own_keys() if k in section}
        with section_errors("nvfp4", NVFP4Recipe, valid=cls.valid_keys()):
            return cls(recipe=NVFP4Recipe.from_dict(section), **own)

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), **{k: getattr(self, k) for k in self.own_keys()}}


@dataclass
class NVFP4EngineState:
    """What ds_fp4 attaches to the engine as ``engine.nvfp4``."""

    config: NVFP4Config
    report: ConversionReport | None
    comm: comm.CommState
    layers: dict[str, NVFP4Linear]
    selftest: SelfTestResult | None = None
    """This process's self-test on the run's device and backend (None: nvfp4.selftest is false, or NVFP4
    is disabled)."""

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
    """A DeepSpeed config as a dict, from what deepspeed.initialize accepts: a mapping (deep-copied), a
    file path, or the base64 of a JSON object. Files and base64 are read with hjson, as DeepSpeed reads
    them (comments and trailing commas allowed)."""
    import hjson

    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"a DeepSpeed config is a dict, a JSON file path or base64 JSON; got {type(config).__name__}")
    if os.path.exists(config):
        with open(config) as f:
            return hjson.load(f, object_pairs_hook=dict)
    try:
        loaded = hjson.loads(base64.urlsafe_b64decode(str(config)).decode("utf-8"), object_pairs_hook=dict)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        loaded = None
    if not isinstance(loaded, dict):
        raise FileNotFoundError(f"DeepSpeed config {str(config)!r} is neither an existing file nor base64 JSON")
    return loaded


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


def validate_model(cfg: NVFP4Config, model: torch.nn.Module) -> None:
    """Refuse what NVFP4 gradient communication would leave uncovered: expert-parallel parameters.

    DeepSpeed's own MoE (deepspeed.moe.layer.MoE) and AutoEP mark expert parameters ``allreduce=False``
    and reduce their gradients over expert-data-parallel groups, a path the NVFP4 patches do not replace;
    training on would send them in BF16 while the run reports NVFP4 communication.
    """
    if cfg.grad_comm != "nvfp4":
        return
    experts = [name for name, p in model.named_parameters() if getattr(p, "allreduce", True) is False]
    if experts:
        raise ValueError(
            f"nvfp4.grad_comm=\"nvfp4\" does not cover expert-parallel parameters: {len(experts)} parameters are "
            f"DeepSpeed MoE / AutoEP experts (allreduce=False, e.g. {experts[0]!r}), whose gradients reduce over "
            "expert-data-parallel groups that ds_fp4 does not compress. Use a transformers MoE model with fused "
            "experts (Qwen3-MoE, Mixtral, DeepSeek-V3, gpt-oss, Nemotron-H: ds_fp4 runs their experts and their "
            "gradients in NVFP4, docs/moe.md), or set nvfp4.grad_comm to \"none\" (the experts' nn.Linear "
            "layers still compute in NVFP4)"
        )


def initialize(model: torch.nn.Module | None = None, config: Any = None, nvfp4: NVFP4Config | None = None,
               **kwargs):
    """Drop-in for ``deepspeed.initialize``: the same arguments and the same 4-tuple, plus ``nvfp4``.

    The NVFP4 settings come from one place: ``nvfp4=NVFP4Config(...)``, already parsed, with a ``config``
    that holds no "nvfp4" section; or else the "nvfp4" section of ``config`` (a DeepSpeed JSON path or
    dict), parsed here; or neither, which is ``NVFP4Config()`` (the paper's recipe, DeepSpeed's own
    collectives). Everything else in ``config`` goes to DeepSpeed. See the module docstring.
    """
    if model is None:
        raise ValueError("ds_fp4.initialize needs model=...")
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None and getattr(kwargs.get("args"), "deepspeed_config", None):
        config = kwargs["args"].deepspeed_config
    if config is None:
        raise ValueError("ds_fp4.initialize needs config=<DeepSpeed JSON path or dict>")
    ds_config = load_config(config)
    section = ds_config.pop("nvfp4", None)
    if nvfp4 is None:
        cfg = NVFP4Config.from_dict(section)
    elif not isinstance(nvfp4, NVFP4Config):
        raise TypeError(f"nvfp4= takes an NVFP4Config (a JSON section goes in config[\"nvfp4\"], or through "
                        f"NVFP4Config.from_dict); got {type(nvfp4).__name__}")
    elif section is not None:
        raise ValueError("the NVFP4 settings were given twice, as nvfp4= and as the config's \"nvfp4\" section; "
                         "keep one")
    else:
        cfg = nvfp4
    validate(cfg, ds_config)
    validate_model(cfg, model)
    checked = run_selftest(cfg)

    report = convert_to_nvfp4(model, cfg.recipe) if cfg.recipe.enabled else None
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    state = comm.CommState(seed=cfg.seed, backend=cfg.recipe.backend)

    args = kwargs.get("args")
    given = getattr(args, "deepspeed_config", None)
    try:
        if given:  # DeepSpeed refuses a config given twice: it gets the dict without the nvfp4 section
            args.deepspeed_config = None  # on the caller's args, which DeepSpeed writes local_rank back to
        engine, optimizer, loader, scheduler = deepspeed_patches.original_initialize()(
            model=model, config=ds_config, **kwargs)
    finally:
        if given:
            args.deepspeed_config = given

    engine.nvfp4 = NVFP4EngineState(config=cfg, report=report, comm=state, layers=layers, selftest=checked)
    engine.nvfp4.set_comm_active(engine, True)
    rng.set_rank_fold(data_parallel_rank(engine) if cfg.sr_rank_seeds else 0)
    carry_comm_state(engine)
    return engine, optimizer, loader, scheduler


COMM_STATE_KEY = "nvfp4_comm"


def carry_comm_state(engine) -> None:
    """Make the engine's checkpoints carry the NVFP4 communication's seed counter (CommState.calls).

    ``engine.save_checkpoint`` adds it to the checkpoint's client state (as "nvfp4_comm", unless the caller
    put it there) and ``engine.load_checkpoint`` restores it, so that a resumed run draws the same rounding
    noise as the run it continues. HF Trainer, Accelerate and Lightning checkpoint through these two
    methods and know nothing of it. Torch's generator, which the layers' seeds come from, is theirs to
    save: each of them does.
    """
    save, load = engine.save_checkpoint, engine.load_checkpoint
    save_signature = inspect.signature(save)

    @functools.wraps(save)
    def save_checkpoint(*args, **kwargs):
        bound = save_signature.bind(*args, **kwargs)
        client_state = dict(bound.arguments.get("client_state") or {})
        client_state.setdefault(COMM_STATE_KEY, engine.nvfp4.comm.state_dict())
        bound.arguments["client_state"] = client_state
        return save(*bound.args, **bound.kwargs)

    @functools.wraps(load)
    def load_checkpoint(*args, **kwargs):
        load_path, client_state = load(*args, **kwargs)
        if load_path is not None and client_state and COMM_STATE_KEY in client_state:
            engine.nvfp4.comm.load_state_dict(client_state[COMM_STATE_KEY])
        return load_path, client_state

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def run_selftest(cfg: NVFP4Config) -> SelfTestResult | None:
    """ds_fp4.selftest on the accelerator device this process trains on, once per process; RuntimeError
    with the failed check and the way out when it fails."""
    if not (cfg.selftest and cfg.recipe.enabled):
        return None
    from deepspeed.accelerator import get_accelerator

    from .selftest import selftest

    accelerator = get_accelerator()
    # This rank's device: DeepSpeed has not set it yet, and the current one may still be device 0.
    local_rank = os.environ.get("LOCAL_RANK")
    device = accelerator.device_name(int(local_rank)) if local_rank else accelerator.current_device_name()
    result = selftest(torch.device(device), cfg.recipe.backend, cached=True)
    if not result.ok:
        raise RuntimeError(
            f"{result}\nds_fp4 will not train on numbers that fail its self-test: the NVFP4 kernels compute "
            f"wrong results on {result.device} with the {result.backend} backend. Try \"backend\": \"torch\" in "
            "the nvfp4 section (slower, the reference), or set \"selftest\": false there to train anyway.")
    return result


def data_parallel_rank(engine) -> int:
    """This process's rank among the ranks whose gradients are reduced together (the data-parallel group,
    or with sequence parallelism the sequence-data-parallel group)."""
    import deepspeed.comm as ds_dist

    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    return ds_dist.get_rank(group=group) if group is not None else ds_dist.get_rank()
