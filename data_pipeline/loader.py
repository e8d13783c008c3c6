"""BatchLoader: this rank's micro-batches of the global order, prefetched on one background thread.

The contract (docs/design.md §6):
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
"""

from __future__ import annotations

import queue
import threading
from collections import deque

import numpy as np
import torch

from .dataset import TokenDataset

__all__ = ["BatchLoader"]

_PLAN_SAMPLES = 4096  # positions planned (located) per block; amortises the vectorised order maths


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"BatchLoader {name} = {value!r}; it must be an int >= {low}")
    return value


class BatchLoader:
    """Micro-batches of rank `rank` of `world_size`; iterate it (endless unless num_micro_batches)."""

    def __init__(
        self,
        dataset: TokenDataset,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        num_micro_batches: int | None = None,
    ) -> None:
        if not isinstance(dataset, TokenDataset):
            raise ValueError(f"BatchLoader needs a TokenDataset, got {type(dataset).__name__}")
        G = _check_int("global_batch_size", global_batch_size, 1)
        B = _check_int("micro_batch_size", micro_batch_size, 1)
        W = _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        _check_int("prefetch", prefetch, 0)
        if rank >= W:
            raise ValueError(f"BatchLoader rank = {rank} must be < world_size = {W}")
        if G % (B * W):
            raise ValueError(
                f"global_batch_size {G} must be divisible by micro_batch_size x world_size = {B} x {W} = {B * W}; "
                f"choose G as a multiple of {B * W} (gradient accumulation steps = G / (B x W))"
            )
        if num_micro_batches is not None:
            _check_int("num_micro_batches", num_micro_batches, 0)
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = G, B
        self.rank, self.world_size, self.prefetch = rank, W, prefetch
        self.accumulation_steps = G // (B * W)
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
        g, k = divmod(self._t, self.accumulation_steps)
        return g * self.global_batch_size + k * self.micro_batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """Epochs of the whole dataset consumed (for logs; with a blend each source has its own)."""
        return self.samples_consumed // self.dataset.num_samples

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["samples_consumed"]`; the next micro-batches equal an uninterrupted run's."""
        if not isinstance(state, dict) or set(state) != {"samples_consumed"}:
            raise ValueError(f"BatchLoader state must be {{'samples_consumed': int}}, got {state!r}")
        c = state["samples_consumed"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"samples_consumed = {c!r}; it must be an int >= 0")
        G, BW = self.global_batch_size, self.micro_batch_size * self.world_size
        if (c % G) % BW:
            raise ValueError(
                f"samples_consumed = {c} is not at a micro-step boundary of global_batch_size {G} with "
                f"micro_batch_size x world_size = {BW}; resume from a checkpoint taken after a full step"
            )
        self._stop_thread()
        self._t = (c // G) * self.accumulation_steps + (c % G) // BW

    # --- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.num_micro_batches is not None and self._t >= self.num_micro_batches:
            self._stop_thread()
            raise StopIteration
        if self.prefetch == 0:
            if self._sync is None:
                self._sync = _produce(self._plan_args(), self.dataset, None)
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

    def _plan_args(self) -> tuple:
        return (
            self._t,
            self.num_micro_batches,
            self.global_batch_size,
            self.micro_batch_size,
            self.rank,
            self.world_size,
        )

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run,
            args=(self._plan_args(), self.dataset, self._queue, self._stop, self.prefetch),
            name=f"ds_fp4-loader-r{self.rank}",
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
    """Generator of micro-batch tensors from micro-step plan[0] on (no reference to the loader)."""
    t, limit, G, B, rank, W = plan
    A = G // (B * W)
    width = dataset.seq_len + 1
    offsets = np.arange(B, dtype=np.int64)
    block = max(1, _PLAN_SAMPLES // B)
    while limit is None or t < limit:
        n = block if limit is None else min(block, limit - t)
        steps = np.arange(t, t + n, dtype=np.int64)
        g, k = np.divmod(steps, A)
        starts = g * G + rank * (G // W) + k * B
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
