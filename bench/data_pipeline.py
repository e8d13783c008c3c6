"""Data pipeline benchmark: this loader vs a raw Arrow mmap read, Megatron-core and MosaicML Streaming.

What it measures, side by side on one pinned CPU core and one generated 50M-token corpus (uint16,
vocab 50257, random documents of 100..4000 tokens): delivering int64 [8, 4096 + 1] batches
(tokens counted as 8 x 4096 per batch, the same number of batches for every reader, about one
epoch), the time from opening the dataset to the first batch, the time from a resume (fresh process
state, position = half an epoch) to the first batch, and the reader process's peak RSS.

- ours: TokenDataset + BatchLoader with its defaults (prefetch thread, first-touch CRC checks on).
- raw: the physical limit: the same Arrow file memory-mapped, a precomputed numpy permutation of
  windows (an O(N) index, which the pipeline may not use), one fresh int64 array per batch.
- megatron: megatron-core 0.16.1 GPTDataset via BlendedMegatronDatasetBuilder (create_attention_mask
  False, index cache built on open, reused on resume), torch DataLoader(batch_size=8, workers=0).
- streaming: mosaicml-streaming 0.13.0 StreamingDataset over local MDS (4097-token windows, stride
  4096), StreamingDataLoader(batch_size=8, workers=0), resumed through its state_dict.

Each reader runs in its own process (so RSS and imports do not mix), after every corpus file has
been read once (a warm page cache: the loaders are measured, not the disk). The peers need packages that
conflict with the project's venv (streaming pins transformers<5), so they live in `.venv-bench/`,
which this script creates on first use: CPU torch first, then the peers under a torch constraint.

    .venv/bin/python bench/data_pipeline.py            # prints the table, writes bench/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_VENV = os.path.join(ROOT, ".venv-bench")
PEERS = ["megatron-core==0.16.1", "mosaicml-streaming==0.13.0", "psutil", "pyarrow", "numpy"]
TORCH = "torch==2.13.0"
B, S, VOCAB = 8, 4096, 50257


# --- setup (parent) -------------------------------------------------------------------------------

def ensure_bench_venv() -> str:
    py = os.path.join(BENCH_VENV, "bin", "python")
    probe = (
        "import megatron.core, sys, types; sys.modules['streaming.vision'] = types.ModuleType('v'); "
        "import streaming"
    )
    if os.path.exists(py) and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating {BENCH_VENV} (CPU torch, then {', '.join(PEERS[:2])}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", TORCH], check=True)
    constraint = os.path.join(BENCH_VENV, "torch-constraint.txt")
    with open(constraint, "w") as f:
        f.write(TORCH + "+cpu\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "-c", constraint, *PEERS], check=True)
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)  # a CUDA wheel
    return py


def make_corpus(work: str, tokens: int) -> None:
    """Token stream + document lengths (npy), and this pipeline's shards + manifest."""
    import hashlib

    import numpy as np

    sys.path.insert(0, ROOT)
    from data_pipeline.manifest import Manifest, write_manifest
    from data_pipeline.shards import ShardWriter
    from data_pipeline.storage import resolve

    if os.path.exists(os.path.join(work, "ours", "manifest.json")):
        return
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 4000, size=2 * tokens // 2050 + 16)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    stream = rng.integers(1, VOCAB, size=int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths)
    stream[ends - 1] = 0  # EOS closes each document
    os.makedirs(work, exist_ok=True)
    np.save(os.path.join(work, "stream.npy"), stream)
    np.save(os.path.join(work, "lengths.npy"), lengths)
    loc = resolve(os.path.join(work, "ours"))
    writer = ShardWriter(loc, VOCAB, 1 << 26)
    for a, b in zip((ends - lengths).tolist(), ends.tolist(), strict=True):
        writer.add(stream[a:b])
    entries = writer.close()
    loc.write_bytes("tokenizer.json", b"{}")
    write_manifest(loc, Manifest(
        dtype="uint16", vocab_size=VOCAB, eos_id=0, eos_token="<eos>", tokenizer_path="tokenizer.json",
        tokenizer_sha256=hashlib.sha256(b"{}").hexdigest(), num_tokens=int(stream.size),
        num_documents=int(lengths.size), shards=tuple(entries),
    ))


# --- readers (each runs in a child process pinned to one core) ------------------------------------

def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    import torch

    torch.set_num_threads(1)


