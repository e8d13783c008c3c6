"""How much loss does NVFP4 give up? BF16 vs the paper recipe and its ablations, same config, seed, data.

    python bench/convergence.py --preset cpu                  # ~30 min on a 2-core CPU machine
    python bench/convergence.py --preset gpu --gpus 8         # the 125M model on one GPU node
    python bench/convergence.py --preset cpu --report-only    # redo table + plot from finished runs

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
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    "all_fp4": ["nvfp4.preset=\"all_fp4\""],
    "nvfp4_comm": ["nvfp4.preset=\"paper\"", "nvfp4.grad_comm=\"nvfp4\""],
}
MIN_RANKS = {"nvfp4_comm": 2}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: str, root: str, variant: str, extra: list[str]) -> list[str]:
    sets = [*VARIANTS[variant], f"trainer.out_dir=\"{root}/{variant}\"", *extra]
    return [sys.executable, "launch/train.py", "--deepspeed_config", config] + [a for s in sets for a in ("--set", s)]


def start(cmd: list[str], ranks: int, log: Path) -> list[subprocess.Popen]:
    """`ranks` processes of one run, started like srun tasks (RANK/WORLD_SIZE/... in the environment)."""
    port, procs = str(_port()), []
    log.parent.mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        out = open(log.with_suffix(f".rank{r}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def run_all(preset: dict, variants: list[str], extra: list[str], parallel: int, gpus: int | None) -> dict[str, float]:
    """Run every variant; returns wall seconds per variant."""
    if preset is PRESETS["gpu"]:
        ranks_of = {v: gpus or preset["ranks"] for v in variants}
    else:
        ranks_of = {v: max(preset["ranks"], MIN_RANKS.get(v, 1)) for v in variants}
    queue, running, seconds = list(variants), [], {}
    while queue or running:
        budget = parallel - sum(ranks_of[v] for v, _, _ in running)
        while queue and (ranks_of[queue[0]] <= budget or not running):
            v = queue.pop(0)
            cmd = command(preset["config"], preset["root"], v, extra)
            print(f"[{v}] {' '.join(shlex.quote(c) for c in cmd)}  (x{ranks_of[v]} ranks)", flush=True)
            if preset is PRESETS["gpu"]:
                cmd = ["deepspeed", f"--num_gpus={ranks_of[v]}", *cmd[1:]]
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


def _steps(run_dir: Path) -> list[tuple[int, float]]:
    rows = {}
    for line in (run_dir / "steps.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    return sorted((s, v) for s, v in rows.items() if v is not None)


def _ema(values: list[float], alpha: float = 0.9) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def report(preset_name: str, variants: list[str], out_dir: Path, seconds: dict[str, float], tail: int = 20) -> dict:
    from launch.plot import plot, read_scalar

    preset = PRESETS[preset_name]
    root = REPO / preset["root"]
    curves = {v: _steps(root / v) for v in variants if (root / v / "steps.jsonl").exists()}
    if "bf16" not in curves:
        raise SystemExit("the bf16 baseline has not run; it is the reference for every gap")
    base_steps = dict(zip([s for s, _ in curves["bf16"]], _ema([v for _, v in curves["bf16"]]), strict=True))
    results = {}
    for v, pts in curves.items():
        steps = [s for s, _ in pts]
        losses = [x for _, x in pts]
        final = sum(losses[-tail:]) / len(losses[-tail:])
        smooth = dict(zip(steps, _ema(losses), strict=True))
        gaps = {s: (smooth[s] - base_steps[s]) / base_steps[s] for s in steps if s in base_steps and s > 20}
        worst = max(gaps, key=gaps.get) if gaps else None
        try:
            eval_loss = read_scalar(root / v, "eval/loss")[1][-1]
        except ValueError:
            eval_loss = None
        results[v] = {"final_loss": final, "eval_loss": eval_loss, "steps": steps[-1],
                      "max_gap_step": worst, "max_gap": gaps.get(worst) if worst else None,
                      "wall_seconds": seconds.get(v)}
    base = results["bf16"]
    for r in results.values():
        r["gap_to_bf16"] = (r["final_loss"] - base["final_loss"]) / base["final_loss"]
        if r["eval_loss"] is not None and base["eval_loss"]:
            r["eval_gap_to_bf16"] = (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"| variant | final train loss (mean of last {tail} steps) | gap to BF16 | held-out loss | gap | "
             "largest gap (EMA) at step |", "|---|---:|---:|---:|---:|---:|"]
    for v in variants:
        if v not in results:
            continue
        r = results[v]
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        evg = f"{100 * r['eval_gap_to_bf16']:+.2f}%" if r.get("eval_gap_to_bf16") is not None else "-"
        worst = f"{100 * r['max_gap']:+.2f}% at {r['max_gap_step']}" if r["max_gap"] is not None else "-"
        lines.append(f"| {v} | {r['final_loss']:.4f} | {100 * r['gap_to_bf16']:+.2f}% | {ev} | {evg} | {worst} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps({"preset": preset_name, "config": preset["config"],
                                                      "results": results}, indent=1))
    present = [v for v in variants if v in results]
    plot([str(root / v) for v in present], str(out_dir / "loss.png"), smooth=0.9, labels=present)
    print(table)
    print(f"wrote {out_dir}/table.md, results.json, loss.png")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--parallel", type=int, default=2, help="ranks to run at once (CPU preset)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per run (GPU preset)")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--out", default=None, help="report directory (default docs/convergence/<preset>)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    seconds = {}
    if not args.report_only:
        if args.preset == "cpu":  # prepare the corpus once, not in two concurrent runs
            from data_pipeline import prepare_embedded_corpus
            from launch.config import parse_run_config

            emb = parse_run_config(REPO / preset["config"]).embedded
            prepare_embedded_corpus(REPO / emb.out_dir, vocab_size=emb.vocab_size, eval_fraction=emb.eval_fraction)
        seconds = run_all(preset, args.variants, args.set, args.parallel, args.gpus)
    report(args.preset, args.variants, Path(args.out or REPO / "docs" / "convergence" / args.preset), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
