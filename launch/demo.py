"""A one-process NVFP4 smoke run: a tiny Llama, converted to NVFP4, learns Python source on the CPU.

The data is real text no one here wrote: the running interpreter's standard-library sources, read as
bytes (vocab 256), so the run needs no download and no tokenizer. It prints the loss as it falls and
the mean step time; ``--compare`` also trains the BF16 twin (same seed, same batches) and prints both.
This is the quick laptop check; the full trainer is ``launch/train.py``.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ds_fp4


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the sorted stdlib *.py files, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def train(recipe: ds_fp4.NVFP4Recipe, data: torch.Tensor, steps: int, batch: int, seq: int, seed: int,
          log_every: int) -> tuple[list[float], float]:
    model = tiny_llama(seed)
    report = ds_fp4.convert_to_nvfp4(model, recipe)
    print(f"[{'nvfp4' if recipe.enabled else 'bf16 '}] {len(report.converted)}/{len(report.layers)} linear "
          f"layers in NVFP4 ({100 * report.converted_fraction:.0f}% of linear weights)")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        tokens = torch.stack([data[s : s + seq] for s in starts.tolist()]).long()
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels by one itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}  ({times[-1] * 1000:.0f} ms/step)", flush=True)
    return losses, sum(times[1:]) / max(1, len(times) - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also train the BF16 twin and compare")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = stdlib_bytes(4 << 20)
    print(f"data: {data.numel() / 1e6:.1f} MB of Python standard-library source ({sysconfig.get_paths()['stdlib']})")
    runs = [("nvfp4", ds_fp4.NVFP4Recipe.paper())]
    if args.compare:
        runs.append(("bf16", ds_fp4.NVFP4Recipe.bf16()))
    results = {}
    for name, recipe in runs:
        torch.manual_seed(args.seed)
        results[name] = train(recipe, data, args.steps, args.batch, args.seq, args.seed, log_every=5)
    for name, (losses, step_time) in results.items():
        head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"{name}: loss {head:.3f} -> {tail:.3f} (mean of first/last 5 steps), {step_time * 1000:.0f} ms/step")
        if not tail < head:
            print(f"{name}: the loss did not fall")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
