"""ds_fp4.selftest: check, on the device and backend a run will use, that NVFP4 computes what it should.

A kernel that is wrong on one architecture fails silently: Transformer Engine shipped a stochastic-rounding
path that returned all-zero data on sm_120, and runs trained on zeroed gradients without an error (TE
#3281). So before training, on the run's own device and backend:

  quantize       fixed canary tensors (ties, zero blocks, tiny and huge values, mixed ranges, 16x16 tiles
                 of W and W^T, the RHT) quantize bit for bit as the torch reference does on the CPU
  stochastic     stochastic rounding gives non-zero codes, the reference's bits for the same seed, the
                 same bits again for the same seed, and an unbiased mean (|z| < 5)
  linear         one NVFP4Linear forward and backward agrees with the torch backend on the CPU (SQNR of
                 the output and both gradients >= 40 dB) and with the unquantized layer as NVFP4 does
                 (>= 8 dB; NVFP4's own error is about 15-20 dB)

With the torch backend on the CPU the reference checks compare the reference with itself; the other
checks (non-zero, unbiased, NVFP4-sized error) still run. ``ds_fp4.initialize`` runs it once per process
and device (``nvfp4.selftest``, on by default) and refuses to train when it fails.

    python -m ds_fp4.selftest [--device cuda:0] [--backend auto|torch|triton] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import nvfp4
from .linear import NVFP4Linear
from .recipe import NVFP4Recipe

SEED = 20251001
LINEAR_MATCH_DB = 40.0  # against the torch backend: the same quantized operands, another summation order
LINEAR_NVFP4_DB = 8.0  # against the unquantized layer: NVFP4's error, not garbage
Z_LIMIT = 5.0

_cache: dict[tuple[str, str], SelfTestResult] = {}


@dataclass
class SelfTestResult:
    ok: bool
    device: str
    backend: str
    """The backend the checks ran with, resolved ("torch" or "triton")."""
    seconds: float
    reason: str = ""
    """Empty when ok; else the first failed check's reason."""
    checks: dict[str, dict] = field(default_factory=dict)
    """{check: {"ok": bool, "reason": str, figures...}}."""

    def __str__(self) -> str:
        head = (f"ds_fp4 self-test {'passed' if self.ok else 'FAILED'} on {self.device} with the {self.backend} "
                f"backend in {self.seconds:.2f} s")
        rows = [f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['reason']}" for name, c in self.checks.items()]
        return "\n".join([head, *rows])

    def to_dict(self) -> dict:
        return asdict(self)


def _same_bits(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> str | None:
    """None if a and b are the same bits (codes, scales, amax), else what differs."""
    for name in ("data", "scale", "amax"):
        x, y = getattr(a, name).cpu(), getattr(b, name).cpu()
        if x.shape != y.shape:
            return f"{name} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        xb, yb = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        if not torch.equal(xb, yb):
            return f"{name}: {(xb != yb).sum().item()} of {xb.numel()} bytes differ"
    return None


def canaries() -> dict[str, torch.Tensor]:
    """The fixed inputs (fp32, on the CPU): each a hard case for some step of the quantizer."""
    g = torch.Generator().manual_seed(SEED)
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # E2M1 midpoints, and the top code
    ties = torch.cat([grid, -grid]).repeat(32, 2)  # [32, 32]: every tie, both signs, amax 6
    mixed = torch.randn(32, 64, generator=g)
    mixed[::4] *= 1e-6  # blocks far below the tensor's amax: scales near E4M3's bottom
    mixed[1::4] *= 1e3
    zeros = torch.randn(32, 64, generator=g)
    zeros[:, 16:32] = 0  # whole zero blocks
    zeros[5] = 0
    return {
        "ties": ties,
        "normal": torch.randn(64, 128, generator=g),
        "mixed_range": mixed,
        "zero_blocks": zeros,
        "tiny": torch.randn(16, 32, generator=g) * 1e-30,
        "huge": torch.randn(16, 32, generator=g) * 1e30,
        "heavy_tail": torch.randn(32, 64, generator=g).pow(5),
    }


def _check_quantize(device: torch.device, backend: str) -> dict:
    cases = 0
    for name, x in canaries().items():
        for label, kwargs in (("1x16", {}), ("1x16+rht", {"hadamard": True}), ("16x16", {"tile": (16, 16)})):
            expected = nvfp4.quantize(x, backend="torch", **kwargs)
            got = nvfp4.quantize(x.to(device), backend=backend, **kwargs)
            diff = _same_bits(got, expected)
            if diff:
                return {"ok": False, "reason": f"{name} ({label}) differs from the torch reference: {diff}"}
            cases += 1
        w, wt = nvfp4.quantize_weight(x.to(device), backend=backend)
        ew, ewt = nvfp4.quantize_weight(x, backend="torch")
        diff = _same_bits(w, ew) or _same_bits(wt, ewt)
        if diff:
            return {"ok": False, "reason": f"{name} (16x16 weight and W^T) differs from the reference: {diff}"}
        cases += 1
    return {"ok": True, "reason": f"{cases} canary quantizations bit-exact with the torch reference", "cases": cases}


def _check_stochastic(device: torch.device, backend: str) -> dict:
    g = torch.Generator().manual_seed(SEED + 1)
    x = (torch.rand(128, 256, generator=g) * 0.9 + 0.05) * torch.where(torch.rand(128, 256, generator=g) < 0.5, -1, 1)
    x[:, :16] = 6.0  # every row's first block sets a scale under which the rest fall between E2M1 codes
    q = nvfp4.quantize(x.to(device), rounding="stochastic", seed=SEED, backend=backend)
    codes = q.data.cpu()
    nonzero = torch.cat([(codes & 0xF) != 0, (codes >> 4) != 0]).float().mean().item()  # per 4-bit code
    if nonzero < 0.5:
        return {"ok": False, "nonzero_fraction": nonzero,
                "reason": f"stochastic rounding returned mostly zero codes ({100 * nonzero:.1f}% non-zero): the "
                          "kernel's output is wrong (as TE #3281 on sm_120); training on it would zero gradients"}
    again = nvfp4.quantize(x.to(device), rounding="stochastic", seed=SEED, backend=backend)
    if _same_bits(q, again):
        return {"ok": False, "reason": "the same seed gave different stochastic-rounding bits"}
    diff = _same_bits(q, nvfp4.quantize(x, rounding="stochastic", seed=SEED, backend="torch"))
    if diff:
        return {"ok": False, "reason": f"stochastic rounding differs from the reference's Philox stream: {diff}"}
    err = (q.dequantize().cpu().double() - x.double())[:, 16:]
    z = (err.sum() / err.pow(2).sum().sqrt()).item()
    if not abs(z) < Z_LIMIT:
        return {"ok": False, "z": z, "reason": f"stochastic rounding is biased: z = {z:.2f} over {err.numel()} values"}
    return {"ok": True, "z": z, "nonzero_fraction": nonzero,
            "reason": f"non-zero ({100 * nonzero:.0f}% of codes), reference bits, repeatable, unbiased (z = {z:.2f})"}


def _sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().cpu().double(), got.detach().cpu().double()
    noise = (ref - got).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _linear_run(device: torch.device, backend: str | None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(SEED + 2)
    dense = torch.nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 128, generator=g) / 11)
        dense.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(48, 128, generator=g)
    dy = torch.randn(48, 64, generator=g)
    layer = dense if backend is None else NVFP4Linear.from_float(dense, NVFP4Recipe(backend=backend))
    layer = layer.to(device)
    x = x.to(device).requires_grad_()
    torch.manual_seed(SEED)  # the stochastic-rounding seeds of the backward
    y = layer(x)
    y.backward(dy.to(device))
    return y, x.grad, layer.weight.grad


