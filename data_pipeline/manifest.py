"""manifest.json: the one small file that describes a prepared dataset.

Why a manifest: opening a dataset must cost O(#shards), never O(#documents) or O(#tokens). The
manifest lists each shard with its byte size, token and document counts, SHA-256 and the hash of its
chunk-CRC table, so the loader can plan every sample's location and check integrity without touching
shard data. Its `content_hash` (SHA-256 over everything else in it, canonical JSON) names the data:
the global sample order is keyed by it, so two byte-identical datasets shuffle identically wherever
they live, and a changed dataset never silently reuses an old order.

The file is canonical JSON (sorted keys, no timestamps, no absolute paths), so a re-run of prepare
on the same inputs writes the same bytes. Traded off: nothing that varies between runs (wall time,
host, input mtimes) is recorded; prepare prints those instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np

from .shards import ShardEntry, token_dtype
from .storage import IntegrityError, Location, safe_relpath

__all__ = ["EVAL_DIR", "MANIFEST_NAME", "FORMAT", "Manifest", "load_manifest", "write_manifest"]

MANIFEST_NAME = "manifest.json"
EVAL_DIR = "eval"  # a dataset's held-out split: a dataset of its own in this subdirectory
FORMAT = "ds_fp4.tokens/1"
_SHARD_KEYS = ("path", "bytes", "tokens", "documents", "sha256", "chunks_sha256")


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset (or its held-out eval split)."""

    dtype: str
    vocab_size: int
    eos_id: int
    eos_token: str
    tokenizer_path: str
    tokenizer_sha256: str
    num_tokens: int
    num_documents: int
    shards: tuple[ShardEntry, ...]
    split: str = "train"
    eval_fraction: float = 0.0
    content_hash: str = field(default="", compare=False)

    def body(self) -> dict:
        """Everything but the content hash, as canonical JSON-ready data."""
        return {
            "format": FORMAT,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "tokenizer": {"path": self.tokenizer_path, "sha256": self.tokenizer_sha256},
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "split": self.split,
            "eval_fraction": self.eval_fraction,
            "shards": [s.to_json() for s in self.shards],
        }

    def compute_hash(self) -> str:
        text = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def sealed(self) -> Manifest:
        """A copy whose content_hash matches its body (use after editing a field)."""
        return replace(self, content_hash=self.compute_hash())

    def to_bytes(self) -> bytes:
        data = self.body()
        data["content_hash"] = self.content_hash or self.compute_hash()
        return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()

    def shard_starts(self) -> np.ndarray:
        """int64 [#shards + 1]: the global token offset where each shard starts, then the total."""
        starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s.tokens for s in self.shards], out=starts[1:])
        return starts


def _need(data: dict, key: str, kind: type | tuple, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"manifest {where}: field {key!r} is {value!r}; expected {kind}. Re-run prepare.")
    return value


def parse_manifest(data: dict, where: str) -> Manifest:
    """Validate a decoded manifest; raises ValueError naming the field and the file."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{where} is not a ds_fp4 token manifest (format {got!r}, expected {FORMAT!r})")
    tok = _need(data, "tokenizer", dict, where)
    shards = []
    for i, s in enumerate(_need(data, "shards", list, where)):
        if not isinstance(s, dict) or set(s) != set(_SHARD_KEYS):
            raise ValueError(f"manifest {where}: shard #{i} must have exactly the keys {_SHARD_KEYS}; got {s!r}")
        safe_relpath(s["path"], where)
        shards.append(ShardEntry(**{k: s[k] for k in _SHARD_KEYS}))
    m = Manifest(
        dtype=_need(data, "dtype", str, where),
        vocab_size=_need(data, "vocab_size", int, where),
        eos_id=_need(data, "eos_id", int, where),
        eos_token=_need(data, "eos_token", str, where),
        tokenizer_path=safe_relpath(_need(tok, "path", str, where), where),
        tokenizer_sha256=_need(tok, "sha256", str, where),
        num_tokens=_need(data, "num_tokens", int, where),
        num_documents=_need(data, "num_documents", int, where),
        shards=tuple(shards),
        split=_need(data, "split", str, where),
        eval_fraction=float(_need(data, "eval_fraction", (int, float), where)),
        content_hash=_need(data, "content_hash", str, where),
    )
    if m.dtype != token_dtype(m.vocab_size).name:
        raise ValueError(f"manifest {where}: dtype {m.dtype} does not fit vocab_size {m.vocab_size}")
    if sum(s.tokens for s in m.shards) != m.num_tokens:
        raise ValueError(f"manifest {where}: shard token counts do not add up to num_tokens {m.num_tokens}")
    if not 0 <= m.eos_id < m.vocab_size:
        raise ValueError(f"manifest {where}: eos_id {m.eos_id} is outside [0, vocab_size {m.vocab_size})")
    if m.compute_hash() != m.content_hash:
        raise IntegrityError(
            f"manifest {where} was edited or corrupted: its content_hash {m.content_hash} does not match "
            f"its contents ({m.compute_hash()}); re-run prepare"
        )
    return m


def load_manifest(location: Location, name: str = MANIFEST_NAME) -> Manifest:
    where = f"{location.uri.rstrip('/')}/{name}"
    if not location.exists(name):
        raise FileNotFoundError(f"no manifest at {where}; run `ds-fp4-data prepare ... --out {location.uri}` first")
    try:
        data = json.loads(location.read_bytes(name))
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {where} is not valid JSON ({exc}); re-run prepare") from exc
    return parse_manifest(data, where)


def write_manifest(location: Location, manifest: Manifest) -> None:
    location.write_bytes(MANIFEST_NAME, manifest.sealed().to_bytes())
