"""Plot the loss curves of several runs from their TensorBoard event files, plus the relative gap.

    python -m launch.plot runs/demo-cpu-bf16 runs/demo-cpu -o docs/demo-loss.png

The first run is the baseline: the lower panel shows (loss - baseline) / baseline for every other run,
on the steps both logged, smoothed with an exponential moving average (--smooth, 0 = raw).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_scalar(run_dir: str | Path, tag: str = "train/loss") -> tuple[list[int], list[float]]:
    """(steps, values) of ``tag`` from every event file under ``run_dir`` (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    dirs = sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")})
    if not dirs:
        raise ValueError(f"no TensorBoard event files under {run_dir}")
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                points[e.step] = e.value
    if not points:
        raise ValueError(f"{run_dir} has no '{tag}' scalars")
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def ema(values: list[float], alpha: float) -> list[float]:
    if not alpha:
        return list(values)
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot(runs: list[str], out: str, tag: str = "train/loss", smooth: float = 0.6,
         labels: list[str] | None = None) -> dict[str, float]:
    """Draw the figure; returns each run's final relative gap to the first run (smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in runs]
    curves = [read_scalar(r, tag) for r in runs]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    base = dict(zip(curves[0][0], ema(curves[0][1], smooth), strict=True))
    gaps = {}
    for label, (steps, values) in zip(labels, curves, strict=True):
        smoothed = ema(values, smooth)
        top.plot(steps, smoothed, label=label)
        common = [(s, v) for s, v in zip(steps, smoothed, strict=True) if s in base]
        if common:
            gap = [(v - base[s]) / base[s] * 100 for s, v in common]
            bottom.plot([s for s, _ in common], gap, label=label)
            gaps[label] = gap[-1]
    top.set_ylabel(tag + (f" (EMA {smooth})" if smooth else ""))
    top.legend()
    top.grid(alpha=0.3)
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel(f"gap to {labels[0]} (%)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return gaps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (out_dir of each run); the first is the baseline")
    p.add_argument("-o", "--out", required=True, help="output image, e.g. loss.png")
    p.add_argument("--tag", default="train/loss")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA factor in [0, 1); 0 plots raw values")
    p.add_argument("--labels", nargs="+", default=None)
    args = p.parse_args(argv)
    gaps = plot(args.runs, args.out, args.tag, args.smooth, args.labels)
    for label, gap in gaps.items():
        print(f"{label}: final relative gap {gap:+.2f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
