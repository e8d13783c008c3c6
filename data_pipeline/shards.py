"""Shard format: one Arrow IPC file = one record batch = one column `tokens: large_list<uint16|uint32>`.

Why this layout: the list's child array is one flat, contiguous token buffer (the concatenated
documents, each ending in the EOS/separator token) and its int64 offsets are the document
boundaries, so a shard memory-maps to a zero-copy numpy view with no per-token or per-document Python
object, while any Arrow tool can still read documents back (`table.column("tokens")[i]`). uint16 is
used whenever the vocabulary fits (ids < 65536), halving disk and page-cache traffic.

Integrity without a slow open: the token buffer is cut into `chunk_bytes` chunks whose XXH3-64
hashes are stored in the schema metadata. Opening a shard checks the file size against the manifest and
the SHA-256 of that hash table against the manifest (both O(1) in the data size); each chunk's hash
(~20-50 GB/s; zlib's CRC32, used by format 1, ran at ~4 GB/s and cost as much as reading the data) and
its max token id (< vocab) are verified the first time a window touches it. The
whole-file SHA-256 in the manifest is what remote fetches and `ds-fp4-data verify` check. Traded off:
a corrupted Arrow offsets buffer (document boundaries, which the loader never reads) is only caught
by the whole-file hash, not by first-touch checks.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash

from .storage import IntegrityError, Location

__all__ = ["CHUNK_BYTES", "ShardEntry", "ShardReader", "ShardWriter", "encode_shard", "token_dtype"]

SHARD_FORMAT = "ds_fp4.shard/2"
CHUNK_BYTES = 1 << 20
# Chunk hash per format: metadata key, hex digits per chunk, function of a byte buffer. Format 1 shards
# (zlib CRC32) stay readable.
_CHUNK_HASHES = {
    b"chunk_xxh3_64": (16, xxhash.xxh3_64_intdigest),
    b"chunk_crc32": (8, zlib.crc32),
}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size must be in [1, 2^32], got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest records it."""

    path: str
    bytes: int
    tokens: int
    documents: int
    sha256: str
    chunks_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _hash_table(tokens: np.ndarray, chunk_bytes: int) -> str:
    raw = memoryview(tokens).cast("B")
    digests = (xxhash.xxh3_64_intdigest(raw[i : i + chunk_bytes]) for i in range(0, len(raw), chunk_bytes))
    return "".join(f"{d:016x}" for d in digests)


