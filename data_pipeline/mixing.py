"""Weighted blend of several sources, addressed by one global counter.

Why: resume state must stay one integer (samples consumed globally) even when data comes from several
sources with weights. So the blend is a pure function of the global stream position c:
the stream is cut into periods of P slots; each period holds k_s slots of source s (k_s ~ P * w_s,
largest-remainder rounding, every source at least one slot), laid out in one fixed order shuffled by a
keyed Feistel permutation. Slot c belongs to source `slot_source[c % P]` and is that source's
`(c // P) * k_s + slot_rank[c % P]`-th sample. Each source then walks its own epochs of its own
permutation (dataset.py), so an up-weighted source simply cycles its epochs faster.

Consequences: the blend of any stretch of the stream is exact to within one period; the position of
every source after c samples is `(c // P) * k_s + #{slots of s before c % P}`, O(#sources log P),
with no history; and since the mapping never looks at ranks or batch sizes, changing the world size
keeps the blend. Traded off: the interleave pattern repeats every P samples (P >= 4096, each source's
samples within it still differ); weights are realised to a precision of 1/P.
"""

from __future__ import annotations

import math

import numpy as np

from .permutation import FeistelPermutation

__all__ = ["Blend"]

_MIN_PERIOD = 4096
_MAX_PERIOD = 1 << 24


class Blend:
    """Global position -> (source index, position in that source's stream)."""

    def __init__(self, weights: list[float], key: bytes) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be finite and > 0, got {list(weights)}")
        p = w / w.sum()
        if w.size == 1:
            period = 1
        else:
            period = max(_MIN_PERIOD, 1 << math.ceil(math.log2(4.0 / p.min())))
        if period > _MAX_PERIOD:
            raise ValueError(
                f"blend weight share {p.min():.3g} is too small to realise (needs a period above "
                f"{_MAX_PERIOD}); raise that source's weight or drop it. Weights: {list(weights)}"
            )
        ideal = p * period
        counts = np.floor(ideal).astype(np.int64)
        short = period - int(counts.sum())
        if short:
            counts[np.argsort(-(ideal - counts), kind="stable")[:short]] += 1
        base = np.repeat(np.arange(w.size, dtype=np.int64), counts)
        slot_source = base[FeistelPermutation(period, key)(np.arange(period))] if period > 1 else base
        order = np.argsort(slot_source, kind="stable")
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot_rank = np.empty(period, dtype=np.int64)
        slot_rank[order] = np.arange(period) - first[slot_source[order]]
        self.period = period
        self.counts = counts
        self.shares = counts / period
        self._slot_source = slot_source
        self._slot_rank = slot_rank
        self._slots_of = [order[first[s] : first[s] + counts[s]] for s in range(w.size)]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position within that source's stream) for each global position (int64 arrays)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.period == 1:
            return np.zeros_like(positions), positions
        cycle, slot = np.divmod(positions, self.period)
        source = self._slot_source[slot]
        return source, cycle * self.counts[source] + self._slot_rank[slot]

    def consumed(self, samples: int) -> list[int]:
        """Samples taken from each source in the first `samples` positions of the stream."""
        cycle, slot = divmod(int(samples), self.period)
        pairs = zip(self.counts.tolist(), self._slots_of, strict=True)
        return [int(cycle * k + np.searchsorted(slots, slot)) for k, slots in pairs]
