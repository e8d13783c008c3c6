"""Which held-out sources an evaluation reads: every source's eval/ split that exists by default (the others
named, not fatal), exactly the given eval_sources otherwise (and then they must be usable held-out data)."""

from __future__ import annotations

import os

import pytest
import torch

from data_pipeline import DataConfig, TokenDataset, build_eval_loader
from data_pipeline.evaluation import NoHeldOutSplit, held_out_sources


def test_default_eval_leaves_out_a_source_without_a_split_and_names_it(dataset_dir, second_dataset_dir):
    assert not os.path.exists(os.path.join(second_dataset_dir, "eval"))  # prepared without eval_fraction
    mixed = DataConfig(sources=[dataset_dir, second_dataset_dir], seq_len=8, seed=1)
    with pytest.raises(FileNotFoundError, match="has no held-out split"):
        TokenDataset(mixed, split="eval")  # the dataset itself still refuses: the choice is the loader's
    loader = build_eval_loader(mixed, 4, 2, rank=1, world_size=2, num_batches=2)
    assert loader.left_out == (os.path.abspath(second_dataset_dir),)
    assert loader.dataset.sources == [os.path.join(os.path.abspath(dataset_dir), "eval")]
    # The same batches as an evaluation of the one source that has a split.
    alone = build_eval_loader(DataConfig(sources=[dataset_dir], seq_len=8, seed=1), 4, 2, rank=1, world_size=2,
                              num_batches=2)
    assert alone.left_out == ()
    ours, theirs = list(loader), list(alone)
    assert len(ours) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_default_eval_without_any_split_says_what_to_do(second_dataset_dir):
    with pytest.raises(NoHeldOutSplit, match=r"no source has a held-out split .*--eval-fraction > 0 or set "
                                             r"eval_sources") as err:
        held_out_sources(DataConfig(sources=[second_dataset_dir], seq_len=8))
    assert os.path.abspath(second_dataset_dir) in str(err.value)


def test_explicit_eval_sources_must_be_held_out_prepared_data(dataset_dir, second_dataset_dir):
    sources = [dataset_dir, second_dataset_dir]
    with pytest.raises(ValueError, match=r"eval_sources\[0\] = .* is also a training source, so its loss would "
                                         r"not be held out: prepare it with --eval-fraction > 0 \(it has no eval/"):
        held_out_sources(DataConfig(sources=sources, eval_sources=[second_dataset_dir], seq_len=8))
    with pytest.raises(ValueError, match=f"give its held-out split {os.path.abspath(dataset_dir)}/eval"):
        held_out_sources(DataConfig(sources=sources, eval_sources=[dataset_dir], seq_len=8))
    missing = os.path.join(second_dataset_dir, "eval")
    with pytest.raises(FileNotFoundError, match=r"eval_sources\[1\] = .*/eval': no prepared dataset there"):
        build_eval_loader(DataConfig(sources=[second_dataset_dir], eval_sources=[os.path.join(dataset_dir, "eval"),
                                                                                 missing], seq_len=8), 4, 2)
    # Another prepared dataset is fine, split or not: the user chose it.
    given = DataConfig(sources=[second_dataset_dir], eval_sources=[dataset_dir], seq_len=8)
    assert held_out_sources(given) == (given.eval_sources, ())
    assert build_eval_loader(given, 4, 2, num_batches=1).dataset.sources == [os.path.abspath(dataset_dir)]
