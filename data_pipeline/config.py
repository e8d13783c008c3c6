"""DataConfig: the data section of a run, validated once, at construction.

Why a small dataclass: `launch/` parses the run's JSON once and hands this over (docs/design.md §7);
everything the order depends on (sources and their weights, seq_len, seed) is here, and nothing is
read from the environment. Batch geometry (global/micro batch, rank, world size) is not: it belongs to
the loader, because the same dataset serves train and eval loaders of different shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["DataConfig", "SourceSpec", "DEFAULT_CACHE_DIR"]

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ds_fp4", "shards")
_SOURCE_KEYS = ("path", "weight")


@dataclass(frozen=True)
class SourceSpec:
    """One prepared dataset (a directory/URI holding manifest.json, or the manifest itself)."""

    path: str
    weight: float = 1.0


def _source(item: object, i: int, name: str) -> SourceSpec:
    if isinstance(item, SourceSpec):
        spec = item
    elif isinstance(item, (str, os.PathLike)):
        spec = SourceSpec(os.fspath(item))
    elif isinstance(item, dict):
        unknown = sorted(set(item) - set(_SOURCE_KEYS))
        if unknown or "path" not in item:
            problem = f"unknown keys {unknown}" if unknown else "no 'path'"
            raise ValueError(
                f"DataConfig.{name}[{i}] = {item!r} has {problem}; "
                f"each source is {{'path': str, 'weight': float}} (valid keys: {list(_SOURCE_KEYS)})"
            )
        spec = SourceSpec(os.fspath(item["path"]), item.get("weight", 1.0))
    else:
        raise ValueError(f"DataConfig.{name}[{i}] = {item!r}: expected a path or {{'path': ..., 'weight': ...}}")
    if not spec.path:
        raise ValueError(f"DataConfig.{name}[{i}].path is empty; name a prepared dataset directory or URI")
    w = spec.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise ValueError(f"DataConfig.{name}[{i}].weight = {w!r}; it must be a finite number > 0")
    return SourceSpec(spec.path, float(w))


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into samples."""

    #: prepared datasets: paths/URIs, or {"path": ..., "weight": ...} dicts (weights are relative)
    sources: tuple = ()
    #: tokens per training sequence; each sample holds seq_len + 1 tokens (inputs and shifted labels)
    seq_len: int = 2048
    #: keys the global order together with each manifest's content hash, seq_len and the epoch
    seed: int = 1234
    #: held-out sources for evaluation; None = the `eval/` split that prepare wrote next to each source
    eval_sources: tuple | None = None
    #: local directory that remote (s3://, ...) shards are fetched into before being memory-mapped
    cache_dir: str = DEFAULT_CACHE_DIR
    #: how many shard memory maps stay open at once (least recently used are closed)
    max_open_shards: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, os.PathLike, dict, SourceSpec)):
            object.__setattr__(self, "sources", (self.sources,))
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise ValueError(
                f"DataConfig.sources = {self.sources!r}; give at least one prepared dataset, "
                "e.g. [{'path': 'runs/data/stdlib', 'weight': 1.0}]"
            )
        object.__setattr__(self, "sources", tuple(_source(s, i, "sources") for i, s in enumerate(self.sources)))
        if self.eval_sources is not None:
            ev = self.eval_sources
            if isinstance(ev, (str, os.PathLike, dict, SourceSpec)):
                ev = (ev,)
            if not isinstance(ev, (list, tuple)) or not ev:
                raise ValueError(f"DataConfig.eval_sources = {self.eval_sources!r}; give a non-empty list or None")
            object.__setattr__(self, "eval_sources", tuple(_source(s, i, "eval_sources") for i, s in enumerate(ev)))
        for name, low in (("seq_len", 1), ("max_open_shards", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or value >= 1 << 62:
                raise ValueError(f"DataConfig.{name} = {value!r}; it must be an int in [{low}, 2^62)")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
            raise ValueError(f"DataConfig.cache_dir = {self.cache_dir!r}; it must be a directory path")
