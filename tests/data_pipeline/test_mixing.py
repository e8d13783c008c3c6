"""Blends of several sources: proportions, one-counter resume, world-size invariance, compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline import BatchLoader, DataConfig, TokenDataset, prepare


@pytest.fixture()
def blend(dataset_dir, second_dataset_dir):
    ds = TokenDataset(DataConfig(
        sources=[{"path": dataset_dir, "weight": 3.0}, {"path": second_dataset_dir, "weight": 1.0}],
        seq_len=16, seed=21,
    ))
    yield ds
    ds.close()


def test_proportions_follow_the_weights(blend):
    src, _ = blend.locate(np.arange(40_000))
    share = np.bincount(src, minlength=2) / src.size
    assert abs(share[0] - 0.75) < 0.01 and abs(share[1] - 0.25) < 0.01
    # and locally, not only on average: every window of 2000 samples is within 5 points
    windows = src[: 40_000].reshape(20, 2000).mean(axis=1)
    assert np.all(np.abs(windows - 0.25) < 0.05)


def test_each_source_walks_its_own_permutation(blend):
    src, sample = blend.locate(np.arange(60_000))
    for s in (0, 1):
        n = blend._sources[s].num_samples
        mine = sample[src == s][:n]
        assert np.array_equal(np.sort(mine), np.arange(n))  # one full epoch of source s, no repeats


def test_per_source_positions_derive_from_the_counter(blend):
    c = 12_345
    src, _ = blend.locate(np.arange(c))
    assert blend.blend.consumed(c) == np.bincount(src, minlength=2).tolist()


def test_blend_resume_and_world_size(blend):
    G = 12
    ref = BatchLoader(blend, G, G, prefetch=0)
    expected = [next(ref) for _ in range(8)]
    first = BatchLoader(blend, G, 2, rank=0, world_size=2)
    for _ in range(4 * 3):
        next(first)
    state = first.state_dict()
    first.close()
    ranks = [BatchLoader(blend, G, 4, rank=r, world_size=3) for r in range(3)]
    for ld in ranks:
        ld.load_state_dict(state)
    for g in range(4, 8):
        assert torch.equal(torch.cat([next(ld) for ld in ranks]), expected[g])
    for ld in ranks:
        ld.close()


def test_sources_with_different_tokenizers_are_refused(tmp_path, dataset_dir, corpus_dir):
    other = str(tmp_path / "other")
    prepare([corpus_dir], other, vocab_size=300, workers=0, progress=False)
    with pytest.raises(ValueError, match="differ in tokenizer_sha256"):
        TokenDataset.open([dataset_dir, other], seq_len=8)
