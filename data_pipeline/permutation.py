"""A keyed bijection on [0, n), evaluated on the fly: the global sample order without an index.

Why: a multi-trillion-token run has ~1e9 samples. Megatron materialises a shuffle index of that
length at startup (minutes, GBs, cached files that go stale); a shuffle buffer (Streaming, HF
iterable datasets) is not a permutation, so "sample i" has no stable meaning across resumes and
world sizes. Here position p of an epoch maps to sample `perm(p)` through a Feistel network keyed by
(content hash, seed, seq_len, epoch), so any position is computed in O(1) and the memory used is a
handful of round keys.

How: a balanced Feistel network on 2h bits (2^(2h) >= n, so the domain is at most 4n) is a bijection
on [0, 2^(2h)) for any round function. Cycle walking (re-encrypt while the result is >= n) restricts
it to a bijection on [0, n): the walk from x stays on x's cycle, which holds x < n, so it ends; the
expected number of steps is below 4. Everything is vectorised in numpy uint64 arithmetic (products
wrap mod 2^64, which is what the mixer wants).

Traded off: six rounds of a splitmix64-style mixer give an order that is statistically well mixed but
is not a cryptographic PRP; nobody attacks a data order. Keys come from BLAKE2b so they do not depend
on Python's hash seed or numpy's RNG stream, both of which may change between versions.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

__all__ = ["FeistelPermutation", "derive_key"]

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def derive_key(*parts: object) -> bytes:
    """A 32-byte key from JSON-serialisable parts; stable across processes, platforms and versions."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=32).digest()


class FeistelPermutation:
    """`perm(positions)` -> samples: a bijection on [0, n) chosen by `key`."""

    def __init__(self, n: int, key: bytes) -> None:
        n = int(n)
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got n={n}")
        if n > 1 << 62:
            raise ValueError(f"n={n} exceeds the supported 2^62 positions")
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n = n
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        stream = hashlib.blake2b(key, digest_size=8 * _ROUNDS, person=b"feistel").digest()
        self._keys = np.frombuffer(stream, dtype="<u8").astype(np.uint64)

    def _round(self, x: np.ndarray, k: np.uint64) -> np.ndarray:
        z = x ^ k
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z ^= z >> _S31
        return z & self._mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ self._round(right, k)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray | int) -> np.ndarray:
        """Samples for `positions` (each in [0, n)); returns int64 of the same shape."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise ValueError(
                f"positions must lie in [0, {self.n}); got min={int(x.min())} max={int(x.max())}"
            )
        y = self._encrypt(x.astype(np.uint64).reshape(-1))
        n = np.uint64(self.n)
        out_of_range = np.flatnonzero(y >= n)
        while out_of_range.size:
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = out_of_range[y[out_of_range] >= n]
        return y.astype(np.int64).reshape(x.shape)
