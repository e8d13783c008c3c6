"""BatchLoader: this rank's micro-batches of the global order, prefetched on one background thread.

The contract (docs/design.md §6), whose arithmetic BatchGeometry holds, for the train and eval loaders:
- Global batch g is stream positions [g*G, (g+1)*G). Rank r of W takes the contiguous slice
  [g*G + r*G/W, g*G + (r+1)*G/W), split into A = G/(W*B) micro-batches of B samples. So the order is
  a function of G alone: with the same G, any (W, B) sees the same global batches, and a run resized
  from 2 to 3 ranks continues the same stream.
- The only state is `samples_consumed`: after a rank has yielded micro-step t = g*A + k, all ranks
  together have consumed g*G + k*B*W samples. Epochs are not state: position c of the stream is in
  epoch c // N and continues seamlessly into the next.
- A micro-batch is one contiguous int64 [B, seq_len + 1] tensor, filled straight from the memory-
  mapped shards by numpy slice copies (no per-token Python object).

Why a thread and not DataLoader workers: the work per batch is a few memcpys that release the GIL, so
one daemon thread keeps up with any GPU while adding no processes, no pickling, no shared memory that
can outlive a crash (Streaming's failure mode) and no per-worker state that resume would need. The
thread holds no reference to the loader, so a dropped loader is collected and its thread stopped;
`close()` stops it explicitly (also on load_state_dict, which restarts from the new counter).
The thread hands batches over in groups of `prefetch` micro-batches (one group waits in the queue
while the next is built), because each hand-off costs a GIL transfer and two context switches, which
is as much as building a micro-batch when both threads share one core. Traded off: up to
2 x prefetch micro-batches are held in memory (a few MB), and the first batch waits for a group.

Arguments, and the resume state on load, are checked by pydantic once, as geometry.py explains.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from .dataset import TokenDataset
from .geometry import BatchGeometry, Count, validated

__all__ = ["BatchLoader"]

_PLAN_SAMPLES = 4096  # positions planned (located) per block; amortises the vectorised order maths


class BatchLoaderState(BaseModel):
    """A BatchLoader's whole resume state."""

    model_config = ConfigDict(strict=True, extra="forbid")

    samples_consumed: Count


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchLoader:
    """Micro-batches of rank `rank` of `world_size`; iterate it (endless unless num_micro_batches)."""

    @validated
    def __init__(
        self,
        dataset: TokenDataset,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: Count = 2,
        num_micro_batches: Count | None = None,
    ) -> None:
        self.dataset = dataset
        self.geometry = BatchGeometry(global_batch_size, micro_batch_size, rank, world_size)
        self.prefetch = prefetch
        self.num_micro_batches = num_micro_batches
        self._t = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync: object | None = None
        self._ready: deque = deque()

    # --- state ---------------------------------------------------------------------------------

    @property
    def samples_consumed(self) -> int:
        return self.geometry.samples_consumed(self._t)

    @property
    def epoch(self) -> int:
        """Epochs of the whole dataset consumed (for logs; with a blend each source has its own)."""
        return self.samples_consumed // self.dataset.num_samples

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["samples_consumed"]`; the next micro-batches equal an uninterrupted run's."""
        t = self.geometry.micro_step(BatchLoaderState.model_validate(state).samples_consumed)
        self._stop_thread()
        self._t = t

    # --- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.num_micro_batches is not None and self._t >= self.num_micro_batches:
            self._stop_thread()
            raise StopIteration
        if self.prefetch == 0:
            if self._sync is None:
                self._sync = _produce(self._plan(), self.dataset, None)
            batch = next(self._sync)
        else:
            if self._thread is None:
                self._start_thread()
            if not self._ready:
                item = self._queue.get()
                if isinstance(item, _Failure):
                    self._stop_thread()
                    raise item.exc
                self._ready.extend(item)
            batch = self._ready.popleft()
        self._t += 1
        return batch

    def __len__(self) -> int:
        if self.num_micro_batches is None:
            raise TypeError("an endless BatchLoader has no len(); pass num_micro_batches for a finite one")
        return self.num_micro_batches

    def _plan(self) -> tuple:
        return self.geometry, self._t, self.num_micro_batches

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run,
            args=(self._plan(), self.dataset, self._queue, self._stop, self.prefetch),
            name=f"ds_fp4-loader-r{self.geometry.rank}",
            daemon=True,
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        self._sync = None
        thread, q, stop = self._thread, self._queue, self._stop
        self._thread = self._queue = self._stop = None
        self._ready.clear()
        if thread is None:
            return
        stop.set()
        while thread.is_alive():
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)

    def close(self) -> None:
        """Stop the prefetch thread (the dataset stays open; it may serve other loaders)."""
        self._stop_thread()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_thread()
        except Exception:
            pass


def _produce(plan: tuple, dataset: TokenDataset, stop: threading.Event | None):
    """Micro-batch tensors of plan = (geometry, first micro-step, limit); no reference to the loader."""
    geometry, t, limit = plan
    B = geometry.micro_batch_size
    width = dataset.seq_len + 1
    offsets = np.arange(B, dtype=np.int64)
    block = max(1, _PLAN_SAMPLES // B)
    while limit is None or t < limit:
        n = block if limit is None else min(block, limit - t)
        starts = geometry.starts(np.arange(t, t + n, dtype=np.int64))
        src, sample = dataset.locate((starts[:, None] + offsets).reshape(-1))
        dataset.prefetch(src, sample)
        shard, local = dataset.place(src, sample)
        src_l, shard_l, local_l = src.tolist(), shard.tolist(), local.tolist()
        for i in range(n):
            if stop is not None and stop.is_set():
                return
            out = np.empty((B, width), dtype=np.int64)
            rows = slice(i * B, (i + 1) * B)
            dataset.fill_placed(src_l[rows], shard_l[rows], local_l[rows], out)
            yield torch.from_numpy(out)
        t += n


def _run(plan: tuple, dataset: TokenDataset, q: queue.Queue, stop: threading.Event, group: int) -> None:
    """Thread body: hand over groups of `group` micro-batches until stopped; errors go to the consumer.

    Handing over groups rather than single batches matters when the consumer and this thread share a
    core: every hand-off is a GIL transfer plus two context switches (~10 us each), as long as copying
    a whole micro-batch; grouping pays it once per `group` batches.
    """

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    pending: list = []
    try:
        for batch in _produce(plan, dataset, stop):
            pending.append(batch)
            if len(pending) >= group:
                if not put(pending):
                    return
                pending = []
        if pending:
            put(pending)
    except BaseException as exc:  # handed over, re-raised in the consumer's thread
        if pending:
            put(pending)
        put(_Failure(exc))
