"""Full integrity check of a prepared dataset: every shard's size and SHA-256 against its manifest.

Why separate from the loader: the loader only checks what it can check for free (sizes and the chunk-hash
table at open, each chunk's hash on first touch), so that open -> first batch stays in milliseconds.
This reads every byte once, which is what you want after copying a dataset, before a long run, or in
a cron job over a shared filesystem (`ds-fp4-data verify DIR`).
"""

from __future__ import annotations

import hashlib

from .manifest import load_manifest
from .storage import resolve

__all__ = ["verify_dataset"]

_BLOCK = 8 << 20


def verify_dataset(path: str) -> list[str]:
    """Problems found under the dataset at `path` (a directory or URI); [] when every shard matches."""
    loc = resolve(path)
    manifest = load_manifest(loc)
    problems = []
    for entry in manifest.shards:
        name = loc.uri_of(entry.path)
        if not loc.exists(entry.path):
            problems.append(f"shard {name} is missing")
            continue
        h, size = hashlib.sha256(), 0
        with loc.fs.open_input_stream(loc.path(entry.path)) as f:
            while block := f.read(_BLOCK):
                h.update(block)
                size += len(block)
        if size != entry.bytes:
            problems.append(f"shard {name} is {size} bytes, the manifest says {entry.bytes} (truncated?)")
        elif h.hexdigest() != entry.sha256:
            problems.append(f"shard {name} has SHA-256 {h.hexdigest()}, the manifest says {entry.sha256}")
    tok = manifest.tokenizer_path
    if not loc.exists(tok) or hashlib.sha256(loc.read_bytes(tok)).hexdigest() != manifest.tokenizer_sha256:
        problems.append(f"tokenizer {loc.uri_of(tok)} is missing or differs from the manifest's SHA-256")
    return problems
