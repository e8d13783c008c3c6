"""TokenDataset: opened manifests -> the global sample order -> int64 windows.

Samples are windows of seq_len + 1 tokens over each source's concatenated token stream (documents
joined by their EOS separators, shards in manifest order) with stride seq_len, as in Megatron's
GPTDataset: sample i is tokens[i*S : i*S + S + 1], so consecutive samples share one token (the label
of the last position) and every token is trained on once per epoch. Windows cross document and shard
boundaries; the EOS token tells the model where a document ends. A source has (T - 1) // S samples.

Global position c -> sample: the blend (mixing.py) maps c to (source s, position q in s's stream);
q = epoch * N_s + j, and the sample is perm_{s,epoch}(j), where perm is a Feistel bijection keyed by
(s's manifest content hash, seed, seq_len, epoch). Nothing here is O(#samples) or O(#documents):
opening reads the manifests and builds a prefix sum over shard token counts; shards are memory-mapped
lazily, at most `max_open_shards` at a time (LRU), so thousands of shards never hit mmap or file
limits.

Traded off: a window that crosses a shard boundary is stitched from two maps (rare, handled in the
same loop). The order within an epoch is uniform over windows; it does not group by shard, so remote
sources need their shards cached locally (storage.py explains why).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np

from .config import DataConfig, SourceSpec
from .manifest import EVAL_DIR, MANIFEST_NAME, load_manifest
from .mixing import Blend
from .permutation import FeistelPermutation, derive_key
from .shards import ShardReader
from .storage import IntegrityError, Location, ShardFetcher, UnsafePathError, resolve

__all__ = ["TokenDataset"]


def _dataset_root(path: str) -> Location:
    """The dataset Location for a directory/URI, or for the path of its manifest.json."""
    base, sep, query = path.partition("?")
    if base.rstrip("/").endswith("/" + MANIFEST_NAME) or base == MANIFEST_NAME:
        base = base.rstrip("/")[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return resolve(base + sep + query)


class _Source:
    """One opened manifest: shard offsets, where shards live, and its per-epoch permutations."""

    def __init__(self, spec: SourceSpec, cfg: DataConfig, index: int) -> None:
        self.loc = _dataset_root(spec.path)
        self.manifest = m = load_manifest(self.loc)
        self.starts = m.shard_starts()
        self.num_samples = (m.num_tokens - 1) // cfg.seq_len
        if self.num_samples < 1:
            raise ValueError(
                f"seq_len {cfg.seq_len} is larger than the data: source {self.loc.uri} holds "
                f"{m.num_tokens} tokens, and one sample needs seq_len + 1 = {cfg.seq_len + 1}; "
                "lower seq_len or prepare more text"
            )
        self.index = index
        self._order_key = (m.content_hash, cfg.seed, cfg.seq_len)
        self._perms: OrderedDict[int, FeistelPermutation] = OrderedDict()
        self.fetcher = None
        if not self.loc.local:
            cache = os.path.join(os.path.expanduser(os.fspath(cfg.cache_dir)), m.content_hash[:32])
            self.fetcher = ShardFetcher(self.loc, cache)
        else:
            root = os.path.realpath(self.loc.root)
            for entry in m.shards:
                real = os.path.realpath(self.loc.path(entry.path))
                if not real.startswith(root + os.sep):
                    raise UnsafePathError(
                        f"manifest {self.loc.uri}/{MANIFEST_NAME}: shard {entry.path!r} resolves to {real}, "
                        f"outside the dataset root {root}; re-run prepare"
                    )

    def samples(self, q: np.ndarray) -> np.ndarray:
        """Sample index for each position q of this source's (endless) stream."""
        epoch, j = np.divmod(q, self.num_samples)
        out = np.empty_like(q)
        for e in np.unique(epoch).tolist():
            mask = epoch == e
            out[mask] = self._perm(e)(j[mask])
        return out

    def _perm(self, epoch: int) -> FeistelPermutation:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = FeistelPermutation(self.num_samples, derive_key("order", *self._order_key, epoch))
            self._perms[epoch] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def open_shard(self, k: int) -> ShardReader:
        entry = self.manifest.shards[k]
        if self.fetcher is not None:
            local = self.fetcher.get(entry.path, entry.bytes, entry.sha256)
        else:
            local = self.loc.path(entry.path)
        return ShardReader(local, entry, self.manifest.vocab_size, self.loc.uri_of(entry.path))

    def prefetch(self, k: int) -> None:
        if self.fetcher is not None:
            e = self.manifest.shards[k]
            self.fetcher.prefetch(e.path, e.bytes, e.sha256)