def encode_shard(tokens: np.ndarray, doc_offsets: np.ndarray, vocab_size: int, path: str) -> tuple[bytes, ShardEntry]:
    """Serialise one shard; returns the file bytes and its manifest entry."""
    dtype = token_dtype(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise IntegrityError(
            f"token id {int(tokens.max())} >= vocab_size {vocab_size} while writing {path}; "
            "the tokenizer produces ids outside its declared vocabulary"
        )
    table = _hash_table(tokens, CHUNK_BYTES)
    meta = {"format": SHARD_FORMAT, "chunk_bytes": str(CHUNK_BYTES), "chunk_xxh3_64": table}
    arrow_type = pa.large_list(pa.from_numpy_dtype(dtype))
    column = pa.LargeListArray.from_arrays(pa.array(doc_offsets, pa.int64()), pa.array(tokens))
    schema = pa.schema([pa.field("tokens", arrow_type, nullable=False)], metadata=meta)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    data = sink.getvalue().to_pybytes()
    entry = ShardEntry(
        path=path,
        bytes=len(data),
        tokens=int(tokens.size),
        documents=int(len(doc_offsets) - 1),
        sha256=hashlib.sha256(data).hexdigest(),
        chunks_sha256=hashlib.sha256(table.encode()).hexdigest(),
    )
    return data, entry


class ShardWriter:
    """Accumulates documents (token arrays ending in EOS) and writes a shard every `shard_tokens`."""

    def __init__(self, location: Location, vocab_size: int, shard_tokens: int, subdir: str = "shards") -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self._loc, self._vocab, self._limit, self._subdir = location, vocab_size, shard_tokens, subdir
        self._dtype = token_dtype(vocab_size)
        self._parts: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._pending = 0
        self.entries: list[ShardEntry] = []

    def add(self, doc: np.ndarray) -> None:
        """Append one document (its ids, EOS included); documents never straddle shards."""
        self._parts.append(doc)
        self._lengths.append(int(doc.size))
        self._pending += int(doc.size)
        if self._pending >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        tokens = np.concatenate(self._parts).astype(self._dtype, copy=False)
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        rel = f"{self._subdir}/{len(self.entries):06d}.arrow"
        data, entry = encode_shard(tokens, offsets, self._vocab, rel)
        self._loc.write_bytes(rel, data)
        self.entries.append(entry)
        self._parts, self._lengths, self._pending = [], [], 0

    def close(self) -> list[ShardEntry]:
        self.flush()
        return self.entries


class ShardReader:
    """A memory-mapped shard: size and CRC-table checks at open, chunk checks on first touch."""

    def __init__(self, local_path: str, entry: ShardEntry, vocab_size: int, name: str) -> None:
        self.name = name
        self._vocab = vocab_size
        try:
            size = os.path.getsize(local_path)
        except OSError as exc:
            raise IntegrityError(f"shard {name} is missing ({exc}); re-run prepare") from exc
        if size != entry.bytes:
            raise IntegrityError(
                f"shard {name} is {size} bytes but the manifest says {entry.bytes} "
                "(truncated or replaced); re-run prepare or restore the shard"
            )
        try:
            mm = pa.memory_map(local_path, "r")
            reader = ipc.open_file(mm)
            meta = reader.schema.metadata or {}
            key = next((k for k in _CHUNK_HASHES if k in meta), b"chunk_xxh3_64")
            digits, self._hash = _CHUNK_HASHES[key]
            table = meta.get(key, b"").decode()
            chunk_bytes = int(meta.get(b"chunk_bytes", b"0"))
            column = reader.get_batch(0).column(0)
            tokens = column.values.to_numpy(zero_copy_only=True)
        except (pa.ArrowException, ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"shard {name} is not a readable token shard ({exc}); re-run prepare") from exc
        if hashlib.sha256(table.encode()).hexdigest() != entry.chunks_sha256 or tokens.size != entry.tokens:
            raise IntegrityError(
                f"shard {name} does not match its manifest entry (checksum table or token count differs: "
                f"{tokens.size} tokens vs {entry.tokens}); the file was corrupted or replaced"
            )
        chunk_tokens = chunk_bytes // tokens.dtype.itemsize
        crcs = [int(table[i : i + digits], 16) for i in range(0, len(table), digits)]
        if chunk_tokens < 1 or chunk_tokens & (chunk_tokens - 1) or len(crcs) != -(-tokens.size // chunk_tokens):
            raise IntegrityError(
                f"shard {name} has a malformed checksum table (chunk_bytes {chunk_bytes}); re-run prepare"
            )
        self._column = column
        self.tokens = tokens
        self.size = int(tokens.size)
        #: chunk of token i is i >> chunk_shift; verified[c] is 1 once chunk c passed its checks
        self.chunk_shift = chunk_tokens.bit_length() - 1
        self.verified = bytearray(len(crcs))
        self._chunk_tokens = chunk_tokens
        self._crcs = crcs

    def check(self, lo: int, hi: int) -> None:
        """Verify (once) every chunk overlapping tokens [lo, hi)."""
        for c in range(lo >> self.chunk_shift, ((hi - 1) >> self.chunk_shift) + 1):
            if not self.verified[c]:
                self._verify_chunk(c)

    def _verify_chunk(self, c: int) -> None:
        part = self.tokens[c * self._chunk_tokens : (c + 1) * self._chunk_tokens]
        if self._hash(memoryview(part).cast("B")) != self._crcs[c]:
            raise IntegrityError(
                f"shard {self.name}: checksum mismatch in chunk {c} (tokens {c * self._chunk_tokens}.."
                f"{c * self._chunk_tokens + part.size}); the file is corrupted, re-run prepare"
            )
        top = int(part.max()) if part.size else 0
        if top >= self._vocab:
            raise IntegrityError(
                f"shard {self.name}: token id {top} >= vocab_size {self._vocab}; the manifest's "
                "vocab_size does not match the tokenizer that wrote the shard"
            )
        self.verified[c] = 1

    def document_offsets(self) -> np.ndarray:
        """int64 [documents + 1]: document i is tokens[off[i]:off[i+1]] (its EOS included)."""
        return self._column.offsets.to_numpy(zero_copy_only=True)
