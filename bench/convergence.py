"""How much loss does NVFP4 give up? BF16 vs the paper recipe and its ablations, same config, seed, data.

    python bench/convergence.py --preset cpu                  # ~30 min on a 2-core CPU machine
    python bench/convergence.py --preset gpu --gpus 8         # the 125M model on one GPU node
    python bench/convergence.py --preset cpu --report-only    # redo table + plot from finished runs
    python bench/convergence.py --preset cpu --variants nvfp4 no_sr --seeds 1 2   # more stochastic-rounding draws

Variants (the paper's ablations, §4-5):
    bf16        nothing converted: the baseline
    nvfp4       the paper recipe: 2D weights, SR gradients, RHT on Wgrad, first/last block in BF16
    no_sr       gradients rounded to nearest
    no_rht      no random Hadamard transform
    no_2d       1x16 weight blocks (W and W^T quantize differently)
    all_fp4     every eligible linear layer in NVFP4 (no BF16 blocks)
    nvfp4_comm  the paper recipe, plus NVFP4 gradient communication (2 ranks)

Each variant is launch/train.py on the preset's config with `--set` overrides, so a run is reproducible
with the command printed next to it. Single-rank variants run `--parallel` at a time (CPU preset:
two 1-thread ranks on two cores); nvfp4_comm runs on 2 ranks (the global batch is the same, so it
sees the same data). The report goes to docs/convergence/: results.json, table.md, loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.config import parse_run_config  # noqa: E402
from launch.distributed import free_port  # noqa: E402

PRESETS = {
    "cpu": {"config": "configs/convergence-cpu.json", "root": "runs/convergence-cpu", "ranks": 1},
    "gpu": {"config": "configs/convergence-gpu-125m.json", "root": "runs/convergence-gpu", "ranks": 8},
}
VARIANTS = {
    "bf16": ["nvfp4.enabled=false", "nvfp4.grad_comm=\"none\""],
    "nvfp4": ["nvfp4.preset=\"paper\""],
    "no_sr": ["nvfp4.preset=\"no_sr\""],
    "no_rht": ["nvfp4.preset=\"no_rht\""],
    "no_2d": ["nvfp4.preset=\"no_2d\""],
    # explicit, because the config's own keep_first/last_blocks override a preset's
    "all_fp4": ["nvfp4.preset=\"paper\"", "nvfp4.keep_first_blocks=0", "nvfp4.keep_last_blocks=0"],
    "nvfp4_comm": ["nvfp4.preset=\"paper\"", "nvfp4.grad_comm=\"nvfp4\""],
}
MIN_RANKS = {"nvfp4_comm": 2}
DETERMINISTIC = {"bf16", "no_sr"}


def run_name(variant: str, seed: int) -> str:
    """Runs of one variant differ only in trainer.seed (the stochastic-rounding draws): nvfp4@seed1, ..."""
    return variant if seed == 0 else f"{variant}@seed{seed}"


def run_names(variants: list[str], seeds: list[int]) -> list[str]:
    # bf16 and no_sr have no stochastic part (no dropout, no stochastic rounding; the Hadamard signs are
    # fixed): another seed repeats the same run bit for bit (checked: no_sr@seed1 == no_sr).
    return [run_name(v, s) for s in seeds for v in variants if not (s and v in DETERMINISTIC)]


def base_of(name: str) -> str:
    return name.partition("@")[0]


def command(config: str, root: str, name: str, extra: list[str]) -> list[str]:
    variant, _, tag = name.partition("@")
    seed = [f"trainer.seed={tag.removeprefix('seed')}"] if tag else []
    sets = [*VARIANTS[variant], *seed, f"trainer.out_dir=\"{root}/{name}\"", *extra]
    return [sys.executable, "launch/train.py", "--deepspeed_config", config] + [a for s in sets for a in ("--set", s)]


def start(cmd: list[str], ranks: int, log: Path) -> list[subprocess.Popen]:
    """`ranks` processes of one run, started like srun tasks (RANK/WORLD_SIZE/... in the environment)."""
    port, procs = str(free_port()), []
    log.parent.mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        out = open(log.with_suffix(f".rank{r}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def plan(preset: dict, variants: list[str], extra: list[str], gpus: int | None) -> tuple[list[str], dict[str, int]]:
    """(the runs still to do, ranks of each run). A finished run is left out (it would only start up to
    say "nothing to do"); so is nvfp4_comm on a single GPU, where there is nothing to communicate."""
    on_gpu = preset is PRESETS["gpu"]
    ranks_of = {v: (gpus or preset["ranks"]) if on_gpu else max(preset["ranks"], MIN_RANKS.get(base_of(v), 1))
                for v in variants}
    steps = parse_run_config(REPO / preset["config"], extra).total_steps()
    done = [v for v in variants if _last_step(REPO / preset["root"] / v) >= steps]
    if done:
        print(f"already finished ({steps} steps): {' '.join(done)}", flush=True)
    alone = [v for v in variants if ranks_of[v] < MIN_RANKS.get(base_of(v), 1)]
    if alone:
        print(f"skipped (needs {MIN_RANKS['nvfp4_comm']} ranks, got {gpus}): {' '.join(alone)}", flush=True)
    return [v for v in variants if v not in done and v not in alone], ranks_of


def run_all(preset: dict, variants: list[str], extra: list[str], parallel: int, gpus: int | None) -> dict[str, float]:
    """Run every variant; returns wall seconds per variant. GPU runs go one at a time (each takes every
    GPU it is given); CPU runs share `parallel` cores."""
    todo, ranks_of = plan(preset, variants, extra, gpus)
    if preset is PRESETS["gpu"]:
        parallel = 0  # with `or not running` below: exactly one run at a time
    queue, running, seconds = todo, [], {}
    while queue or running:
        budget = parallel - sum(ranks_of[v] for v, _, _ in running)
        while queue and (ranks_of[queue[0]] <= budget or not running):
            v = queue.pop(0)
            cmd = command(preset["config"], preset["root"], v, extra)
            print(f"[{v}] {' '.join(shlex.quote(c) for c in cmd)}  (x{ranks_of[v]} ranks)", flush=True)
            if preset is PRESETS["gpu"]:
                cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={ranks_of[v]}",
                       f"--master_port={free_port()}", *cmd[1:]]
                procs = [subprocess.Popen(cmd, cwd=REPO)]
            else:
                procs = start(cmd, ranks_of[v], REPO / preset["root"] / "logs" / v)
            running.append((v, procs, time.time()))
            budget -= ranks_of[v]
        time.sleep(2)
        for item in list(running):
            v, procs, t0 = item
            if all(p.poll() is not None for p in procs):
                running.remove(item)
                codes = [p.returncode for p in procs]
                seconds[v] = time.time() - t0
                print(f"[{v}] finished in {seconds[v]:.0f} s, exit codes {codes}", flush=True)
                if any(codes):
                    raise SystemExit(f"variant {v} failed; see {preset['root']}/logs/{v}.rank*.log")
    return seconds


def _losses(run_dir: Path) -> dict[int, float | None]:
    """step -> loss from steps.jsonl (None for a skipped step; a step logged twice keeps the last)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}


