"""BatchGeometry: how each global batch is cut across ranks and micro-batches, and the argument checks.

Why a module of its own: the train loader (loader.py) and the eval loader (evaluation.py) cut batches
the same way, so the geometry, its checks and its arithmetic (docs/design.md §6) are written once, here,
and both hold a BatchGeometry rather than four loose numbers.

Arguments are checked by pydantic in strict mode: an int must be an int (no bool, float, str or numpy
int), as the hand-written checks it replaces required. Traded off: pydantic's messages are its own
("Input should be greater than or equal to 1"), though they name the argument, the value and the rule.
Checks that relate two numbers are written out, as plain ValueErrors naming every number and the fix.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, validate_call

__all__ = ["BatchGeometry", "Count", "Positive", "validated"]

Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]


def validated(fn):
    """pydantic's validate_call in strict mode (an int is an int: no bool, float, str or numpy int), with
    every argument handed over by name: pydantic names a bad positional argument only by its index, and
    the error must say which argument, which value and which rule."""
    checked = validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))(fn)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return checked(**signature.bind(*args, **kwargs).arguments)

    return call


class BatchGeometry(BaseModel):
    """How each global batch is cut across ranks and micro-batches (docs/design.md §6), stated once.

    Global batch g is stream positions [g*G, (g+1)*G); rank r of W takes [g*G + r*G/W, g*G + (r+1)*G/W),
    as A = G/(B*W) micro-batches of B samples. Built like BatchLoader's arguments: BatchGeometry(G, B, r, W).
    """

    model_config = ConfigDict(strict=True, frozen=True)

    global_batch_size: Positive
    """G: samples per optimizer step over all ranks; the global order depends on it alone."""
    micro_batch_size: Positive
    """B: samples per micro-batch on one rank."""
    rank: Count = 0
    """r: this process's rank, in [0, W)."""
    world_size: Positive = 1
    """W: the number of ranks."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        # pydantic checks each field and names it; BaseModel itself would take keywords only.
        super().__init__(
            global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size
        )
        # The checks that relate two fields, as plain ValueErrors with every number and the fix.
        G, B, W = global_batch_size, micro_batch_size, world_size
        if rank >= W:
            raise ValueError(f"rank = {rank} must be < world_size = {W}; ranks count from 0 to world_size - 1")
        if G % (B * W):
            raise ValueError(
                f"global_batch_size {G} must be divisible by micro_batch_size x world_size = {B} x {W} = {B * W}; "
                f"choose G as a multiple of {B * W} (gradient accumulation steps = G / (B x W))"
            )

    @property
    def accumulation_steps(self) -> int:
        """A: micro-batches per rank and global batch."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def samples_consumed(self, micro_step: int) -> int:
        """Samples all ranks together have consumed once each has yielded `micro_step` micro-batches."""
        g, k = divmod(micro_step, self.accumulation_steps)
        return g * self.global_batch_size + k * self.micro_batch_size * self.world_size

    def micro_step(self, samples_consumed: int) -> int:
        """The inverse of samples_consumed(); the count must fall on a micro-step boundary of this geometry."""
        G, BW = self.global_batch_size, self.micro_batch_size * self.world_size
        if (samples_consumed % G) % BW:
            raise ValueError(
                f"samples_consumed = {samples_consumed} is not at a micro-step boundary of global_batch_size {G} "
                f"with micro_batch_size x world_size = {BW}; resume from a checkpoint taken after a full step"
            )
        return (samples_consumed // G) * self.accumulation_steps + (samples_consumed % G) // BW

    def starts(self, micro_steps: np.ndarray) -> np.ndarray:
        """The stream position of the first sample of this rank's micro-batch at each micro-step."""
        G, B = self.global_batch_size, self.micro_batch_size
        g, k = np.divmod(micro_steps, self.accumulation_steps)
        return g * G + self.rank * (G // self.world_size) + k * B
