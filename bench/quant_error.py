"""Quantization error of the NVFP4 reference on Gaussian data: nearest vs stochastic, 1x16 vs 16x16, RHT.

    python bench/quant_error.py

Relative RMSE = ||q(x) - x|| / ||x|| over a 4096 x 4096 standard normal tensor (fixed seed), plus, for
stochastic rounding, the error of the mean of 16 independent draws (unbiased: it shrinks ~1/4) and the
projection of the error on x (the clamp bias of RNE scales; zero with scales rounded up).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_fp4 import hadamard, nvfp4  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    rows = []
    for tile in ((1, 16), (16, 16)):
        for rht in (False, True):
            ref = hadamard.rht(x) if rht else x
            for rounding in ("nearest", "stochastic"):
                for scale_rounding in (("nearest", "up") if rounding == "stochastic" else ("nearest",)):
                    draws = 16 if rounding == "stochastic" else 1
                    qs = (nvfp4.quantize(x, tile=tile, rounding=rounding, hadamard=rht, seed=s,
                                         scale_rounding=scale_rounding).dequantize() for s in range(draws))
                    first = next(qs)
                    acc = first.double()
                    for q in qs:
                        acc += q.double()
                    mean = acc / draws
                    bias = ((mean - ref.double()) * ref.double()).sum() / ref.double().pow(2).sum()
                    rows.append({"tile": "x".join(map(str, tile)), "rht": rht, "rounding": rounding,
                                 "scale_rounding": scale_rounding, "rel_rmse": rel(first, ref),
                                 "rel_rmse_mean_of_draws": rel(mean, ref), "draws": draws,
                                 "bias_along_x": bias.item()})
    print(f"{'tile':>6} {'rht':>5} {'rounding':>10} {'scales':>8} {'rel RMSE':>9} {'mean of N':>10} {'bias':>9}")
    for r in rows:
        print(f"{r['tile']:>6} {str(r['rht']):>5} {r['rounding']:>10} {r['scale_rounding']:>8} {r['rel_rmse']:>9.4f} "
              f"{r['rel_rmse_mean_of_draws']:>10.4f} {r['bias_along_x']:>+9.4f}")
    out = Path(__file__).parent / "results" / "quant_error_cpu.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