def _drive(next_batch, n: int) -> float:
    """tokens/s (B x S per batch) over n batches after the first."""
    import torch

    t0 = time.perf_counter()
    for _ in range(n):
        x = next_batch()
    dt = time.perf_counter() - t0
    if x.dtype != torch.int64 or x.shape[0] != B or x.shape[1] < S:
        raise RuntimeError(f"reader delivered {x.dtype} {tuple(x.shape)}, not int64 [{B}, {S}(+1)]")
    return n * B * S / dt


def reader_ours(work: str, n: int) -> dict:
    sys.path.insert(0, ROOT)
    from data_pipeline import BatchLoader, TokenDataset

    t0 = time.perf_counter()
    ds = TokenDataset.open(os.path.join(work, "ours"), seq_len=S, seed=1)
    loader = BatchLoader(ds, B, B)
    next(loader)
    open_ms = (time.perf_counter() - t0) * 1e3
    tps = _drive(lambda: next(loader), n)
    state = {"samples_consumed": (n // 2) * B}
    loader.close()
    ds.close()
    t0 = time.perf_counter()
    ds = TokenDataset.open(os.path.join(work, "ours"), seq_len=S, seed=1)
    loader = BatchLoader(ds, B, B)
    loader.load_state_dict(state)
    next(loader)
    resume_ms = (time.perf_counter() - t0) * 1e3
    loader.close()
    return {"tok_s": tps, "open_ms": open_ms, "resume_ms": resume_ms}


def reader_raw(work: str, n: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import torch

    def batches(start: int):
        mm = pa.memory_map(os.path.join(work, "ours", "shards", "000000.arrow"))
        tokens = ipc.open_file(mm).get_batch(0).column(0).values.to_numpy()
        order = np.random.default_rng(1).permutation((tokens.size - 1) // S)
        i = start
        while True:
            out = np.empty((B, S + 1), dtype=np.int64)
            for j, w in enumerate(order[i * B : (i + 1) * B].tolist()):
                out[j] = tokens[w * S : w * S + S + 1]
            i += 1
            yield torch.from_numpy(out)

    t0 = time.perf_counter()
    it = batches(0)
    next(it)
    open_ms = (time.perf_counter() - t0) * 1e3
    tps = _drive(lambda: next(it), n)
    t0 = time.perf_counter()
    next(batches(n // 2))
    return {"tok_s": tps, "open_ms": open_ms, "resume_ms": (time.perf_counter() - t0) * 1e3}


def reader_megatron(work: str, n: int) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(work, "megatron", "corpus")
    if not os.path.exists(prefix + ".idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        stream, lengths = np.load(os.path.join(work, "stream.npy")), np.load(os.path.join(work, "lengths.npy"))
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        ends = np.cumsum(lengths)
        for a, b in zip((ends - lengths).tolist(), ends.tolist(), strict=True):
            builder.add_item(torch.from_numpy(stream[a:b].astype(np.int64)))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    if not dist.is_initialized():
        sys.path.insert(0, ROOT)
        from launch.distributed import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)

    class Tok:
        eod, pad, vocab_size, unique_identifiers = 0, -1, VOCAB, {"class": "bench"}

    cache = os.path.join(work, "megatron", "cache")

    def build():
        cfg = GPTDatasetConfig(
            random_seed=1, sequence_length=S, blend=([prefix], None), split="1,0,0", tokenizer=Tok(),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, path_to_cache=cache,
        )
        num = int(np.load(os.path.join(work, "lengths.npy")).sum()) // S
        return BlendedMegatronDatasetBuilder(GPTDataset, [num, 0, 0], lambda: True, cfg).build()[0]

    def loader(ds, start):
        dl = torch.utils.data.DataLoader(ds, batch_size=B, sampler=range(start, len(ds)), num_workers=0)
        return iter(dl)

    import shutil

    shutil.rmtree(cache, ignore_errors=True)  # a first run builds its index
    t0 = time.perf_counter()
    ds = build()
    it = loader(ds, 0)
    next(it)
    open_ms = (time.perf_counter() - t0) * 1e3

    # each sample reads S + 1 tokens and yields tokens [S] + labels [S] (int64): the same information
    tps = _drive(lambda: next(it)["tokens"], n)
    t0 = time.perf_counter()
    ds = build()  # index files cached now, as on any restart
    it = loader(ds, (n // 2) * B)
    next(it)
    resume_ms = (time.perf_counter() - t0) * 1e3
    return {"tok_s": tps, "open_ms": open_ms, "resume_ms": resume_ms}




def reader_streaming(work: str, n: int) -> dict:
    import types

    sys.modules["streaming.vision"] = types.ModuleType("v")  # streaming imports torchvision there
    import numpy as np
    from streaming import MDSWriter, StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    mds = os.path.join(work, "mds")
    if not os.path.exists(os.path.join(mds, "index.json")):
        stream = np.load(os.path.join(work, "stream.npy"))
        with MDSWriter(out=mds, columns={"tokens": f"ndarray:uint16:{S + 1}"}) as w:
            for i in range((stream.size - 1) // S):
                w.write({"tokens": stream[i * S : i * S + S + 1]})
    clean_stale_shared_memory()

    def make():
        ds = StreamingDataset(local=mds, shuffle=True, batch_size=B, num_canonical_nodes=1, shuffle_seed=1)
        return StreamingDataLoader(ds, batch_size=B, num_workers=0)

    t0 = time.perf_counter()
    dl = make()
    it = iter(dl)
    next(it)
    open_ms = (time.perf_counter() - t0) * 1e3
    tps = _drive(lambda: next(it)["tokens"].long(), n)
    # a checkpoint at half an epoch, then a fresh loader resumed from it
    dl = make()
    it = iter(dl)
    for _ in range(n // 2):
        next(it)
    state = dl.state_dict()
    t0 = time.perf_counter()
    dl = make()
    dl.load_state_dict(state)
    next(iter(dl))
    resume_ms = (time.perf_counter() - t0) * 1e3
    return {"tok_s": tps, "open_ms": open_ms, "resume_ms": resume_ms}


READERS = {"ours": reader_ours, "raw": reader_raw, "megatron": reader_megatron, "streaming": reader_streaming}


def child(name: str, work: str, n: int, cpu: int) -> None:
    _pin(cpu)
    result = READERS[name](work, n)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    result["peak_rss_mib"] = int(hwm.split()[1]) / 1024
    print("RESULT " + json.dumps(result), flush=True)


# --- parent -------------------------------------------------------------------------------------

def warm_page_cache(work: str) -> None:
    """Read every file of the corpus once, so each reader starts with its files in the page cache.

    Without it the first reader of each format pays for the disk (and the kernel may reclaim the
    cache between readers): a cold run here measured 2.3 s open->first batch for ours and Megatron,
    which is the disk, not the loader.
    """
    for d, _, files in os.walk(work):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=50_000_000)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-data"))
    p.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)))
    p.add_argument("--readers", default="ours,raw,megatron,streaming")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.work, args.batches, args.cpu)

    names = args.readers.split(",")
    peer_py = ensure_bench_venv() if {"megatron", "streaming"} & set(names) else None
    make_corpus(args.work, args.tokens)
    n = args.tokens // (B * S) - 1
    results = {}
    for name in names:
        warm_page_cache(args.work)
        py = peer_py if name in ("megatron", "streaming") else sys.executable
        cmd = [py, os.path.abspath(__file__), "--child", name, "--work", args.work, "--batches", str(n),
               "--cpu", str(args.cpu)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        if run.returncode or not line:
            print(f"{name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[-1][7:])
        print(f"  {name}: done", flush=True)

    print(f"\n{args.tokens / 1e6:.0f}M tokens, int64 [{B}, {S}+1] batches, {n} batches, "
          f"one pinned core (cpu {args.cpu})\n")
    head = (f"| {'reader':<10} | {'tok/s':>9} | {'vs megatron':>11} | {'vs raw':>6} | {'open->1st':>10} | "
            f"{'resume->1st':>11} | {'peak RSS':>9} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    mega, raw = results.get("megatron", {}).get("tok_s"), results.get("raw", {}).get("tok_s")
    for name, r in results.items():
        vm = f"{r['tok_s'] / mega:.1f}x" if mega else "-"
        vr = f"{r['tok_s'] / raw:.2f}" if raw else "-"
        print(f"| {name:<10} | {r['tok_s'] / 1e6:>7.0f} M | {vm:>11} | {vr:>6} | {r['open_ms']:>7.1f} ms | "
              f"{r['resume_ms']:>8.1f} ms | {r['peak_rss_mib']:>5.0f} MiB |")
    ours = results.get("ours")
    if ours:
        checks = {
            ">= 10x megatron tok/s": mega is not None and ours["tok_s"] >= 10 * mega,
            ">= 0.5 of raw tok/s": raw is not None and ours["tok_s"] >= 0.5 * raw,
            "open->first batch <= 50 ms": ours["open_ms"] <= 50,
        }
        print("\n" + "\n".join(f"target {k}: {'met' if v else 'MISSED'}" for k, v in checks.items()))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    out = os.path.join(ROOT, "bench", "results", "data_pipeline.json")
    with open(out, "w") as f:
        json.dump({"tokens": args.tokens, "batches": n, "batch": [B, S + 1], "cpu": args.cpu,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
