"""The numbers the trainer reports: learning-rate schedule, throughput, MFU, and their sinks.

Warmup-stable-decay (WSD): linear warmup to the peak lr, constant, then a decay over the final
``decay_fraction`` of the steps (the paper decays over the last 20%). WSD rather than cosine because the
stable phase can be extended or branched into a decay at any point without retraining.

MFU = achieved model FLOP/s / (devices x peak FLOP/s), with model FLOPs per token = 6 N + 12 L H S
(N non-embedding parameters, L layers, H hidden size, S sequence length; the PaLM appendix formula).
It counts the math of a BF16 model: NVFP4 GEMMs do the same FLOPs faster on hardware that has them.
"""

from __future__ import annotations

import math
import time

import torch

# Dense BF16 tensor-core peaks (TFLOP/s) of common accelerators; override with trainer.peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "GB200": 2500.0, "A100": 312.0,
               "L40S": 362.0, "A10": 125.0, "MI300X": 1307.0}


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