def _check_linear(device: torch.device, backend: str) -> dict:
    got = _linear_run(device, backend)
    reference = _linear_run(torch.device("cpu"), "torch")
    exact = _linear_run(torch.device("cpu"), None)
    names = ("output", "grad_input", "grad_weight")
    match = {n: _sqnr_db(r, g) for n, r, g in zip(names, reference, got, strict=True)}
    vs_exact = {n: _sqnr_db(e, g) for n, e, g in zip(names, exact, got, strict=True)}
    figures = {"sqnr_vs_reference_db": match, "sqnr_vs_unquantized_db": vs_exact}
    bad = [n for n in names if not match[n] >= LINEAR_MATCH_DB]
    if bad:
        return {"ok": False, **figures, "reason": f"NVFP4Linear {', '.join(bad)} differ from the torch backend: SQNR "
                f"{', '.join(f'{match[n]:.1f}' for n in bad)} dB < {LINEAR_MATCH_DB:.0f} dB"}
    bad = [n for n in names if not vs_exact[n] >= LINEAR_NVFP4_DB]
    if bad:
        return {"ok": False, **figures, "reason": f"NVFP4Linear {', '.join(bad)} are far from the unquantized layer: "
                f"SQNR {', '.join(f'{vs_exact[n]:.1f}' for n in bad)} dB < {LINEAR_NVFP4_DB:.0f} dB"}
    low = min(match.values())
    return {"ok": True, **figures, "reason": f"forward and backward match the torch backend (>= "
            f"{'inf' if math.isinf(low) else f'{low:.0f}'} dB) and the unquantized layer as NVFP4 does "
            f"({min(vs_exact.values()):.1f}-{max(vs_exact.values()):.1f} dB)"}


CHECKS = {"quantize": _check_quantize, "stochastic": _check_stochastic, "linear": _check_linear}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def selftest(device: torch.device | str | None = None, backend: str = "auto", *,
             cached: bool = False) -> SelfTestResult:
    """Run every check on ``device`` (default: the current CUDA device, else the CPU) with ``backend``.

    Returns a :class:`SelfTestResult`; ``cached=True`` returns this process's earlier passing result
    for the same device and backend (what ds_fp4.initialize uses). Torch's random state is left as it was.
    """
    device = torch.device(device) if device is not None else default_device()
    resolved = nvfp4.resolve_backend(backend, device)
    key = (str(device), resolved)
    if cached and key in _cache:
        return _cache[key]
    start = time.perf_counter()
    checks = {}
    # The checks seed torch's generators (the linear check's rounding seeds); the caller's state is kept.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name, check in CHECKS.items():
            try:
                checks[name] = check(device, resolved)
            except Exception as e:  # a crashing kernel is a failed check, with what it raised
                checks[name] = {"ok": False, "reason": f"raised {type(e).__name__}: {e}"}
    failed = [f"{name}: {c['reason']}" for name, c in checks.items() if not c["ok"]]
    result = SelfTestResult(ok=not failed, device=str(device), backend=resolved,
                            seconds=time.perf_counter() - start, reason=failed[0] if failed else "", checks=checks)
    if cached and result.ok:  # a failure is not kept: the next run checks again
        _cache[key] = result
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_fp4.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: the current CUDA device, else cpu")
    parser.add_argument("--backend", default="auto", choices=nvfp4.BACKENDS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = selftest(args.device, args.backend)
    warm = selftest(args.device, args.backend)  # kernels compiled (or cached) by the first run
    print(json.dumps({**result.to_dict(), "warm_seconds": warm.seconds}, indent=1) if args.json
          else f"{result}\n  (warm re-run: {warm.seconds:.2f} s)")
    return 0 if result.ok and warm.ok else 1


if __name__ == "__main__":
    sys.exit(main())
