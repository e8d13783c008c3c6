"""Held-out evaluation batches: the same fixed batches at every evaluation.

Why a separate, finite loader: training loss says little about generalisation, and an eval whose
batches change from one evaluation to the next adds noise to the curve. So an EvalLoader always walks
global batches 0 .. num_batches-1 of the held-out split's global order (the same Feistel order as
training, so the batches are a uniform sample of the split, not its first documents), this rank's
slice of each, and every `iter()` starts again from the beginning. The held-out split is the `eval/`
dataset that prepare writes with `eval_fraction` > 0 (documents chosen by a hash of their content,
so they never appear in training), or `DataConfig.eval_sources`.

Which sources (held_out_sources): given `eval_sources`, exactly those, and each must be a prepared
dataset that is not also a training source (its loss would not be held out). Not given, the `eval/`
split of every source that has one: a source prepared without one (someone else's data mixed in) is
left out rather than stopping the run, and the loader names it (`EvalLoader.left_out`) for the caller
to report; only when no source has a split is there nothing to evaluate (NoHeldOutSplit).

The batch geometry comes in as one BatchGeometry, cut exactly as in training (geometry.py); each
evaluation is a finite BatchLoader over it. Traded off: num_batches is capped at one pass over the
split, so no eval sample counts twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from .config import DataConfig, SourceSpec
from .dataset import TokenDataset, _dataset_root
from .geometry import BatchGeometry, Count, Positive, validated
from .loader import BatchLoader
from .manifest import EVAL_DIR, MANIFEST_NAME

__all__ = ["EvalLoader", "NoHeldOutSplit", "build_eval_loader", "held_out_sources"]


class NoHeldOutSplit(FileNotFoundError):
    """eval_sources is not set and no source has a held-out split: a default evaluation has nothing to read."""


def held_out_sources(config: DataConfig) -> tuple[tuple[SourceSpec, ...], tuple[str, ...]]:
    """(the held-out sources to evaluate on, the training sources left out for having no `eval/` split).
    Raises NoHeldOutSplit when eval_sources is not set and no source has a split, and FileNotFoundError
    or ValueError for a given eval source that is not a prepared dataset or is a training source."""
    if config.eval_sources is not None:
        training = {_dataset_root(s.path).uri for s in config.sources}
        for i, spec in enumerate(config.eval_sources):
            loc = _dataset_root(spec.path)
            split = loc.child(EVAL_DIR)
            has_split = split.exists(MANIFEST_NAME)
            fix = (f"give its held-out split {split.uri}" if has_split else
                   f"prepare it with --eval-fraction > 0 (it has no {EVAL_DIR}/ split)")
            if loc.uri in training:
                raise ValueError(f"eval_sources[{i}] = {spec.path!r} is also a training source, so its loss "
                                 f"would not be held out: {fix}, give another prepared dataset, or leave "
                                 "eval_sources unset to use every source's held-out split")
            if not loc.exists(MANIFEST_NAME):
                raise FileNotFoundError(f"eval_sources[{i}] = {spec.path!r}: no prepared dataset there (no "
                                        f"{MANIFEST_NAME}); give a directory that `ds-fp4-data prepare` wrote, "
                                        f"such as a source's held-out split SOURCE/{EVAL_DIR}")
        return config.eval_sources, ()
    found, left_out = [], []
    for spec in config.sources:
        loc = _dataset_root(spec.path)
        if loc.child(EVAL_DIR).exists(MANIFEST_NAME):
            found.append(SourceSpec(loc.child(EVAL_DIR).uri, spec.weight))
        else:
            left_out.append(loc.uri)
    if not found:
        raise NoHeldOutSplit(f"no source has a held-out split ({EVAL_DIR}/{MANIFEST_NAME} in "
                             f"{', '.join(left_out)}); prepare with --eval-fraction > 0 or set eval_sources")
    return tuple(found), tuple(left_out)


class EvalLoader:
    """Finite, repeatable micro-batches of a held-out TokenDataset for the rank of `geometry`."""

    @validated
    def __init__(
        self,
        dataset: TokenDataset,
        geometry: BatchGeometry,
        num_batches: Positive | None = None,
        prefetch: Count = 2,
        left_out: tuple[str, ...] = (),
    ) -> None:
        most = dataset.num_samples // geometry.global_batch_size
        if num_batches is None:
            num_batches = most
        if not 1 <= num_batches <= most:
            raise ValueError(
                f"num_batches = {num_batches}: the held-out split {dataset.sources} has "
                f"{dataset.num_samples} samples, room for 1..{most} global batches of {geometry.global_batch_size}"
                + ("; prepare with a larger eval_fraction or lower the global batch" if most == 0 else "")
            )
        self.dataset = dataset
        self.geometry = geometry
        self.num_batches = num_batches
        self.prefetch = prefetch
        self.left_out = left_out
        """Training sources without a held-out split, left out of a default evaluation (held_out_sources)."""

    def __len__(self) -> int:
        """Micro-batches per evaluation on this rank."""
        return self.num_batches * self.geometry.accumulation_steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = BatchLoader(
            self.dataset, **self.geometry.model_dump(), prefetch=self.prefetch, num_micro_batches=len(self)
        )
        try:
            yield from loader
        finally:
            loader.close()


def build_eval_loader(
    config: DataConfig,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_batches: int | None = None,
    prefetch: int = 2,
) -> EvalLoader:
    """An EvalLoader over `config`'s held-out sources (held_out_sources: eval_sources, or the eval/ split of
    each source that has one)."""
    geometry = BatchGeometry(global_batch_size, micro_batch_size, rank, world_size)  # checked before any I/O
    sources, left_out = held_out_sources(config)
    dataset = TokenDataset(replace(config, eval_sources=sources), split="eval")
    try:
        return EvalLoader(dataset, geometry, num_batches, prefetch, left_out)
    except BaseException:
        dataset.close()
        raise
