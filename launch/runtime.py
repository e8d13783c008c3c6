"""The trainer's process-level helpers: preemption signals, per-step RNG seeds, and fp32 buffers.

Each is small and independent of the loop, and each acts on the process rather than on the run:
signals arrive at the process (and may arrive before the engine exists, so train.py installs the
handlers first, and this module imports no torch to keep that early); torch's RNG is global; the
buffers are restored into the module the engine holds, after DeepSpeed has cast them.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MASK64 = (1 << 64) - 1
_received: list[str] = []  # names of the preemption signals received so far


def _on_signal(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """SIGUSR1 / SIGTERM: checkpoint at the next step boundary and exit 75. Installed before anything
    slow starts (the process group, the data, the engine), so an early signal is not fatal."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def preemption_signal() -> str | None:
    """The name of the first preemption signal this process received, or None."""
    return _received[0] if _received else None


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank: a mix of the three, so that stochastic rounding and dropout
    depend only on where the run is, not on its history (a resumed run repeats the same draws)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def fp32_buffers(model: torch.nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of the non-persistent floating-point buffers (RoPE inverse frequencies): computed constants
    that no checkpoint stores. DeepSpeed's bf16 mode casts them with the module; Hugging Face's
    from_pretrained keeps them in fp32. Restoring them after ds_fp4.initialize makes the trainer's model
    compute exactly what the exported model computes (and keeps rotary angles precise)."""
    return {(m_name, b_name): buf.detach().float().clone()
            for m_name, mod in model.named_modules() for b_name, buf in mod._buffers.items()
            if buf is not None and buf.is_floating_point() and b_name in mod._non_persistent_buffers_set}


def restore_fp32_buffers(model: torch.nn.Module, saved: dict[tuple[str, str], torch.Tensor]) -> None:
    for (m_name, b_name), value in saved.items():
        mod = model.get_submodule(m_name)
        mod._buffers[b_name] = value.to(mod._buffers[b_name].device)
