"""The GPU acceptance run: every check a lent GPU should answer, in one call (bench/gpu_acceptance.sh).

Stages, each a subprocess with its own time limit, so that one hang cannot eat the device budget:

  selftest        python -m ds_fp4.selftest --json (cold, then warm)
  tests_kernels   pytest tests/kernels, compiled on the GPU (no interpreter)
  bench_kernels   bench/kernels.py: quantize vs copy bandwidth, GEMM vs bf16 matmul (ratios in one run)
  train_nvfp4     a 125M Llama (configs/llama-125m-zero1.json, cut to 200 steps of 32 x 1024 tokens)
  train_bf16      the same run with nvfp4.enabled false
  lightning_fit   Lightning's DeepSpeedStrategy Trainer.fit after ds_fp4.patch_deepspeed()

All stages share one budget (``--budget``, 480 s: the device tool allows one command 600 s). It writes
bench/results/gpu_acceptance_<device>_<date>.json after every stage, and copies it into $OUT when that is
set (the device tool's folder that comes back): per stage its exit code, seconds, figures
(the self-test's checks and times, the test counts, step time, tokens/s, MFU and final loss of both runs,
their ratio) and the output's tail. ``--dry-run`` rehearses every stage at toy size on the CPU (the
demo model for 5 steps, the interpreter's kernel tests on one file) and writes ..._dryrun_... instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RUNS = ROOT / "runs" / "gpu_acceptance"
# The 125M run, sized to take about a minute per precision on one H100/H200 (200 steps of 32 x 1024 tokens).
TRAIN_GPU = ["--deepspeed_config", "configs/llama-125m-zero1.json", "--set", "train_batch_size=32",
             "--set", "train_micro_batch_size_per_gpu=16", "--set", "data.seq_len=1024",
             "--set", "trainer.max_steps=200", "--set", "trainer.max_tokens=null", "--set", "trainer.warmup_steps=20",
             "--set", "trainer.save_interval=0", "--set", "trainer.eval_interval=0", "--set", "trainer.log_interval=10",
             "--set", "trainer.progress=false", "--set", "optimizer.params.torch_adam=true"]
TRAIN_DRY = ["--deepspeed_config", "configs/demo-cpu.json", "--set", "trainer.max_steps=5",
             "--set", "trainer.save_interval=0", "--set", "trainer.eval_interval=0", "--set", "trainer.log_interval=1",
             "--set", "trainer.progress=false"]


DEADLINE = [math.inf]  # time.monotonic() by which every stage must be over (--budget)


def run(name: str, cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    """Run one stage in its own process group; on its time limit (or the overall deadline) the whole group
    is killed, so that no training grandchild keeps the GPU for the next stage."""
    timeout = max(1, min(timeout, DEADLINE[0] - time.monotonic()))
    print(f"[gpu_acceptance] {name} (limit {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = "timeout"
    out = stdout + stderr
    seconds = time.perf_counter() - start
    print(f"[gpu_acceptance] {name}: rc={rc} in {seconds:.1f} s", flush=True)
    return {"rc": rc, "seconds": round(seconds, 1), "tail": out[-3000:], "output": out, "stdout": stdout}


def pytest_counts(out: str) -> dict:
    """{"passed": n, ...} from pytest's summary line (the output's last)."""
    last = out.splitlines()[-1] if out else ""
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):  # <job_name>/events...
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def train_figures(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run_dir)
    settled = lambda tag: statistics.median(scalars[tag][len(scalars[tag]) // 4:]) if scalars.get(tag) else None
    tokens_per_step = rows[-1]["tokens"] / rows[-1]["step"]
    tps = settled("train/tokens_per_s")
    return {"steps": rows[-1]["step"], "final_loss": rows[-1]["loss"], "tokens_per_step": tokens_per_step,
            "tokens_per_s": tps, "step_seconds": tokens_per_step / tps if tps else None, "mfu": settled("train/mfu")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage at toy size on the CPU")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all stages together (default 480)")
    parser.add_argument("--out", type=Path, help="the JSON (default bench/results/gpu_acceptance_<device>_<date>.json)")
    parser.add_argument("--runs", type=Path, default=RUNS, help=f"training runs go here (default {RUNS})")
    args = parser.parse_args()
    DEADLINE[0] = time.monotonic() + args.budget
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.cuda.get_device_name(0) if gpu else "cpu (dry run)"
    stages: dict[str, dict] = {}
    interpret = {} if gpu else {"TRITON_INTERPRET": "1"}
    now = dt.datetime.now(dt.timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    name = f"gpu_acceptance_{slug}{'_dryrun' if not gpu else ''}_{now:%Y-%m-%d}.json"
    out = args.out or ROOT / "bench" / "results" / name
    meta = {"device": device, "date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": sys.version.split()[0], "dry_run": not gpu, "budget_s": args.budget}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None

    def save() -> None:
        """Written after every stage, so that a kill keeps what finished; copied to $OUT (the device tool's
        folder that comes back) when it is set."""
        done = {name: {k: v for k, v in st.items() if k not in ("output", "stdout")} for name, st in stages.items()}
        out.write_text(json.dumps({**meta, "stages": done}, indent=1))
        if os.environ.get("OUT"):
            shutil.copy(out, os.environ["OUT"])

    try:
        import deepspeed  # noqa: F401  (the carried wheel and its dependencies import)

        meta["deepspeed"] = deepspeed.__version__
    except Exception as e:
        meta["deepspeed"] = f"does not import: {type(e).__name__}: {e}"
    save()

    s = run("selftest", [PY, "-m", "ds_fp4.selftest", "--json"] + ([] if gpu else ["--backend", "triton"]), 300,
            interpret)
    try:
        s["figures"] = json.loads(s["stdout"])
    except ValueError:
        s["figures"] = None
    stages["selftest"] = s
    save()

    kernel_tests = ["tests/kernels"] if gpu else ["tests/kernels/test_quantize.py", "-k", "bit_exact"]
    s = run("tests_kernels", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernel_tests], 300)
    s["figures"] = pytest_counts(s["output"].strip())
    stages["tests_kernels"] = s
    save()

    stages["bench_kernels"] = run("bench_kernels", [PY, "bench/kernels.py"] + ([] if gpu else ["--smoke", "--no-save"]),
                                  300, interpret)
    save()

    launcher = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "launch/train.py"]
    for precision in ("nvfp4", "bf16"):
        out_dir = args.runs / precision
        cmd = [*launcher, *(TRAIN_GPU if gpu else TRAIN_DRY), "--set", f"trainer.out_dir={json.dumps(str(out_dir))}"]
        if precision == "bf16":
            cmd += ["--set", "nvfp4.enabled=false", "--set", "nvfp4.grad_comm=\"none\""]
        s = run(f"train_{precision}", cmd, 420 if gpu else 600)
        try:
            s["figures"] = train_figures(out_dir)
        except Exception as e:  # no steps.jsonl, no tensorboard, ...: the stage's tail says why
            s["figures"] = {"error": f"{type(e).__name__}: {e}"}
        stages[f"train_{precision}"] = s
        save()
    fp4, bf16 = (stages[f"train_{p}"]["figures"] for p in ("nvfp4", "bf16"))
    if fp4.get("step_seconds") and bf16.get("step_seconds") and bf16.get("final_loss"):
        stages["train_nvfp4"]["figures"]["step_time_vs_bf16"] = fp4["step_seconds"] / bf16["step_seconds"]
        stages["train_nvfp4"]["figures"]["loss_vs_bf16"] = fp4["final_loss"] / bf16["final_loss"]

    s = run("lightning_fit", [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                              "tests/integrations/test_frameworks.py", "-k", "lightning_trainer_fit"], 300)
    s["figures"] = pytest_counts(s["output"].strip())
    stages["lightning_fit"] = s
    save()
    failed = [name for name, st in stages.items() if st["rc"] != 0]
    print(f"[gpu_acceptance] wrote {out}; failed stages: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
