"""DataConfig: the data section of a run, validated once, at construction.

Why a small dataclass: `launch/` parses the run's JSON once and hands this over (docs/design.md §7);
everything the order depends on (sources and their weights, seq_len, seed) is here, and nothing is
read from the environment. Batch geometry (global/micro batch, rank, world size) is not: it belongs to
the loader, because the same dataset serves train and eval loaders of different shapes.

How it validates (the pattern for every config class of this package): a frozen
``pydantic.dataclasses.dataclass`` with ``extra="forbid"``, whose field types carry the rules:
``Annotated[int, Field(strict=True, ge=1)]`` for a count (strict: ``true`` is not 1, ``2.0`` and ``"2"``
are not 2), ``Literal[...]`` for a choice. A bad value raises pydantic's ``ValidationError`` (a
ValueError) naming the class, the field (``sources.0.weight``) and the value; code is written only for
what types cannot say, as the ``BeforeValidator`` that accepts a bare path as a source. data_pipeline
does not import ds_fp4, so it shares no helper with it: pydantic is the shared checker. Traded off: its
messages are pydantic's wording; launch rephrases them as ``data.sources[0].weight must be ...`` when
they come from the run's JSON.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

__all__ = ["DataConfig", "SourceSpec", "DEFAULT_CACHE_DIR"]

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ds_fp4", "shards")


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathStr = Annotated[str, Field(strict=True, min_length=1), BeforeValidator(_fspath)]  # a pathlib.Path becomes a str
Int62 = Annotated[int, Field(strict=True, lt=1 << 62)]  # every count and seed fits the order's int64 maths


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SourceSpec:
    """One prepared dataset (a directory/URI holding manifest.json, or the manifest itself)."""

    path: PathStr
    """The prepared dataset."""
    weight: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1.0
    """Its share of the blend, relative to the other sources' weights."""


def _as_sources(value: Any) -> Any:
    """A bare path or a single source becomes a one-source list; a path item becomes {"path": ...}."""
    if isinstance(value, (str, os.PathLike, dict, SourceSpec)):
        value = [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("give at least one prepared dataset, e.g. [{'path': 'runs/data/stdlib', 'weight': 1.0}]")
        return [{"path": item} if isinstance(item, (str, os.PathLike)) else item for item in value]
    return value  # pydantic names what it got


Sources = Annotated[tuple[SourceSpec, ...], BeforeValidator(_as_sources)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DataConfig:
    """What to read and how to cut it into samples."""

    sources: Sources
    """Prepared datasets: paths/URIs, or {"path": ..., "weight": ...} dicts (weights are relative)."""
    seq_len: Annotated[Int62, Field(ge=1)] = 2048
    """Tokens per training sequence; each sample holds seq_len + 1 tokens (inputs and shifted labels)."""
    seed: Annotated[Int62, Field(ge=0)] = 1234
    """Keys the global order together with each manifest's content hash, seq_len and the epoch."""
    eval_sources: Sources | None = None
    """Held-out sources for evaluation; None = the `eval/` split that prepare wrote next to each source."""
    cache_dir: PathStr = DEFAULT_CACHE_DIR
    """Local directory that remote (s3://, ...) shards are fetched into before being memory-mapped."""
    max_open_shards: Annotated[Int62, Field(ge=1)] = 64
    """How many shard memory maps stay open at once (least recently used are closed)."""
