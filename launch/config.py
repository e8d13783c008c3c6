"""The run config: one DeepSpeed JSON, parsed once, here, into one small dataclass per component.

    {
      "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "optimizer": {...}, "bf16": {...},
      "zero_optimization": {...}, "tensorboard": {...},            <- DeepSpeed's own keys, untouched
      "nvfp4":   {...},   ds_fp4.NVFP4Config (recipe, grad_comm, weight_comm, seed, stats_interval)
      "model":   {...},   ModelConfig: a Hugging Face config, inline or a path
      "data":    {...},   data_pipeline.DataConfig, plus "embedded" to prepare the stdlib corpus
      "trainer": {...}    TrainerConfig: length, schedule, checkpoints, eval, out_dir, bf16 tail
    }

Unknown keys inside our four sections are errors that name the key and list the valid ones; DeepSpeed
validates its own keys. ``--set trainer.max_steps=20``-style overrides are applied to the JSON before
parsing, so an override is validated exactly like the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from data_pipeline import DataConfig
from ds_fp4.engine import NVFP4Config, split_config


def _check_keys(section: str, given: Mapping[str, Any], cls) -> None:
    valid = sorted(f.name for f in fields(cls))
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the \"{section}\" config section; valid keys: {valid}")


def _int(section: str, name: str, value: Any, low: int = 0, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{section}.{name} must be an integer >= {low}; got {value!r}")


def _fraction(section: str, name: str, value: Any, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok or (upper_open and value == 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{section}.{name} must be a number in {bound}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The model to train: any Hugging Face causal LM that AutoModelForCausalLM.from_config builds."""

    config: Mapping[str, Any] | str = field(default_factory=dict)
    """A transformers config: inline (must name "model_type") or a path to a config.json or its directory."""
    init_seed: int = 0
    """Seed of the weight initialisation (identical on every rank)."""

    def __post_init__(self) -> None:
        if isinstance(self.config, str):
            path = self.config if not os.path.isdir(self.config) else os.path.join(self.config, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"model.config = {self.config!r} is not a config.json or a directory holding one")
        elif not isinstance(self.config, Mapping) or "model_type" not in self.config:
            raise ValueError(
                "model.config must be a path or an inline config with \"model_type\" (e.g. \"llama\"); "
                f"got {self.config!r}"
            )
        _int("model", "init_seed", self.init_seed)

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


@dataclass(frozen=True)
class EmbeddedCorpusConfig:
    """Prepare the embedded default corpus (the stdlib sources) on first use."""

    out_dir: str = "runs/data/stdlib"
    """Where the prepared shards, manifest and tokenizer go."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary trained on the corpus."""
    eval_fraction: float = 0.02
    """Documents held out for evaluation."""
    max_files: int | None = None
    """Only the first N sorted files (None: all)."""

    def __post_init__(self) -> None:
        _int("data.embedded", "vocab_size", self.vocab_size, low=257)
        _fraction("data.embedded", "eval_fraction", self.eval_fraction, upper_open=True)
        _int("data.embedded", "max_files", self.max_files, low=1, optional=True)


SCHEDULE_SHAPES = ("linear", "cosine", "sqrt")


