"""Quantization health: is NVFP4 still representing this layer's tensors well?

For each quantized tensor (a layer's input X, weight W, and output gradient dY) the figures are:
  amax            the fp32 tensor amax (its trend shows activation and gradient growth);
  underflow       fraction of non-zero blocks whose E4M3 scale rounded to 0 (the block decodes to 0:
                  its values are lost; grows when a tensor's dynamic range exceeds what E4M3 covers);
  saturated       fraction of blocks whose scale is the E4M3 maximum 448 (the amax block always is;
                  many more means the range is dominated by a few outliers);
  sqnr_db         10 log10(|x|^2 / |x - q(x)|^2), the signal-to-quantization-noise ratio (about
                  20 dB is typical for Gaussian data; a drop flags a distribution NVFP4 handles badly).

Collection is off by default and costs one dequantize per tensor when on: the trainer switches it on
for one micro-batch every ``stats_interval`` steps (:func:`collect_stats`) and reads the figures back.

The dependency runs one way: this module imports the layer it observes, and the layer knows only the
``record`` method of the :class:`LayerStats` it is handed (ds_fp4.linear.StatsSink).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .hadamard import rht
from .linear import NVFP4Linear
from .nvfp4 import BLOCK, E4M3_MAX, NVFP4Tensor


@torch.no_grad()
def health(x: torch.Tensor, q: NVFP4Tensor) -> dict[str, float]:
    """The health figures of ``q``, the quantization of ``x`` (same logical shape)."""
    scale = q.scale.to(torch.float32)
    ref = x.detach().reshape(q.rows, q.cols).to(torch.float32)
    if q.hadamard_signs is not None:
        ref = rht(ref, q.hadamard_signs)
    block_max = ref.abs().view(q.rows, q.cols // BLOCK, BLOCK).amax(-1)
    nonzero = block_max > 0
    underflow = ((scale == 0) & nonzero).sum().item() / max(1, nonzero.sum().item())
    saturated = (scale == E4M3_MAX).float().mean().item()
    err = (ref - q.dequantize().reshape(ref.shape)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    sqnr = 10 * math.log10(signal / err) if err > 0 and signal > 0 else float("inf")
    return {"amax": q.amax.item(), "underflow": underflow, "saturated": saturated, "sqnr_db": sqnr}


class LayerStats(dict):
    """One layer's figures, {role: health figures}, filled in by the layer as it quantizes."""

    def record(self, role: str, x: torch.Tensor, q: NVFP4Tensor, *, replace: bool = True) -> None:
        """Store the health of ``q`` (the quantization of ``x``) as ``role``; keep an earlier one unless
        ``replace``."""
        if replace or role not in self:
            self[role] = health(x, q)


@contextlib.contextmanager
def collect_stats(model: nn.Module):
    """Within the block, every NVFP4Linear records the health of the tensors it quantizes.

    Yields a dict that fills in as forward and backward run: {layer name: {"input": {...},
    "weight": {...}, "grad": {...}}}; read it after the backward of the micro-batch.
    """
    results: dict[str, LayerStats] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and m.nvfp4_active]
    for name, layer in layers:
        layer.stats_sink = results.setdefault(name, LayerStats())
    try:
        yield results
    finally:
        for _, layer in layers:
            layer.stats_sink = None
