"""The run config: one DeepSpeed JSON, parsed once, here, into one small dataclass per component.

    {
      "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "optimizer": {...}, "bf16": {...},
      "zero_optimization": {...}, "tensorboard": {...},            <- DeepSpeed's own keys, untouched
      "nvfp4":   {...},   ds_fp4.NVFP4Config (recipe, grad_comm, weight_comm, seed, stats_interval)
      "model":   {...},   ModelConfig: a Hugging Face config, inline or a path
      "data":    {...},   data_pipeline.DataConfig, plus "embedded" to prepare the stdlib corpus
      "trainer": {...}    TrainerConfig: length, schedule, checkpoints, eval, out_dir, bf16 tail
    }

:class:`RunConfig` holds the four sections typed and DeepSpeed's keys as a plain dict (DeepSpeed
validates those itself); the trainer hands DeepSpeed only its own keys and ds_fp4 the parsed NVFP4Config.
Every section is a pydantic dataclass whose field types carry the rules (docs/design.md §7), and every
section's errors go through ``ds_fp4.config_errors.section_errors``, so they read alike:
``trainer.max_steps must be greater than or equal to 1; got 0``, or an unknown key with the valid ones. ``--set
trainer.max_steps=20``-style overrides are applied to the JSON before parsing, so an override is validated
exactly like the file.
"""

from __future__ import annotations

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

SECTIONS = ("nvfp4", "model", "data", "trainer")  # the run's own top-level keys; the rest is DeepSpeed's
SCHEDULE_SHAPES = ("linear", "cosine", "sqrt")

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
        from transformers import AutoConfig

        if isinstance(self.config, str):
            cfg = AutoConfig.from_pretrained(self.config)
            if vocab_size and cfg.vocab_size < vocab_size:
                raise ValueError(f"model vocab_size {cfg.vocab_size} < the data's vocab size {vocab_size}")
            return cfg
        kwargs = dict(self.config)
        kwargs.setdefault("vocab_size", vocab_size)
        if kwargs["vocab_size"] < vocab_size:
            raise ValueError(f"model.config.vocab_size {kwargs['vocab_size']} < the data's vocab size {vocab_size}")
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
            with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)):
                return AutoModelForCausalLM.from_config(hf_config)
        return AutoModelForCausalLM.from_config(hf_config)


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
    """TensorBoard scalars every N steps."""
    bf16_tail_fraction: Fraction = 0.0
    """Switch every NVFP4 layer to high precision for this final fraction of the tokens (paper App. D)."""
    max_consecutive_skips: Positive = 5
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient."""
    seed: Count = 0
    """Base of the per-step RNG seeds (stochastic rounding, dropout), reseeded from (seed, step, rank)."""
    peak_tflops: Annotated[float, Field(strict=True, gt=0)] | None = None
    """Per-device peak for the MFU estimate; None: a table for known GPUs, a measured matmul on CPU."""
    progress: StrictBool = True
    """Show a progress bar on rank 0."""

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


def _section(cls: type, name: str, values: Any) -> Any:
    """``cls(**values)`` for the JSON section ``name``, its errors phrased for that section."""
    if not isinstance(values, Mapping):
        raise ValueError(f"the \"{name}\" config section must be an object; got {values!r}")
    with section_errors(name, cls):
        return cls(**values)


def parse_run_config(config: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Read the run JSON (path or dict), apply overrides, validate every section."""
    source = "<dict>"
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        source = os.fspath(config)
        with open(source) as f:
            raw = json.load(f)
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
    if not raw.get("model"):
        raise ValueError("the run config needs a \"model\" section with a Hugging Face \"config\"")
    data = raw.get("data", {})
    embedded = None
    if isinstance(data, Mapping) and "embedded" in data:
        data = dict(data)
        section = data.pop("embedded")
        embedded = _section(EmbeddedCorpusConfig, "data.embedded", {} if section is True else section)
        data.setdefault("sources", [{"path": embedded.out_dir, "weight": 1.0}])
    return RunConfig(
        deepspeed=ds,
        nvfp4=NVFP4Config.from_dict(raw.get("nvfp4")),
        model=_section(ModelConfig, "model", raw["model"]),
        data=_section(DataConfig, "data", data),
        embedded=embedded,
        trainer=_section(TrainerConfig, "trainer", raw.get("trainer", {})),
        source=source,
        raw=raw,
    )
