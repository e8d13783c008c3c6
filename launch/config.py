"""The run config: one DeepSpeed JSON, parsed once, here, into one small dataclass per component.

    {
      "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "optimizer": {...}, "bf16": {...},
      "zero_optimization": {...}, "tensorboard": {...},            <- DeepSpeed's own keys, untouched
      "nvfp4":   {...},   ds_fp4.NVFP4Config (recipe, grad_comm, weight_comm, seed, stats_interval)
      "model":   {...},   ModelConfig: a Hugging Face config, inline or a path
      "data":    {...},   data_pipeline.DataConfig, plus "embedded" to prepare the stdlib corpus
      "trainer": {...}    TrainerConfig: length, schedule, checkpoints, eval, out_dir, bf16 tail
    }

:class:`RunConfig` holds the four sections typed and DeepSpeed's keys as a plain dict; the trainer hands
DeepSpeed only its own keys and ds_fp4 the parsed NVFP4Config. DeepSpeed validates its keys' values
itself, but ignores keys it does not know: launch/deepspeed_keys.py asks DeepSpeed which keys it reads and
refuses the rest, at parse time. Rules between sections are checked here too, each naming the fix: the
batch arithmetic (fully once the world size is known: RunConfig.check_world_size) and data.seq_len
against the model's position limit.
Every section is a pydantic dataclass whose field types carry the rules (docs/design.md §7), and every
section's errors go through ``ds_fp4.config_errors.section_errors``, so they read alike:
``trainer.max_steps must be greater than or equal to 1; got 0``, or an unknown key with the valid ones. ``--set
trainer.max_steps=20``-style overrides are applied to the JSON before parsing, so an override is validated
exactly like the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field, StrictBool, field_validator

from data_pipeline import DataConfig
from ds_fp4 import NVFP4Config
from ds_fp4.config_errors import section_errors

from .deepspeed_keys import check_deepspeed_keys

SECTIONS = ("nvfp4", "model", "data", "trainer")  # the run's own top-level keys; the rest is DeepSpeed's
SCHEDULE_SHAPES = ("linear", "cosine", "sqrt")
# A transformers config's longest sequence, by the names architectures give it (the first one set counts;
# max_position_embeddings also reaches GPT-2's n_positions through transformers' attribute_map).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")

# Field types: strict numbers (true is not 1, "2" is not 2), bounds in the type.
Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Fraction = Annotated[float, Field(strict=True, ge=0, le=1)]
validated = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))


@validated
class ModelConfig:
    """The model to train: any Hugging Face causal LM that AutoModelForCausalLM.from_config builds."""

    config: dict[str, Any] | str
    """A transformers config: inline (must name "model_type") or a path to a config.json or its directory."""
    init_seed: Count = 0
    """Seed of the weight initialisation (identical on every rank)."""

    @field_validator("config", mode="before")
    @classmethod
    def _existing_config(cls, value: Any) -> Any:
        if isinstance(value, str):
            path = value if not os.path.isdir(value) else os.path.join(value, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"{value!r} is not a config.json or a directory holding one")
        elif not isinstance(value, Mapping) or "model_type" not in value:
            raise ValueError(f"give a path or an inline config with \"model_type\" (e.g. \"llama\"); got {value!r}")
        return value

    def hf_config(self, vocab_size: int):
        """The transformers config, with vocab_size taken from the data unless the config sets it."""
        if isinstance(self.config, str):
            cfg = self._transformers_config()
            if vocab_size and cfg.vocab_size < vocab_size:
                raise ValueError(f"model vocab_size {cfg.vocab_size} < the data's vocab size {vocab_size}")
            return cfg
        if self.config.get("vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"model.config.vocab_size {self.config['vocab_size']} < the data's vocab size "
                             f"{vocab_size}")
        return self._transformers_config(vocab_size=vocab_size)

    def check_positions(self, seq_len: int) -> None:
        """Refuse a data.seq_len longer than the model's position limit (max_position_embeddings, or its
        name in another architecture's config): RoPE models would train past it without a word, and the
        exported config would still claim the shorter limit. A model without such a limit is not checked."""
        cfg = self._transformers_config()
        name = next((n for n in POSITION_LIMITS if isinstance(getattr(cfg, n, None), int)), None)
        if name is None or seq_len <= getattr(cfg, name):
            return
        limit = getattr(cfg, name)
        where = f"{name} in {self.config}" if isinstance(self.config, str) else f"model.config.{name}"
        raise ValueError(f"data.seq_len {seq_len} is longer than the model's position limit, {where} = {limit}; "
                         f"raise {where} to {seq_len} or more, or lower data.seq_len to {limit} or less")

    def _transformers_config(self, **defaults: Any):
        """AutoConfig from the path, or from the inline keys over ``defaults``."""
        from transformers import AutoConfig

        if isinstance(self.config, str):
            return AutoConfig.from_pretrained(self.config)
        kwargs = {**defaults, **self.config}
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

    def build(self, hf_config, ds_config: Mapping[str, Any]):
        """The model, initialised from init_seed; under ZeRO-3 inside deepspeed.zero.Init(ds_config), so
        that no rank ever materialises the full model."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        # Resolve the class (importing its module) before zero.Init, as Hugging Face's from_pretrained
        # does: a module imported under zero.Init's patched tensor constructors is a hazard of its own.
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
        torch.manual_seed(self.init_seed)
        if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3:
            with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)), _hf_init_deferred():
                model = AutoModelForCausalLM.from_config(hf_config)
            _init_partitioned(model)
            return model
        return AutoModelForCausalLM.from_config(hf_config)