class TokenDataset:
    """The samples of one or more prepared sources in their global order (see the module docstring)."""

    def __init__(self, config: DataConfig, *, split: str = "train") -> None:
        if not isinstance(config, DataConfig):
            raise ValueError(f"TokenDataset needs a DataConfig, got {type(config).__name__}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split, self.seq_len = config, split, config.seq_len
        specs = config.sources
        if split == "eval":
            specs = config.eval_sources or tuple(self._eval_spec(s) for s in config.sources)
        self._sources = []
        try:
            for i, spec in enumerate(specs):
                self._sources.append(_Source(spec, config, i))
            self._check_compatible()
        except BaseException:
            self.close()
            raise
        first = self._sources[0]
        self.vocab_size = first.manifest.vocab_size
        self.eos_id = first.manifest.eos_id
        self.tokenizer_path = first.loc.uri_of(first.manifest.tokenizer_path)
        self.num_samples = sum(s.num_samples for s in self._sources)
        self.weights = [s.weight for s in specs]
        hashes = [s.manifest.content_hash for s in self._sources]
        self.blend = Blend(self.weights, derive_key("blend", hashes, self.weights, config.seed))
        self._shards: OrderedDict[tuple[int, int], ShardReader] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, sources, *, seq_len: int, seed: int = 1234, split: str = "train", **config) -> TokenDataset:
        """TokenDataset(DataConfig(sources=..., seq_len=..., seed=..., **config))."""
        return cls(DataConfig(sources=sources, seq_len=seq_len, seed=seed, **config), split=split)

    @staticmethod
    def _eval_spec(spec: SourceSpec) -> SourceSpec:
        loc = _dataset_root(spec.path)
        if not loc.child(EVAL_DIR).exists(MANIFEST_NAME):
            raise FileNotFoundError(
                f"source {loc.uri} has no held-out split ({EVAL_DIR}/{MANIFEST_NAME}); prepare it with "
                "eval_fraction > 0 (CLI --eval-fraction 0.01) or set DataConfig.eval_sources"
            )
        return SourceSpec(loc.child(EVAL_DIR).uri, spec.weight)

    def _check_compatible(self) -> None:
        a = self._sources[0]
        for b in self._sources[1:]:
            for what in ("tokenizer_sha256", "vocab_size", "eos_id"):
                x, y = getattr(a.manifest, what), getattr(b.manifest, what)
                if x != y:
                    raise ValueError(
                        f"sources {a.loc.uri} and {b.loc.uri} differ in {what} ({x} vs {y}); "
                        "a blend needs one tokenizer: prepare every source with the same tokenizer.json"
                    )

    # --- order ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    @property
    def sources(self) -> list[str]:
        return [s.loc.uri for s in self._sources]

    def tokenizer_bytes(self) -> bytes:
        """The tokenizer.json the data was tokenized with, read where the dataset lives (a local directory or
        s3://...; ``tokenizer_path`` is a URI, not always a local path), checked against the manifest's SHA-256."""
        first = self._sources[0]
        data = first.loc.read_bytes(first.manifest.tokenizer_path)
        if hashlib.sha256(data).hexdigest() != first.manifest.tokenizer_sha256:
            raise IntegrityError(f"{self.tokenizer_path} does not match the SHA-256 in {first.loc.uri}'s manifest; "
                                 "the dataset was changed after prepare: re-run prepare")
        return data

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample index) of each global stream position (any int >= 0)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and int(positions.min()) < 0:
            raise ValueError(f"stream positions must be >= 0, got {int(positions.min())}")
        src, q = self.blend.locate(positions)
        sample = np.empty_like(q)
        with self._lock:
            for s in np.unique(src).tolist():
                mask = src == s
                sample[mask] = self._sources[s].samples(q[mask])
        return src, sample

    # --- reading -------------------------------------------------------------------------------

    def read(self, positions) -> np.ndarray:
        """int64 [len(positions), seq_len + 1]: the windows at these global stream positions."""
        src, sample = self.locate(positions)
        out = np.empty((src.size, self.seq_len + 1), dtype=np.int64)
        self.fill(src, sample, out)
        return out

    def fill(self, src: np.ndarray, sample: np.ndarray, out: np.ndarray) -> None:
        """Write the windows (src[i], sample[i]) into the rows of `out` (int64 [n, seq_len + 1])."""
        shard, local = self.place(src, sample)
        self.fill_placed(src.tolist(), shard.tolist(), local.tolist(), out)

    def place(self, src: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, token offset in that shard) where each window starts; vectorised."""
        shard = np.empty_like(sample)
        local = sample * self.seq_len
        for s in np.unique(src).tolist():
            mask = src == s if len(self._sources) > 1 else slice(None)
            starts = self._sources[s].starts
            k = np.searchsorted(starts, local[mask], side="right") - 1
            shard[mask] = k
            local[mask] -= starts[k]
        return shard, local

    def fill_placed(self, src: list[int], shard: list[int], local: list[int], out: np.ndarray) -> None:
        """fill() for windows already placed (plain lists: the loader places a whole block at once)."""
        width = self.seq_len + 1
        with self._lock:
            for row, (s, k, lo) in enumerate(zip(src, shard, local, strict=True)):
                reader = self._reader(s, k)
                hi = lo + width
                if hi <= reader.size:  # the common case: the window lies inside one shard
                    verified, shift = reader.verified, reader.chunk_shift
                    if not (verified[lo >> shift] and verified[(hi - 1) >> shift]):
                        reader.check(lo, hi)
                    out[row] = reader.tokens[lo:hi]
                else:
                    self._fill_across(row, s, k, lo, out)

    def _fill_across(self, row: int, s: int, k: int, lo: int, out: np.ndarray) -> None:
        """A window that continues into the next shard(s)."""
        width, done = self.seq_len + 1, 0
        while done < width:
            reader = self._reader(s, k)
            hi = min(lo + width - done, reader.size)
            reader.check(lo, hi)
            out[row, done : done + hi - lo] = reader.tokens[lo:hi]
            done += hi - lo
            k, lo = k + 1, 0

    def prefetch(self, src: np.ndarray, sample: np.ndarray) -> None:
        """Hint that these windows are needed soon (starts fetching remote shards; no-op locally)."""
        remote = [i for i, s in enumerate(self._sources) if s.fetcher is not None]
        for s in remote:
            source = self._sources[s]
            ks = np.searchsorted(source.starts, sample[src == s] * self.seq_len, side="right") - 1
            for k in dict.fromkeys(ks.tolist()):
                source.prefetch(k)

    def _reader(self, s: int, k: int) -> ShardReader:
        key = (s, k)
        reader = self._shards.get(key)
        if reader is None:
            reader = self._sources[s].open_shard(k)
            self._shards[key] = reader
            while len(self._shards) > self.config.max_open_shards:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(key)
        return reader

    def close(self) -> None:
        """Unmap every shard and stop remote fetch threads; the dataset is not read after this."""
        if hasattr(self, "_shards"):
            with self._lock:
                self._shards.clear()
        for s in getattr(self, "_sources", []):
            if s.fetcher is not None:
                s.fetcher.close()
