"""NVFP4 vs bf16 gradient reduce-scatter: bytes on the wire and time, measured in one run.

    python bench/comm.py                       # 2 CPU ranks (gloo), buckets of 1M..100M elements
    python bench/comm.py --sizes 1e6 4e6 --reps 5
    python bench/comm.py --device cuda         # one rank per GPU (NCCL), e.g. on an 8-GPU node

Both sides start from the same gradient bucket (bf16 values) and end with this rank's reduced shard:
  bf16:  dist.reduce_scatter_tensor on the bf16 bucket (what DeepSpeed sends by default);
  nvfp4: ds_fp4.comm.reduce_scatter (stochastic-rounding quantize, all_to_all of codes + scales,
         fp32 decode-and-sum), i.e. the ZeRO-3 seam, quantization time included.
Bytes are what this rank sends (codes, E4M3 scales, amax and padding for NVFP4). On a CPU the NVFP4
side is dominated by the torch-reference quantizer, so the time ratio says little about a GPU; the
byte ratio is the point here. The script prints ratios and writes bench/results/comm_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_fp4 import comm  # noqa: E402
from launch.distributed import free_port  # noqa: E402


def _time(fn, reps: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(n: int, rank: int, world: int, device: torch.device, reps: int, sync) -> dict:
    """Both reduce-scatters of one n-element bf16 bucket: bytes, median times, NVFP4 error."""
    grad = (torch.randn(n, generator=torch.Generator().manual_seed(rank)) * 1e-3).to(device, torch.bfloat16)
    shard = torch.empty(n // world, dtype=torch.bfloat16, device=device)
    t_bf16 = _time(lambda: dist.reduce_scatter_tensor(shard, grad), reps, sync)
    state = comm.CommState(seed=1, backend="auto")
    t_fp4 = _time(lambda: comm.reduce_scatter(grad, None, state, itemsize=2), reps, sync)
    stats = state.grad_stats
    exact = grad.float()
    dist.all_reduce(exact)
    mine = comm.reduce_scatter(grad, None, comm.CommState(seed=2), itemsize=2)
    ref = exact[rank * (n // world):(rank + 1) * (n // world)]
    return {
        "elements": n,
        "bf16_bytes": stats.bytes_bf16 // stats.calls,
        "nvfp4_bytes": stats.bytes_sent // stats.calls,
        "byte_ratio": stats.bytes_sent / stats.bytes_bf16,
        "bf16_s": t_bf16,
        "nvfp4_s": t_fp4,
        "time_ratio": t_fp4 / t_bf16,
        "nvfp4_rel_error": ((mine - ref).norm() / ref.norm()).item(),
    }


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = [measure(int(n) // (16 * world) * 16 * world, rank, world, device, args.reps, sync) for n in args.sizes]
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--world", type=int, default=None, help="ranks (default: 2 on CPU, all GPUs on CUDA)")
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 4e6, 16e6, 64e6, 100e6])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(world, port, args, queue), nprocs=world, start_method="spawn")
    rows = queue.get()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}"
    print(f"NVFP4 vs bf16 reduce-scatter, {world} ranks on {name}")
    print(f"{'elements':>12} {'bf16 bytes':>12} {'nvfp4 bytes':>12} {'bytes':>7} {'bf16 s':>8} {'nvfp4 s':>8} "
          f"{'time':>7} {'rel err':>8}")
    for r in rows:
        print(f"{r['elements']:>12,} {r['bf16_bytes']:>12,} {r['nvfp4_bytes']:>12,} {r['byte_ratio']:>7.3f} "
              f"{r['bf16_s']:>8.3f} {r['nvfp4_s']:>8.3f} {r['time_ratio']:>6.1f}x {r['nvfp4_rel_error']:>8.3f}")
    date = datetime.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"comm_{name.replace(' ', '_')}_{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "world": world, "date": date, "torch": torch.__version__,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
