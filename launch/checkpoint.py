"""Checkpoints that survive a crash at any moment, and resume on a different world size.

Layout under ``<out_dir>/checkpoints``:
    step_00000100/            DeepSpeed's files (save_checkpoint with save_latest=False) + meta.json
    step_00000100/COMPLETE    written last, by rank 0, after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint, replaced atomically
    step_00000100_universal/  DeepSpeed universal checkpoint, made on demand for a new world size

Why our own ``latest``: DeepSpeed writes its pointer with a plain write, so a kill at the wrong moment
can leave it naming a half-written checkpoint (or leave it truncated). Here a checkpoint counts only
once its COMPLETE marker exists, the pointer moves with an atomic rename, and resume ignores (and the
next save removes) anything incomplete. The last ``keep`` complete checkpoints are kept.

Resume on a new world size (docs/design.md §5): ZeRO partitions optimizer state (stage 3: weights too) by
data-parallel rank, so a checkpoint written by W ranks cannot be loaded by W' != W directly. Rank 0
converts it once with DeepSpeed's ``ds_to_universal`` (``--inject_missing_state``), and the engine
loads it with ``"checkpoint": {"load_universal": true}``, which the trainer sets before building the
engine because DeepSpeed reads it at construction. Without ZeRO nothing is partitioned and no
conversion is needed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import torch.distributed as dist

COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"


@contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[TextIO | BinaryIO]:
    """A file (text, or bytes when ``binary``) that replaces ``path`` by an atomic rename once the block ends
    without an error (a reader sees the old file or the new one, never a part). Its mode is what a plain
    ``open`` gives (0666 less the umask): tempfile.mkstemp would make it 0600, and the rename would keep that."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    tag: str
    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def dp_world_size(self) -> int:
        return int(self.meta["dp_world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta["zero_stage"])


class CheckpointManager:
    """Save, find and prune checkpoints under ``root``; every rank calls save(), rank 0 finalizes."""

    def __init__(self, root: str | os.PathLike, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    # Finding ---------------------------------------------------------------------------------------
    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        found = []
        if not self.root.is_dir():
            return found
        for d in sorted(self.root.glob("step_*")):
            if d.name.endswith(UNIVERSAL_SUFFIX) or not (d / COMPLETE).is_file():
                continue
            try:
                meta = json.loads((d / META).read_text())
            except (OSError, ValueError):
                continue
            found.append(CheckpointInfo(d.name, d, meta))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint named by ``latest`` if it is complete, else the newest complete one."""
        pointer = self.root / LATEST
        done = self.complete()
        if pointer.is_file():
            tag = pointer.read_text().strip()
            for c in done:
                if c.tag == tag:
                    return c
        return done[-1] if done else None

    # Saving ----------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank writes its part; then rank 0 marks it complete and moves ``latest``."""
        tag = tag_for(step)
        path = self.root / tag
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a partial leftover of a crashed attempt at this very step
                shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            atomic_write(path / META, json.dumps({**meta, "step": step, "time": time.time()}, indent=1))
            atomic_write(path / COMPLETE, "")
            atomic_write(self.root / LATEST, tag)
            self.prune()
        dist.barrier()
        return path

    def prune(self) -> None:
        """Delete incomplete checkpoints and all but the newest ``keep`` complete ones (rank 0)."""
        done = self.complete()
        keep = {c.tag for c in done[-self.keep :]}
        for d in self.root.glob("step_*"):
            base = d.name.removesuffix(UNIVERSAL_SUFFIX)
            if base not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # Resuming on another world size ----------------------------------------------------------------
    def universal(self, ckpt: CheckpointInfo) -> str:
        """Collective: the tag of a universal copy of ``ckpt``, converted by rank 0 if missing."""
        tag = ckpt.tag + UNIVERSAL_SUFFIX
        out = self.root / tag
        if dist.get_rank() == 0 and not (out / COMPLETE).is_file():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            ds_to_universal(Namespace(
                input_folder=str(ckpt.path), output_folder=str(out), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
            ))
            shutil.copy(ckpt.path / META, out / META)
            atomic_write(out / COMPLETE, "")
        dist.barrier()
        return tag
