"""The embedded default corpus: the interpreter's stdlib sources, prepared once, then reused."""

from __future__ import annotations

import os
import sysconfig
import time

from data_pipeline import TokenDataset, prepare_embedded_corpus
from data_pipeline.embedded import stdlib_sources
from data_pipeline.manifest import load_manifest
from data_pipeline.storage import resolve


def test_stdlib_sources_are_sorted_stdlib_python_files():
    files = stdlib_sources()
    root = sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 500
    assert all(f.startswith(root) and f.endswith(".py") and "site-packages" not in f for f in files)
    assert os.path.join(root, "json", "__init__.py") in files


def test_prepare_embedded_corpus_is_idempotent(tmp_path):
    out = str(tmp_path / "stdlib")
    path = prepare_embedded_corpus(out, vocab_size=400, max_files=40, workers=0, eval_fraction=0.1, progress=False)
    assert path == os.path.join(out, "manifest.json")
    m = load_manifest(resolve(out))
    assert m.vocab_size == 400 and m.num_documents > 20
    stamp = os.path.getmtime(path)
    t0 = time.perf_counter()
    assert prepare_embedded_corpus(out, vocab_size=400, max_files=40, workers=0, eval_fraction=0.1) == path
    assert time.perf_counter() - t0 < 1.0 and os.path.getmtime(path) == stamp  # returned without rework
    ds = TokenDataset.open(out, seq_len=64)
    assert ds.vocab_size == 400 and ds.read([0, 1]).shape == (2, 65)
    ds.close()
    # another recipe (vocab size) is prepared afresh rather than silently reused
    prepare_embedded_corpus(out, vocab_size=300, max_files=40, workers=0, eval_fraction=0.1, progress=False)
    assert load_manifest(resolve(out)).vocab_size == 300
