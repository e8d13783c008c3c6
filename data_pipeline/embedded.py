"""The embedded default corpus: the running interpreter's standard library sources.

Why: a fresh checkout must train out of the box with no download (this workplace, like many clusters,
reaches no dataset hub). Every Python install carries ~30 MB of real, varied text: the `*.py` files of
its standard library (`sysconfig.get_paths()["stdlib"]`, site-packages excluded, sorted by path), so a
byte-level BPE trained on them and the tokens they make are a small but genuine pretraining corpus.

Traded off: the corpus depends on the Python build (3.11.7 here), so its content hash, and with it
the sample order, differ between Python versions; within one interpreter everything is reproducible.
The call is idempotent: with a valid manifest of the requested vocab size in place it returns at once.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig

from .manifest import EVAL_DIR, MANIFEST_NAME, load_manifest
from .prepare import prepare
from .storage import resolve

__all__ = ["prepare_embedded_corpus", "stdlib_sources"]

RECIPE_NAME = "corpus.json"


def stdlib_sources(max_files: int | None = None) -> list[str]:
    """Sorted paths of the standard library's *.py files (site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    found.sort()
    if not found:
        raise ValueError(f"no *.py files under the standard library {root}; pass your own corpus to prepare()")
    return found[:max_files] if max_files else found


def _ready(out_dir: str, recipe: dict) -> bool:
    """A valid manifest made by the same recipe, with every shard present at its recorded size."""
    loc = resolve(out_dir)
    try:
        if json.loads(loc.read_bytes(RECIPE_NAME)) != recipe:
            return False
        manifest = load_manifest(loc)
        if recipe["eval_fraction"] > 0:
            load_manifest(loc.child(EVAL_DIR))
    except (OSError, ValueError):
        return False
    return all(loc.exists(s.path) and os.path.getsize(loc.path(s.path)) == s.bytes for s in manifest.shards)


def prepare_embedded_corpus(
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    *,
    eval_fraction: float = 0.02,
    max_files: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Prepare the stdlib corpus under `out_dir` (BPE of `vocab_size`); returns the manifest path.

    max_files keeps only the first N sorted files (quick demos and tests).
    """
    out_dir = os.fspath(out_dir)
    files = stdlib_sources(max_files)
    recipe = {
        "corpus": "python-stdlib",
        "python": sys.version.split()[0],
        "files": len(files),
        "vocab_size": vocab_size,
        "eval_fraction": float(eval_fraction),
    }
    if _ready(out_dir, recipe):
        return os.path.join(os.path.abspath(out_dir), MANIFEST_NAME)
    resolve(out_dir).delete(RECIPE_NAME)
    path = prepare(
        files, out_dir, vocab_size=vocab_size, eval_fraction=eval_fraction, workers=workers, progress=progress
    )
    resolve(out_dir).write_bytes(RECIPE_NAME, (json.dumps(recipe, sort_keys=True, indent=1) + "\n").encode())
    return path
