"""Held-out evaluation batches: the same fixed batches at every evaluation.

Why a separate, finite loader: training loss says little about generalisation, and an eval whose
batches change from one evaluation to the next adds noise to the curve. So an EvalLoader always walks
global batches 0 .. num_batches-1 of the held-out split's global order (the same Feistel order as
training, so the batches are a uniform sample of the split, not its first documents), this rank's
slice of each, and every `iter()` starts again from the beginning. The held-out split is the `eval/`
dataset that prepare writes with `eval_fraction` > 0 (documents chosen by a hash of their content,
so they never appear in training), or `DataConfig.eval_sources`.

The batch geometry comes in as one BatchGeometry, cut exactly as in training (geometry.py); each
evaluation is a finite BatchLoader over it. Traded off: num_batches is capped at one pass over the
split, so no eval sample counts twice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import DataConfig
from .dataset import TokenDataset
from .geometry import BatchGeometry, Count, Positive, validated
from .loader import BatchLoader

__all__ = ["EvalLoader", "build_eval_loader"]


class EvalLoader:
    """Finite, repeatable micro-batches of a held-out TokenDataset for the rank of `geometry`."""

    @validated
    def __init__(
        self, dataset: TokenDataset, geometry: BatchGeometry, num_batches: Positive | None = None, prefetch: Count = 2
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
    """An EvalLoader over `config`'s held-out split (eval_sources, or each source's eval/)."""
    geometry = BatchGeometry(global_batch_size, micro_batch_size, rank, world_size)  # checked before any I/O
    dataset = TokenDataset(config, split="eval")
    try:
        return EvalLoader(dataset, geometry, num_batches, prefetch)
    except BaseException:
        dataset.close()
        raise