@contextlib.contextmanager
def _hf_init_deferred():
    """Hugging Face's weight init switched off (the modules' own __init__ and the weight tying still run)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def _init_partitioned(model) -> None:
    """Run the model's own weight init on a model built under zero.Init, module by module.

    zero.Init partitions a module's parameters as soon as its __init__ returns, so the init Hugging Face
    runs afterwards would write into empty placeholders (deferred: _hf_init_deferred). A parameter its
    module leaves as torch.empty (the 3-D weights of fused MoE experts, Mamba's A_log and dt_bias) would
    keep whatever memory held: NaN losses from the first step.

    As Hugging Face does, children are initialised before their parents (a parent's init may rescale a
    child's weight, as Mamba's does for out_proj), each by the init of the nearest PreTrainedModel that
    owns it. A module's parameters are gathered with those of its subtree, unless the subtree holds a
    ModuleList (the blocks): then only its own, so that no more than one block is ever whole. Every rank
    draws the same values from the same seed.
    """
    import deepspeed
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    owner = {}
    for pm in model.modules():  # pre-order: a nested PreTrainedModel overrides its ancestors' claim
        if isinstance(pm, PreTrainedModel):
            for m in pm.modules():
                owner[id(m)] = pm
    with torch.no_grad():
        for module in reversed(list(model.modules())):
            pm = owner.get(id(module))
            if pm is None or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                continue
            whole = not any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) for m in module.modules())
            params = list(module.parameters(recurse=whole))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
                pm._init_weights(module)


@validated
class EmbeddedCorpusConfig:
    """Prepare the embedded default corpus (the stdlib sources) on first use."""

    out_dir: Annotated[str, Field(strict=True, min_length=1)] = "runs/data/stdlib"
    """Where the prepared shards, manifest and tokenizer go."""
    vocab_size: Annotated[int, Field(strict=True, ge=257)] = 4096
    """Byte-level BPE vocabulary trained on the corpus."""
    eval_fraction: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.02
    """Documents held out for evaluation."""
    max_files: Positive | None = None
    """Only the first N sorted files (None: all)."""


@validated
class TrainerConfig:
    """The training loop: length, schedule, checkpoints, evaluation, logging."""

    out_dir: Annotated[str, Field(strict=True, min_length=1)] = "runs/default"
    """Checkpoints (out_dir/checkpoints) and TensorBoard events (out_dir/tensorboard) go here."""
    max_steps: Positive | None = None
    """Optimizer steps to train (exactly one of max_steps / max_tokens)."""
    max_tokens: Positive | None = None
    """Tokens to train on; converted to steps with the global batch and seq_len."""
    warmup_steps: Count = 0
    """Warmup-stable-decay: linear warmup from 0 to the optimizer's lr over this many steps..."""
    decay_fraction: Fraction = 0.2
    """...then constant, then a decay over this final fraction of the steps (paper: 0.2)..."""
    decay_shape: Literal[SCHEDULE_SHAPES] = "linear"
    """...shaped "linear", "cosine" or "sqrt" (1 - sqrt), ..."""
    min_lr_ratio: Fraction = 0.0
    """...down to this fraction of the peak lr."""
    save_interval: Count = 0
    """Checkpoint every N steps (0: only at the end and on preemption)."""
    keep_checkpoints: Positive = 3
    """How many complete checkpoints to keep (oldest deleted first)."""
    eval_interval: Count = 0
    """Evaluate on the held-out split every N steps (0: never)."""
    eval_batches: Positive = 4
    """Global batches per evaluation."""
    log_interval: Positive = 1
    """TensorBoard scalars, and the console's step line when there is no progress bar, every N steps."""
    bf16_tail_fraction: Fraction = 0.0
    """Switch every NVFP4 layer to high precision for this final fraction of the tokens (paper App. D)."""
    max_consecutive_skips: Positive = 5
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient."""
    seed: Count = 0
    """Base of the per-step RNG seeds (stochastic rounding, dropout), reseeded from (seed, step, rank)."""
    peak_tflops: Annotated[float, Field(strict=True, gt=0)] | None = None
    """Per-device peak for the MFU estimate; None: a table for known GPUs, a measured matmul on CPU."""
    progress: StrictBool = True
    """A progress bar on rank 0 when stdout is a terminal; false, or stdout piped to a file: a plain line
    every log_interval steps instead (launch/console.py). Per-step output is never switched off."""
    allow_config_change: tuple[Annotated[str, Field(strict=True, min_length=1)], ...] = ()
    """Keys (``"data.seq_len"``) or whole sections (``"data"``) allowed to differ from the checkpoint's run
    config on resume; any other change that alters the run is refused (launch/resume.py)."""

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError(f"give exactly one of max_steps / max_tokens; got {self.max_steps!r} / "
                             f"{self.max_tokens!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: each component's section parsed and validated, DeepSpeed's keys as given."""

    deepspeed: dict[str, Any]
    """DeepSpeed's own keys only (no "nvfp4", "model", "data", "trainer"); DeepSpeed validates them."""
    nvfp4: NVFP4Config
    model: ModelConfig
    data: DataConfig
    embedded: EmbeddedCorpusConfig | None
    trainer: TrainerConfig
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict)
    """The whole JSON after overrides (saved with the run)."""

    @property
    def global_batch(self) -> int:
        return int(self.deepspeed["train_batch_size"])

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    def check_world_size(self, world_size: int) -> None:
        """The batch arithmetic on ``world_size`` ranks (see check_batch); train.py calls it once the
        process group exists, before DeepSpeed asserts the same rule with bare numbers."""
        check_batch(self.global_batch, self.micro_batch, world_size)

    def total_steps(self, seq_len: int | None = None) -> int:
        if self.trainer.max_steps is not None:
            return self.trainer.max_steps
        tokens_per_step = self.global_batch * (seq_len or self.data.seq_len)
        return max(1, -(-self.trainer.max_tokens // tokens_per_step))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as JSON, else kept as a string) set into a copy of ``raw``."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return raw


class ConfigError(ValueError):
    """A config mistake found once the ranks run (the batch arithmetic on the world size, say), alike on
    every rank because every rank reads the same config: launch/train.py prints it once, from rank 0,
    without a traceback. (While the config is parsed, before the ranks meet, any ValueError counts.)"""


def check_batch(global_batch: int, micro_batch: int, world_size: int | None = None) -> None:
    """DeepSpeed's rule train_batch_size = train_micro_batch_size_per_gpu x gradient accumulation steps x
    world size, as a ConfigError naming the three numbers and what to change. Without the world size (the
    config is parsed before the ranks are known) only the part every world size shares is checked."""
    G, B, W = global_batch, micro_batch, world_size or 1
    if G % (B * W) == 0:
        return
    nearest = " or ".join(str(n) for n in (G // (B * W) * B * W, (G // (B * W) + 1) * B * W) if n)
    if world_size is None:
        raise ConfigError(f"train_batch_size {G} must be divisible by train_micro_batch_size_per_gpu {B} x the "
                         f"world size; choose train_batch_size as a multiple of {B} x the number of ranks "
                         f"(e.g. {nearest} on one rank)")
    fix = f"choose train_batch_size as a multiple of {B * W} ({nearest})"
    if G % W == 0:
        fix += f", or a train_micro_batch_size_per_gpu that divides {G} / {W} = {G // W}"
    if G % B == 0:
        fix += f", or a number of ranks that divides {G} / {B} = {G // B}"
    raise ConfigError(f"train_batch_size {G} must be divisible by train_micro_batch_size_per_gpu x world size = "
                     f"{B} x {W} = {B * W}; {fix} (gradient accumulation steps = train_batch_size / "
                     f"(train_micro_batch_size_per_gpu x world size))")


def _section(cls: type, name: str, values: Any) -> Any:
    """``cls(**values)`` for the JSON section ``name``, its errors phrased for that section."""
    if not isinstance(values, Mapping):
        raise ValueError(f"the \"{name}\" config section must be an object; got {values!r}")
    with section_errors(name, cls):
        return cls(**values)


def parse_run_config(config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Read the run JSON (path or dict), apply overrides, validate every section, and the rules between
    them that are known before the ranks start: DeepSpeed's keys against DeepSpeed (launch/deepspeed_keys.py),
    the batch arithmetic as far as it holds for every world size, and data.seq_len against the model."""
    source = "<dict>"
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        source = os.fspath(config)
        try:
            with open(source) as f:
                raw = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read the run config {source!r}: {e.strerror}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"the run config {source!r} must hold a JSON object; got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    ds = {k: v for k, v in raw.items() if k not in SECTIONS}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(ds.get(key), int) or ds[key] < 1:
            raise ValueError(f"the run config needs an integer {key} >= 1 (the data order depends on it); "
                             f"got {ds.get(key)!r}")
    if "gradient_accumulation_steps" in ds:
        raise ValueError(
            "remove gradient_accumulation_steps from the config: it is derived as train_batch_size / "
            "(train_micro_batch_size_per_gpu x world size), so a resume on another world size keeps the global batch"
        )
    check_batch(ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"])
    check_deepspeed_keys(ds, SECTIONS)
    if not raw.get("model"):
        raise ValueError("the run config needs a \"model\" section with a Hugging Face \"config\"")
    data = raw.get("data", {})
    embedded = None
    if isinstance(data, Mapping) and "embedded" in data:
        data = dict(data)
        section = data.pop("embedded")
        embedded = _section(EmbeddedCorpusConfig, "data.embedded", {} if section is True else section)
        data.setdefault("sources", [{"path": embedded.out_dir, "weight": 1.0}])
    cfg = RunConfig(
        deepspeed=ds,
        nvfp4=NVFP4Config.from_dict(raw.get("nvfp4")),
        model=_section(ModelConfig, "model", raw["model"]),
        data=_section(DataConfig, "data", data),
        embedded=embedded,
        trainer=_section(TrainerConfig, "trainer", raw.get("trainer", {})),
        source=source,
        raw=raw,
    )
    cfg.model.check_positions(cfg.data.seq_len)
    return cfg
