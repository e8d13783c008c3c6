"""World-size invariance with real torch.distributed gloo ranks (separate processes on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline import TokenDataset
from launch.distributed import free_port

pytestmark = pytest.mark.slow

_RANK = r"""
import sys, torch, torch.distributed as dist
from data_pipeline import BatchLoader, TokenDataset
path, W, r, port, G, B, start, n, out = sys.argv[1:]
W, r, G, B, start, n = map(int, (W, r, G, B, start, n))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=W)
ds = TokenDataset.open(path, seq_len=16, seed=11)
loader = BatchLoader(ds, G, B, rank=r, world_size=W)
loader.load_state_dict({"samples_consumed": start})
A = G // (B * W)
batches = []
for _ in range(n):
    mine = torch.cat([next(loader) for _ in range(A)])   # this rank's slice of one global batch
    parts = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(parts, mine)
    batches.append(torch.cat(parts))
state = loader.state_dict()
loader.close()
if r == 0:
    torch.save({"batches": torch.stack(batches), "state": state}, out)
dist.barrier()
dist.destroy_process_group()
"""


def run_ranks(tmp_path, path, W, G, B, start, n):
    out = str(tmp_path / f"w{W}-{start}.pt")
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, path, *map(str, (W, r, port, G, B, start, n)), out],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for r in range(W)
    ]
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)


def test_world_size_changes_keep_the_global_order(tmp_path, dataset_dir):
    G, B, n = 12, 2, 4
    ds = TokenDataset.open(dataset_dir, seq_len=16, seed=11)
    reference = torch.from_numpy(ds.read(np.arange(2 * n * G))).reshape(2 * n, G, -1)
    results = {W: run_ranks(tmp_path, dataset_dir, W, G, B, 0, n) for W in (1, 2, 3)}
    for W, res in results.items():
        assert torch.equal(res["batches"], reference[:n]), f"W={W} changed the global order"
        assert res["state"] == {"samples_consumed": n * G}
    # resized restarts: a 2-rank run's checkpoint resumed on 1 and on 3 ranks (1 -> 4: test_loader.py)
    for W_before, W_after in ((2, 1), (2, 3)):
        state = results[W_before]["state"]["samples_consumed"]
        resumed = run_ranks(tmp_path, dataset_dir, W_after, G, B, state, n)
        assert torch.equal(resumed["batches"], reference[n:]), f"resume {W_before} -> {W_after} ranks diverged"
