"""Shared fixtures: a small deterministic corpus, prepared once per session (in-process, so it is fast)."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from data_pipeline import prepare
from data_pipeline.manifest import load_manifest
from data_pipeline.storage import resolve

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega def class return import yield lambda while for if else elif try except"
).split()


def write_corpus(root: str, docs: int = 120, seed: int = 0) -> str:
    """`docs` text files of random words (some with a unique marker line), under root/corpus."""
    rng = random.Random(seed)
    d = os.path.join(root, "corpus")
    os.makedirs(d, exist_ok=True)
    for i in range(docs):
        n = rng.randint(40, 400)
        body = " ".join(rng.choice(WORDS) for _ in range(n))
        with open(os.path.join(d, f"doc{i:04d}.txt"), "w") as f:
            f.write(f"document {i}\n{body}\n")
    return d


def all_tokens(path: str) -> np.ndarray:
    """The dataset's whole token stream, read back with plain pyarrow (independent of the loader)."""
    loc = resolve(path)
    m = load_manifest(loc)
    parts = []
    for s in m.shards:
        with pa.memory_map(loc.path(s.path)) as mm:
            parts.append(ipc.open_file(mm).read_all().column("tokens").combine_chunks().values.to_numpy().copy())
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture(scope="session", name="all_tokens")
def all_tokens_fixture():
    """all_tokens(path) as a fixture (test modules here do not import each other)."""
    return all_tokens


@pytest.fixture(scope="session", name="write_corpus")
def write_corpus_fixture():
    return write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    return write_corpus(str(tmp_path_factory.mktemp("text")))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, corpus_dir) -> str:
    """~23K tokens in ~8 shards, BPE vocab 512, 10% of documents held out in eval/."""
    out = str(tmp_path_factory.mktemp("prepared") / "ds")
    prepare([corpus_dir], out, vocab_size=512, shard_tokens=3000, eval_fraction=0.1, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def second_dataset_dir(tmp_path_factory, dataset_dir) -> str:
    """Another corpus tokenized with the first dataset's tokenizer (so the two can be blended)."""
    root = str(tmp_path_factory.mktemp("text2"))
    corpus = write_corpus(root, docs=60, seed=7)
    out = os.path.join(root, "ds2")
    prepare([corpus], out, tokenizer=os.path.join(dataset_dir, "tokenizer.json"), shard_tokens=5000,
            workers=0, progress=False)
    return out
