"""BatchLoader: window contents, exact resume, epochs, rank slicing, the prefetch thread."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from data_pipeline import BatchGeometry, BatchLoader, DataConfig, EvalLoader, TokenDataset, build_eval_loader

S = 32


@pytest.fixture()
def ds(dataset_dir):
    d = TokenDataset.open(dataset_dir, seq_len=S, seed=3)
    yield d
    d.close()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_the_right_windows_of_the_token_stream(ds, dataset_dir, all_tokens):
    stream = all_tokens(dataset_dir)
    assert ds.num_samples == (stream.size - 1) // S
    loader = BatchLoader(ds, global_batch_size=8, micro_batch_size=4)
    positions = np.arange(12 * 4)
    _, samples = ds.locate(positions)
    batches = take(loader, 12)
    loader.close()
    for i, b in enumerate(batches):
        assert b.dtype == torch.int64 and b.shape == (4, S + 1) and b.is_contiguous()
        for row in range(4):
            start = samples[4 * i + row] * S
            assert np.array_equal(b[row].numpy(), stream[start : start + S + 1])
    assert 256 < ds.vocab_size <= 512 and ds.eos_id == 0 and ds.tokenizer_path.endswith("tokenizer.json")


def test_every_sample_once_per_epoch_and_epochs_continue(ds, dataset_dir):
    n = ds.num_samples
    G = 6
    loader = BatchLoader(ds, global_batch_size=G, micro_batch_size=G, prefetch=3)
    steps = (2 * n) // G + 1  # runs over the epoch boundary
    got = torch.cat(take(loader, steps))
    loader.close()
    expected = ds.read(np.arange(steps * G))
    assert torch.equal(got, torch.from_numpy(expected))
    _, samples = ds.locate(np.arange(2 * n))
    assert np.array_equal(np.sort(samples[:n]), np.arange(n))  # epoch 0: no duplicate, none missing
    assert np.array_equal(np.sort(samples[n:]), np.arange(n))  # epoch 1 likewise
    assert not np.array_equal(samples[:n], samples[n:])  # with a fresh order


@pytest.mark.parametrize("stop_at", [0, 1, 5, 17])
def test_resume_equals_uninterrupted_run(ds, stop_at):
    G, B = 8, 2  # 4 micro-batches of accumulation on one rank
    ref = BatchLoader(ds, G, B)
    expected = take(ref, stop_at + 10)
    ref.close()
    first = BatchLoader(ds, G, B)
    take(first, stop_at)
    state = first.state_dict()
    first.close()
    assert state == {"samples_consumed": (stop_at // 4) * G + (stop_at % 4) * B}
    resumed = BatchLoader(ds, G, B)
    resumed.load_state_dict(state)
    got = take(resumed, 10)
    resumed.close()
    for a, b in zip(expected[stop_at:], got, strict=True):
        assert torch.equal(a, b)


def test_resume_across_epoch_boundary_and_in_place(ds):
    G = 4
    n_steps = ds.num_samples // G + 3
    loader = BatchLoader(ds, G, G)
    expected = take(loader, n_steps + 5)
    loader.load_state_dict({"samples_consumed": n_steps * G})  # rewind a running loader
    got = take(loader, 5)
    loader.close()
    assert all(torch.equal(a, b) for a, b in zip(expected[n_steps:], got, strict=True))
    assert loader.epoch == (n_steps + 5) * G // ds.num_samples


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_rank_slices_tile_the_global_batch(ds, W):
    G, B = 12 if W != 4 else 16, 2
    ref = BatchLoader(ds, G, G, prefetch=0)
    global_batches = take(ref, 3)
    loaders = [BatchLoader(ds, G, B, rank=r, world_size=W) for r in range(W)]
    A = G // (B * W)
    for g in range(3):
        parts = [torch.cat(take(loaders[r], A)) for r in range(W)]
        assert torch.equal(torch.cat(parts), global_batches[g])
    for ld in loaders:
        ld.close()


@pytest.mark.parametrize("W_before,W_after", [(2, 1), (2, 3), (1, 4)])
def test_resume_on_another_world_size(ds, W_before, W_after):
    G, B = 12, 1
    expected = take(BatchLoader(ds, G, G, prefetch=0), 6)
    before = [BatchLoader(ds, G, B, rank=r, world_size=W_before, prefetch=0) for r in range(W_before)]
    for ld in before:
        take(ld, 3 * G // (B * W_before))
    state = before[0].state_dict()
    assert all(ld.state_dict() == state for ld in before) and state == {"samples_consumed": 3 * G}
    after = [BatchLoader(ds, G, B, rank=r, world_size=W_after, prefetch=0) for r in range(W_after)]
    for ld in after:
        ld.load_state_dict(state)
    A = G // (B * W_after)
    for g in range(3, 6):
        assert torch.equal(torch.cat([torch.cat(take(ld, A)) for ld in after]), expected[g])


def test_prefetch_thread_stops_and_loader_is_collected(ds):
    before = threading.active_count()
    loader = BatchLoader(ds, 4, 2, prefetch=2)
    next(loader)
    assert threading.active_count() == before + 1
    loader.close()
    assert threading.active_count() == before
    loader = BatchLoader(ds, 4, 2, prefetch=2)
    next(loader)
    del loader
    gc.collect()
    for t in threading.enumerate():
        if t.name.startswith("ds_fp4-loader"):
            t.join(timeout=2)
    assert threading.active_count() == before


def test_finite_loader_and_eval_loader_are_fixed(dataset_dir):
    cfg = DataConfig(sources=[{"path": dataset_dir, "weight": 1.0}], seq_len=8, seed=1)
    ev = build_eval_loader(cfg, global_batch_size=4, micro_batch_size=2, rank=1, world_size=2, num_batches=3)
    first, second = list(ev), list(ev)
    assert len(first) == len(ev) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    train = TokenDataset(cfg)
    train_windows = {tuple(r) for r in train.read(np.arange(train.num_samples)).tolist()}
    eval_windows = {tuple(r) for b in first for r in b.tolist()}
    # held-out documents are different text; a window of 9 BPE tokens is practically never shared
    assert len(eval_windows & train_windows) <= 1
    with pytest.raises(ValueError, match="num_batches"):
        build_eval_loader(cfg, 4, 2, num_batches=10**6)
    # the same loader, built from its parts: a BatchGeometry states the batch shape once
    direct = EvalLoader(TokenDataset(cfg, split="eval"), BatchGeometry(4, 2, rank=1, world_size=2), num_batches=3)
    assert all(torch.equal(a, b) for a, b in zip(first, list(direct), strict=True))


def test_geometry_errors_name_the_numbers(ds):
    with pytest.raises(ValueError, match=r"global_batch_size 10 .* 4 x 2"):
        BatchLoader(ds, global_batch_size=10, micro_batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="rank = 2"):
        BatchLoader(ds, 4, 1, rank=2, world_size=2)
    loader = BatchLoader(ds, 8, 2, world_size=2)
    with pytest.raises(ValueError, match="samples_consumed = 3"):
        loader.load_state_dict({"samples_consumed": 3})
    with pytest.raises(ValueError, match="samples_consumed"):
        loader.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match=r"samples_consumed\n.*greater than or equal to 0.*input_value=-8"):
        loader.load_state_dict({"samples_consumed": -8})
    with pytest.raises(ValueError, match=r"dataset\n.*instance of TokenDataset"):
        BatchLoader("runs/data/mine", 8, 2)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(global_batch_size=0), r"global_batch_size\n.*greater than or equal to 1.*input_value=0"),
        (dict(micro_batch_size=2.0), r"micro_batch_size\n.*valid integer.*input_value=2.0"),
        (dict(rank=True), r"rank\n.*valid integer.*input_value=True"),
        (dict(world_size=-1), r"world_size\n.*greater than or equal to 1.*input_value=-1"),
        (dict(prefetch=-1), r"prefetch\n.*greater than or equal to 0.*input_value=-1"),
        (dict(num_micro_batches="3"), r"num_micro_batches\n.*valid integer.*input_value='3'"),
    ],
)
def test_argument_errors_name_the_argument_the_value_and_the_rule(ds, kwargs, expected):
    # passed by position, as launch/ does: the error still names the argument, not its index
    args = dict(global_batch_size=8, micro_batch_size=2, rank=0, world_size=1, prefetch=2, num_micro_batches=None)
    with pytest.raises(ValueError, match=expected):
        BatchLoader(ds, *(args | kwargs).values())


def test_geometry_arithmetic():
    g = BatchGeometry(12, 2, rank=1, world_size=3)  # A = 2 micro-batches per rank and step
    assert g.accumulation_steps == 2
    assert [g.samples_consumed(t) for t in range(5)] == [0, 6, 12, 18, 24]
    assert [g.micro_step(c) for c in (0, 6, 12, 18, 24)] == list(range(5))
    # rank 1 of 3 owns positions [4, 8) of each global batch of 12, in micro-batches of 2
    assert g.starts(np.arange(4)).tolist() == [4, 6, 16, 18]
    assert g == BatchGeometry(global_batch_size=12, micro_batch_size=2, rank=1, world_size=3)