def _last_step(run_dir: Path) -> int:
    return max(_losses(run_dir), default=0) if (run_dir / "steps.jsonl").is_file() else 0


def _steps(run_dir: Path) -> list[tuple[int, float]]:
    return sorted((s, v) for s, v in _losses(run_dir).items() if v is not None)


def _train_seconds(run_dir: Path) -> float | None:
    """Training time summed over the logged intervals (tokens / tokens-per-second), so the gap of a run
    that was stopped and resumed, and the start-up, do not count."""
    from launch.plot import read_scalar

    try:
        steps, tokens = read_scalar(run_dir, "train/tokens")
        rate = dict(zip(*read_scalar(run_dir, "train/tokens_per_s"), strict=True))
    except ValueError:
        return None
    total, prev = 0.0, 0.0
    for s, t in zip(steps, tokens, strict=True):
        if rate.get(s):
            total += (t - prev) / rate[s]
        prev = t
    return total


def report(preset_name: str, variants: list[str], out_dir: Path, seconds: dict[str, float], tail: int = 20) -> dict:
    """Table, results.json and loss.png over every finished run of ``variants`` (all seeds found)."""
    from launch.plot import ema, plot, read_scalar

    preset = PRESETS[preset_name]
    root = REPO / preset["root"]
    names = sorted((d.name for d in root.iterdir() if (d / "steps.jsonl").exists() and base_of(d.name) in variants),
                   key=lambda n: (variants.index(base_of(n)), n)) if root.is_dir() else []
    if "bf16" not in names:
        raise SystemExit("the bf16 baseline has not run; it is the reference for every gap")
    curves = {n: _steps(root / n) for n in names}
    horizon = curves["bf16"][-1][0]
    for n in [n for n in names if curves[n][-1][0] < horizon]:
        print(f"leaving out {n}: unfinished (step {curves[n][-1][0]} of {horizon}); run it again to finish it")
        names.remove(n)
        del curves[n]
    base_curve = dict(zip([s for s, _ in curves["bf16"]], ema([v for _, v in curves["bf16"]], 0.9), strict=True))
    runs = {}
    for n, pts in curves.items():
        steps = [s for s, _ in pts]
        losses = [x for _, x in pts]
        smooth = dict(zip(steps, ema(losses, 0.9), strict=True))
        gaps = {s: (smooth[s] - base_curve[s]) / base_curve[s] for s in steps if s in base_curve and s > 20}
        worst = max(gaps, key=gaps.get) if gaps else None
        try:
            eval_loss = read_scalar(root / n, "eval/loss")[1][-1]
        except ValueError:
            eval_loss = None
        runs[n] = {"final_loss": sum(losses[-tail:]) / len(losses[-tail:]), "eval_loss": eval_loss,
                   "steps": steps[-1], "max_gap_step": worst, "max_gap": gaps.get(worst) if worst else None,
                   "wall_seconds": seconds.get(n), "train_seconds": _train_seconds(root / n)}
    ref, ref_eval = runs["bf16"]["final_loss"], runs["bf16"]["eval_loss"]
    results = {}
    for v in [v for v in variants if any(base_of(n) == v for n in runs)]:
        mine = [runs[n] for n in names if base_of(n) == v]
        finals = [r["final_loss"] for r in mine]
        evals = [r["eval_loss"] for r in mine if r["eval_loss"] is not None]
        mean = sum(finals) / len(finals)
        results[v] = {
            "runs": {n: runs[n] for n in names if base_of(n) == v},
            "seeds": len(finals), "final_loss": mean, "final_loss_min": min(finals), "final_loss_max": max(finals),
            "gap_to_bf16": (mean - ref) / ref,
            "gap_range": [(min(finals) - ref) / ref, (max(finals) - ref) / ref],
            "eval_loss": sum(evals) / len(evals) if evals else None,
            "eval_gap_to_bf16": ((sum(evals) / len(evals)) - ref_eval) / ref_eval if evals and ref_eval else None,
            "max_gap": mine[0]["max_gap"], "max_gap_step": mine[0]["max_gap_step"],
            "train_seconds": [r["train_seconds"] for r in mine],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"| variant | runs | final train loss (mean of last {tail} steps) | gap to BF16 (range over runs) | "
             "held-out loss | gap | largest gap (EMA, first run) | train time per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in results.items():
        spread = (f" ({100 * r['gap_range'][0]:+.2f}% .. {100 * r['gap_range'][1]:+.2f}%)" if r["seeds"] > 1 else "")
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        evg = f"{100 * r['eval_gap_to_bf16']:+.2f}%" if r["eval_gap_to_bf16"] is not None else "-"
        worst = f"{100 * r['max_gap']:+.2f}% at step {r['max_gap_step']}" if r["max_gap"] is not None else "-"
        secs = [x for x in r["train_seconds"] if x is not None]
        took = f"{sum(secs) / len(secs) / 60:.1f} min" if secs else "-"
        lines.append(f"| {v} | {r['seeds']} | {r['final_loss']:.4f} | {100 * r['gap_to_bf16']:+.2f}%{spread} "
                     f"| {ev} | {evg} | {worst} | {took} |")
    table = "\n".join(lines) + "\n"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    table += (f"\nProduced by `python bench/convergence.py --preset {preset_name}`; report written at commit "
              f"{commit.stdout.strip() or 'unknown'}. Each run, from the repository root:\n\n```bash\n")
    for n in names:
        cmd = command(preset["config"], preset["root"], n, [])
        ranks = max(preset["ranks"], MIN_RANKS.get(base_of(n), 1)) if preset_name == "cpu" else None
        launch = [".venv/bin/python"] if ranks == 1 else [".venv/bin/deepspeed", f"--num_gpus={ranks or 'N'}"]
        table += " ".join(shlex.quote(c) for c in [*launch, *cmd[1:]]) + "\n"
    table += "```\n"
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps({"preset": preset_name, "config": preset["config"],
                                                      "results": results}, indent=1))
    first_runs = [v for v in results]  # seed 0 of each variant: the curves in the plot
    plot([str(root / v) for v in first_runs], str(out_dir / "loss.png"), smooth=0.9, labels=first_runs)
    print(table)
    print(f"wrote {out_dir}/table.md, results.json, loss.png")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="trainer.seed values: repeats of each stochastic variant, to measure the noise")
    p.add_argument("--parallel", type=int, default=2, help="ranks to run at once (CPU preset)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per run (GPU preset)")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--out", default=None, help="report directory (default docs/convergence/<preset>)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    seconds = {}
    if not args.report_only:
        emb = parse_run_config(REPO / preset["config"], args.set).embedded
        if emb is not None:  # prepare the corpus once, not in concurrent runs
            from data_pipeline import prepare_embedded_corpus

            prepare_embedded_corpus(REPO / emb.out_dir, vocab_size=emb.vocab_size, eval_fraction=emb.eval_fraction,
                                    max_files=emb.max_files)
        seconds = run_all(preset, run_names(args.variants, args.seeds), args.set, args.parallel, args.gpus)
    out = Path(args.out or REPO / "docs" / "convergence" / args.preset)
    report(args.preset, list(VARIANTS), out, seconds)  # every finished run, not only this call's
    return 0


if __name__ == "__main__":
    sys.exit(main())
