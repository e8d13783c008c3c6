"""The numbers the trainer reports: learning-rate schedule, throughput, MFU, and their sinks (RunLog).

Warmup-stable-decay (WSD): linear warmup to the peak lr, constant, then a decay over the final
``decay_fraction`` of the steps (the paper decays over the last 20%). WSD rather than cosine because the
stable phase can be extended or branched into a decay at any point without retraining.

MFU = achieved model FLOP/s / (devices x peak FLOP/s), with model FLOPs per token = 6 N + 12 L H S
(N non-embedding parameters, L layers, H hidden size, S sequence length; the PaLM appendix formula).
It counts the math of a BF16 model: NVFP4 GEMMs do the same FLOPs faster on hardware that has them.

The batch digest (steps.jsonl) sums a hash of every sample of the global batch, wrapping like int64: it
does not depend on how the batch was split over ranks, so equal digests show that a resized or resumed
run read the same data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_file

# Dense BF16 tensor-core peaks (TFLOP/s) of common accelerators; override with trainer.peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "GB200": 2500.0, "A100": 312.0,
               "L40S": 362.0, "A10": 125.0, "MI300X": 1307.0}


_DIGEST_WEIGHTS: dict[int, torch.Tensor] = {}


def wrap_int64(x: int) -> int:
    """x modulo 2^64, as a signed int64 (what torch's int64 sums wrap to)."""
    return (x + 2**63) % 2**64 - 2**63


def sample_digest(batch: torch.Tensor) -> int:
    """Sum over samples of a position-weighted hash of their tokens (mod 2^64, order-independent)."""
    n = batch.shape[1]
    if n not in _DIGEST_WEIGHTS:
        _DIGEST_WEIGHTS[n] = torch.randint(1, 2**62, (n,), generator=torch.Generator().manual_seed(n))
    return int((batch.cpu() * _DIGEST_WEIGHTS[n]).sum().item())


def wsd_lambda(total_steps: int, warmup_steps: int, decay_fraction: float, shape: str, min_ratio: float):
    """Multiplier of the peak lr after ``step`` applied optimizer steps."""
    decay_steps = int(round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        if shape == "cosine":
            left = 0.5 * (1 + math.cos(math.pi * progress))
        elif shape == "sqrt":
            left = 1 - math.sqrt(progress)
        else:
            left = 1 - progress
        return min_ratio + (1 - min_ratio) * left

    return f


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = getattr(model, "config", None)
    embed = sum(m.weight.numel() if m.weight.numel() else getattr(m.weight, "ds_numel", 0)
                for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(p.numel() if p.numel() else getattr(p, "ds_numel", 0) for p in model.parameters())
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    return 6.0 * (total - embed) + 12.0 * layers * hidden * seq_len


def peak_flops(configured_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    if configured_tflops:
        return configured_tflops * 1e12, "trainer.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value * 1e12, f"table ({name})"
    # CPU (or an unknown GPU): measure what a large fp32 matmul achieves on this process's threads.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(512, 512, device=device)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * 512**3 * n / (time.perf_counter() - t0), f"measured fp32 matmul on {device}"


class Throughput:
    """Tokens per second over the steps since the last report (``report``), and since the start
    (``overall``, for the progress bar, which must not see the window reset)."""

    def __init__(self) -> None:
        self.t0 = self.start = time.perf_counter()
        self.tokens = self.total = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.total += tokens

    def overall(self) -> float:
        return self.total / max(time.perf_counter() - self.start, 1e-9)

    def report(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


def tensorboard_dir(section: Mapping[str, Any] | None, out: Path) -> Path | None:
    """Where the TensorBoard events go, from DeepSpeed's "tensorboard" config section (absent: on, under
    out_dir/tensorboard/train; given: on only with "enabled": true, as DeepSpeed reads it). The trainer
    takes the section away from DeepSpeed, whose own writer would add its lr as `Train/Samples/lr` over
    samples, a second curve of `train/lr`; RunLog writes every scalar itself."""
    if section is None:
        section = {"enabled": True}
    unknown = sorted(set(section) - {"enabled", "output_path", "job_name"})
    if unknown or not isinstance(section.get("enabled", False), bool):
        raise ValueError(f"the \"tensorboard\" config section takes enabled (true/false), output_path and "
                         f"job_name; got {dict(section)!r}")
    if not section.get("enabled", False):
        return None
    return Path(section.get("output_path") or out / "tensorboard") / section.get("job_name", "train")


class RunLog:
    """Where the numbers go, on rank 0 (other ranks write nothing): one JSON line per step in
    out_dir/steps.jsonl, TensorBoard scalars through our own SummaryWriter, and the same scalars to the
    engine's other monitors (wandb, csv, comet) when the config enables them.

    A run starts at ``start_step`` (a resume's checkpoint, or 0): what a killed run logged after it is
    dropped, so no step appears twice. steps.jsonl is rewritten without those rows (atomically), and the
    SummaryWriter opens with ``purge_step``, which makes TensorBoard's readers discard the earlier events
    from that step on (the old event files themselves stay as they are)."""

    def __init__(self, out: Path, rank: int, world: int, engine, flops_per_token: float, peak: float,
                 tensorboard: Mapping[str, Any] | None, start_step: int) -> None:
        """``tensorboard``: DeepSpeed's "tensorboard" config section (tensorboard_dir)."""
        self.out, self.rank, self.world, self.engine = out, rank, world, engine
        self.flops_per_token = flops_per_token  # model_flops_per_token, for the MFU
        self.peak = peak  # peak FLOP/s per device (peak_flops), for the MFU
        monitor = getattr(engine, "monitor", None)
        self.monitor = monitor if rank == 0 and monitor is not None and monitor.enabled else None
        self.writer = None  # torch's SummaryWriter, rank 0
        self.dropped = 0  # steps.jsonl rows after start_step, dropped at start
        where = tensorboard_dir(tensorboard, out)
        if rank == 0:
            self.dropped = self._truncate(start_step)
            if where is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(where), purge_step=start_step + 1)

    def _truncate(self, step: int) -> int:
        """Keep the rows of steps.jsonl up to ``step``; returns how many later rows were dropped. A row is
        written with its newline in one call, so a row without one was cut by a kill and goes too."""
        path = self.out / "steps.jsonl"

        def keep(line: str) -> bool:
            try:
                return line.endswith("\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False

        if not path.is_file():
            return 0
        with open(path) as src:
            dropped = sum(not keep(line) for line in src)
        if dropped:  # rewrite only then: the file grows by a line per step
            with open(path) as src, atomic_file(path) as dst:
                dst.writelines(line for line in src if keep(line))
        return dropped

    def record(self, row: dict) -> None:
        """One line of steps.jsonl: step, loss, lr, tokens, applied, batch digest."""
        if self.rank == 0:
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def events(self, events: list[tuple[str, float, int]]) -> None:
        if self.writer is not None:
            for tag, value, step in events:
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()  # as DeepSpeed's monitor did: a killed run keeps what it logged
        if self.monitor is not None:
            self.monitor.write_events(events)

    def step(self, s: int, loss: float, tokens_per_s: float, tokens: int, skips_total: int,
             figures: dict | None) -> None:
        """The scalars of step ``s``: loss, lr, throughput, MFU, skips, grad norm, NVFP4 communication bytes,
        and the health figures if the step collected them."""
        engine = self.engine
        events = [("train/loss", loss, s)] if math.isfinite(loss) else []
        events += [
            ("train/lr", engine.get_lr()[0], s),
            ("train/tokens_per_s", tokens_per_s, s),
            ("train/mfu", tokens_per_s * self.flops_per_token / (self.world * self.peak), s),
            ("train/skipped_steps", float(skips_total), s),
            ("train/tokens", float(tokens), s),
        ]
        norm = engine.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            events.append(("train/grad_norm", float(norm), s))
        comm = engine.nvfp4.comm_stats(reset=True)
        for kind in ("grad", "weight"):
            if comm[f"{kind}_bytes_bf16"]:
                events += [(f"comm/{kind}_bytes_sent", float(comm[f"{kind}_bytes_sent"]), s),
                           (f"comm/{kind}_bytes_saved", float(comm[f"{kind}_bytes_saved"]), s),
                           (f"comm/{kind}_ratio_vs_bf16", comm[f"{kind}_bytes_sent"] / comm[f"{kind}_bytes_bf16"], s)]
        self.events(events)
        if figures:
            self.health(s, figures)

    def health(self, s: int, figures: dict) -> None:
        """Per-layer NVFP4 health figures (ds_fp4.stats), the finite ones."""
        self.events([(f"nvfp4/{layer}/{tensor}/{name}", float(value), s)
                     for layer, tensors in figures.items() for tensor, values in tensors.items()
                     for name, value in values.items() if math.isfinite(value)])

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
