"""The DeepSpeed replacements against DeepSpeed's own functions, in one process, with fake collectives.

Every replacement in ds_fp4/deepspeed_patches.py promises to keep DeepSpeed's scaling rules and data
layout and to swap only the collective. Here both sides run with their collective replaced by the same
deterministic stand-in (W ranks that hold the same tensor, so the sum is W times it), so the scaling
and the layout are compared bit for bit, without ranks and without NVFP4 noise. The real collectives
run on real ranks in test_engine.py.
"""

import types

import pytest
import torch
from torch._utils import _flatten_dense_tensors

from ds_fp4 import comm
from ds_fp4.deepspeed_patches import comm_seams as deepspeed_patches

WORLD = 3  # not a power of 2: multiplying by 1/3 and dividing by 3 round differently


@pytest.fixture
def originals():
    """DeepSpeed's original functions by seam path; the patches are removed again if installed here."""
    installed_here = deepspeed_patches.install()
    yield dict(deepspeed_patches._originals)
    if installed_here:
        deepspeed_patches.uninstall()


def _fake_world(monkeypatch, world: int, me: int) -> None:
    """Both sides see `world` ranks, this one `me`, and a sum over ranks that multiplies by `world`."""
    import deepspeed.comm as ds_dist

    def fake_sum(t, *args, **kwargs):
        return t.mul_(world)

    for module in (ds_dist, deepspeed_patches.dist):
        monkeypatch.setattr(module, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(module, "get_rank", lambda group=None: me)
    monkeypatch.setattr(ds_dist, "get_global_rank", lambda group=None, group_rank=0: group_rank)
    monkeypatch.setattr(ds_dist, "all_reduce", fake_sum)
    monkeypatch.setattr(ds_dist, "reduce", fake_sum)
    monkeypatch.setattr(comm, "all_reduce_", lambda t, group, state, itemsize: fake_sum(t))
    monkeypatch.setattr(comm, "reduce_", lambda t, dst, group, state, itemsize: fake_sum(t))


def _engine(nvfp4: bool, scaling: tuple, comm_dtype: torch.dtype):
    """What the replaced DeepSpeedEngine method reads (postscale and predivide through methods)."""
    average, postscale, predivide = scaling
    return types.SimpleNamespace(
        _ds_fp4_comm=comm.CommState(seed=0) if nvfp4 else None, flatten=_flatten_dense_tensors,
        gradient_average=average, communication_data_type=comm_dtype,
        postscale_gradients=lambda: postscale, gradient_predivide_factor=lambda: predivide)


def _optimizer(nvfp4: bool, scaling: tuple, sequence_parallel: int):
    """What the replaced DeepSpeedZeroOptimizer methods read (postscale and predivide as attributes)."""
    average, postscale, predivide = scaling
    return types.SimpleNamespace(
        _ds_fp4_comm=comm.CommState(seed=0) if nvfp4 else None, flatten=_flatten_dense_tensors,
        gradient_average=average, postscale_gradients=postscale, gradient_predivide_factor=predivide,
        dp_process_group=None, sequence_parallel_size=sequence_parallel)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class _Captured(Exception):
    """Stops DeepSpeed's reduce_scatter_coalesced once its send buffer is seen."""


DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
SCALINGS = [(average, postscale, predivide) for average in (False, True) for postscale in (False, True)
            for predivide in (1.0, 2.0, 3.0, 6.0)]


@pytest.mark.parametrize("grad_dtype, comm_dtype", DTYPES)
def test_replaced_reductions_keep_deepspeeds_scaling_bit_for_bit(originals, monkeypatch, grad_dtype, comm_dtype):
    """gradient_average x postscale x predivide factor x sequence parallelism x destination, with W = 3."""
    engine_bucket = originals["DeepSpeedEngine.allreduce_bucket"]
    zero_bucket = originals["DeepSpeedZeroOptimizer.allreduce_bucket"]
    zero_predivide = originals["DeepSpeedZeroOptimizer.gradient_reduction_w_predivide"]
    gen = torch.Generator().manual_seed(0)
    for me, scaling in [(me, scaling) for me in (0, 2) for scaling in SCALINGS]:
        _fake_world(monkeypatch, WORLD, me)
        bucket = [torch.randn(33, generator=gen).to(grad_dtype), torch.randn(20, generator=gen).to(grad_dtype)]
        for world_arg in (None, 2 * WORLD):  # DeepSpeed passes dp_world_size for expert-parallel groups
            ours = deepspeed_patches._engine_allreduce_bucket(_engine(True, scaling, comm_dtype), bucket, None,
                                                              world_arg)
            theirs = engine_bucket(_engine(False, scaling, comm_dtype), bucket, None, world_arg)
            assert _same(ours, theirs), ("engine", me, scaling, world_arg)
        for sp in (1, 2, 3):
            x = torch.randn(53, generator=gen).to(grad_dtype)
            mine, ref = x.clone(), x.clone()
            ours = deepspeed_patches._zero_reduction_w_predivide(_optimizer(True, scaling, sp), mine, comm_dtype)
            theirs = zero_predivide(_optimizer(False, scaling, sp), ref, comm_dtype)
            assert _same(ours, theirs) and _same(mine, ref), ("predivide", me, scaling, sp)
            for dst in (None, 0, 2):  # all-reduce; reduce to this rank or to another one
                for divide in (False, True):
                    kwargs = {"rank": dst, "divide": divide}
                    ours = deepspeed_patches._zero_allreduce_bucket(_optimizer(True, scaling, sp), bucket,
                                                                    comm_dtype, **kwargs)
                    theirs = zero_bucket(_optimizer(False, scaling, sp), bucket, comm_dtype, **kwargs)
                    assert _same(ours, theirs), ("bucket", me, scaling, sp, dst, divide)


def test_shards_lay_out_tensors_as_deepspeeds_coalesced_reduce_scatter(originals, monkeypatch):
    """comm._shards puts chunk r of every tensor in row r where DeepSpeed's reduce_scatter_coalesced
    does; DeepSpeed's padding is uninitialized, ours is zero, and each row is padded to whole 1x16 blocks."""
    from deepspeed.runtime.comm import coalesced_collectives

    sizes = (101, 5, 48, 1, 33)  # uneven chunks; the last ranks' chunks of 5 and 1 are short or empty
    tensors = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    seen = []

    def capture(buffer, output, group=None, **kwargs):
        seen.append(buffer.clone())  # the buffer after DeepSpeed's pre-division by world
        raise _Captured

    monkeypatch.setattr(coalesced_collectives, "_torch_reduce_scatter_fn", capture)
    for world in (2, WORLD, 4):
        _fake_world(monkeypatch, world, 0)
        seen.clear()
        with pytest.raises(_Captured):
            originals["reduce_scatter_coalesced"]([t.clone() for t in tensors], None)
        rows, n = comm._shards(tensors, world)
        real, _ = comm._shards([torch.ones_like(t) for t in tensors], world)
        assert n == sum(-(-s // world) for s in sizes) and rows.shape == (world, -(-n // 16) * 16)
        assert real.sum() == sum(sizes) and torch.equal(rows[real == 0], torch.zeros_like(rows[real == 0]))
        data = real[:, :n] == 1
        assert torch.equal(rows[:, :n][data] / world, seen[0].view(world, n)[data]), world
    single, n = comm._shards(tensors[0], WORLD)  # one tensor: the plain reduce-scatter layout
    assert n == 34 and torch.equal(single, comm._shards([tensors[0]], WORLD)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coalesced_reduce_scatter_returns_what_deepspeed_returns(originals, monkeypatch, dtype):
    """With a reduce-scatter that sums 4 identical ranks, ours and DeepSpeed's hand back the same
    pieces: this rank's chunk of each tensor, averaged, short or empty at the end (4: exact in bf16)."""
    from deepspeed.runtime.comm import coalesced_collectives

    world = 4
    tensors = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in (101, 5, 48, 1)]

    def their_sum(buffer, output, group=None, **kwargs):
        output.copy_(buffer.view(world, -1)[me] * world)

    def our_sum(tensors, group, state, itemsize):
        rows, n = comm._shards(tensors, world)
        return rows[me, :n] * world

    monkeypatch.setattr(coalesced_collectives, "_torch_reduce_scatter_fn", their_sum)
    monkeypatch.setattr(comm, "reduce_scatter", our_sum)
    monkeypatch.setattr(deepspeed_patches._grad_scatter, "state", comm.CommState(seed=0), raising=False)
    for me in range(world):
        _fake_world(monkeypatch, world, me)
        ours = deepspeed_patches._reduce_scatter_coalesced(tensors, None)
        theirs = originals["reduce_scatter_coalesced"]([t.clone() for t in tensors], None)
        assert [t.numel() for t in ours] == [t.numel() for t in theirs]
        assert all(_same(a, b) for a, b in zip(ours, theirs, strict=True)), me
    assert [t.numel() for t in ours] == [101 - 3 * 26, 0, 12, 0]  # the last rank's: short, empty, full, empty


def test_comm_stats_snapshot_and_reset():
    stats = comm.CommStats()
    stats.add(sent=193, elements_on_wire=334, baseline_itemsize=4)
    stats.add(sent=0, elements_on_wire=0, baseline_itemsize=4)  # a reduce's destination sends nothing
    snap = stats.snapshot_and_reset()
    assert (snap.bytes_sent, snap.bytes_baseline, snap.bytes_bf16, snap.calls) == (193, 1336, 668, 2)
    assert stats == comm.CommStats()


def test_seeds_differ_per_call_and_restart_from_the_state_dict():
    state = comm.CommState(seed=7)
    first = [state.next_seed() for _ in range(3)]
    assert len(set(first)) == 3 and all(0 <= s < 2**63 for s in first)
    saved = state.state_dict()
    later = [state.next_seed() for _ in range(2)]
    again = comm.CommState()
    again.load_state_dict(saved)
    assert [again.next_seed() for _ in range(2)] == later
    assert comm.CommState(seed=8).next_seed() != first[0]