@dataclass(frozen=True)
class TrainerConfig:
    """The training loop: length, schedule, checkpoints, evaluation, logging."""

    out_dir: str = "runs/default"
    """Checkpoints (out_dir/checkpoints) and TensorBoard events (out_dir/tensorboard) go here."""
    max_steps: int | None = None
    """Optimizer steps to train (exactly one of max_steps / max_tokens)."""
    max_tokens: int | None = None
    """Tokens to train on; converted to steps with the global batch and seq_len."""
    warmup_steps: int = 0
    """Warmup-stable-decay: linear warmup from 0 to the optimizer's lr over this many steps..."""
    decay_fraction: float = 0.2
    """...then constant, then a decay over this final fraction of the steps (paper: 0.2)..."""
    decay_shape: str = "linear"
    """...shaped "linear", "cosine" or "sqrt" (1 - sqrt), ..."""
    min_lr_ratio: float = 0.0
    """...down to this fraction of the peak lr."""
    save_interval: int = 0
    """Checkpoint every N steps (0: only at the end and on preemption)."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep (oldest deleted first)."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: never)."""
    eval_batches: int = 4
    """Global batches per evaluation."""
    log_interval: int = 1
    """TensorBoard scalars every N steps."""
    bf16_tail_fraction: float = 0.0
    """Switch every NVFP4 layer to high precision for this final fraction of the tokens (paper App. D)."""
    max_consecutive_skips: int = 5
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient."""
    seed: int = 0
    """Base of the per-step RNG seeds (stochastic rounding, dropout), reseeded from (seed, step, rank)."""
    peak_tflops: float | None = None
    """Per-device peak for the MFU estimate; None: a table for known GPUs, a measured matmul on CPU."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        s = "trainer"
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError(f"trainer needs exactly one of max_steps / max_tokens; got {self.max_steps!r} / "
                             f"{self.max_tokens!r}")
        _int(s, "max_steps", self.max_steps, low=1, optional=True)
        _int(s, "max_tokens", self.max_tokens, low=1, optional=True)
        for name in ("warmup_steps", "save_interval", "eval_interval"):
            _int(s, name, getattr(self, name))
        for name in ("keep_checkpoints", "eval_batches", "log_interval", "max_consecutive_skips"):
            _int(s, name, getattr(self, name), low=1)
        _int(s, "seed", self.seed)
        for name in ("decay_fraction", "min_lr_ratio", "bf16_tail_fraction"):
            _fraction(s, name, getattr(self, name))
        if self.decay_shape not in SCHEDULE_SHAPES:
            raise ValueError(f"trainer.decay_shape must be one of {SCHEDULE_SHAPES}; got {self.decay_shape!r}")
        if self.peak_tflops is not None and not (isinstance(self.peak_tflops, (int, float)) and self.peak_tflops > 0):
            raise ValueError(f"trainer.peak_tflops must be a positive number or null; got {self.peak_tflops!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"trainer.out_dir must be a non-empty path; got {self.out_dir!r}")


@dataclass
class RunConfig:
    """Everything a run needs, each component's part validated."""

    deepspeed: dict[str, Any]
    nvfp4: dict[str, Any]
    nvfp4_config: NVFP4Config
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

    def ds_config(self) -> dict[str, Any]:
        """The config handed to ds_fp4.initialize: DeepSpeed's keys plus the nvfp4 section."""
        return {**self.deepspeed, "nvfp4": self.nvfp4}

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
    ds, own = split_config(raw)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(ds.get(key), int) or ds[key] < 1:
            raise ValueError(f"the run config needs an integer {key} >= 1 (the data order depends on it); "
                             f"got {ds.get(key)!r}")
    if "gradient_accumulation_steps" in ds:
        raise ValueError(
            "remove gradient_accumulation_steps from the config: it is derived as train_batch_size / "
            "(train_micro_batch_size_per_gpu x world size), so a resume on another world size keeps the global batch"
        )
    nvfp4 = dict(own.get("nvfp4") or {})
    model = dict(own.get("model") or {})
    data = dict(own.get("data") or {})
    trainer = dict(own.get("trainer") or {})
    _check_keys("model", model, ModelConfig)
    _check_keys("trainer", trainer, TrainerConfig)
    embedded = None
    if "embedded" in data:
        section = data.pop("embedded")
        section = {} if section is True else section
        if not isinstance(section, Mapping):
            raise ValueError(f"data.embedded must be an object or true; got {section!r}")
        _check_keys("data.embedded", section, EmbeddedCorpusConfig)
        embedded = EmbeddedCorpusConfig(**section)
        data.setdefault("sources", [{"path": embedded.out_dir, "weight": 1.0}])
    _check_keys("data", data, DataConfig)
    if not model:
        raise ValueError("the run config needs a \"model\" section with a Hugging Face \"config\"")
    return RunConfig(
        deepspeed=ds,
        nvfp4=nvfp4,
        nvfp4_config=NVFP4Config.from_dict(nvfp4),
        model=ModelConfig(**model),
        data=DataConfig(**data),
        embedded=embedded,
        trainer=TrainerConfig(**trainer),
        source=source,
        raw=raw,
    )
