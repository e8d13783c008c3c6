"""How far a CPU run's loss curve moves with the instruction set, unpinned and pinned, measured in one run.

    python bench/cpu_numerics.py                       # the golden run (12 steps, 2 ranks) per environment
    python bench/cpu_numerics.py --wrapper "qemu-x86_64 -cpu Nehalem"   # ranks on an emulated SSE4.2 CPU

Every row runs tests/golden's 12-step NVFP4 config on 2 CPU ranks under one environment: first the
machine's own numerics, with ATen, MKL and oneDNN each pushed to the instruction sets this CPU can reach
(environment variables can only lower a library's level, never raise it), then the same pushes on top of
launch.cpu_numerics.PORTABLE_CPU_ENV. For each row it prints the largest |loss difference| to the first
row of its group and whether the curve equals tests/golden/nvfp4_losses.json bit for bit.

``--wrapper`` starts each rank under a command, e.g. qemu's user-mode emulator with an older CPU model,
to run the pinned environment on a CPU with another instruction set than this one. It writes
bench/results/cpu_numerics_<cpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

from tiny_runs import golden_config, steps  # noqa: E402

from launch.cpu_numerics import PORTABLE_CPU_ENV, cpu_model  # noqa: E402
from launch.distributed import free_port  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
PUSHES = {
    "as is": {},
    "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATen default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL SSE4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "MKL AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "oneDNN SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def golden_curve(cfg: Path, out: Path, env: dict[str, str], wrapper: list[str]) -> list[float]:
    port = str(free_port())
    procs = []
    for r in range(2):
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env,
                    "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}
        cmd = [*wrapper, sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed_config", str(cfg),
               "--set", f"trainer.out_dir={json.dumps(str(out))}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed under {env}:\n{logs[0][-3000:]}\n{logs[1][-3000:]}")
    return [steps(out)[s]["loss"] for s in range(1, 13)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wrapper", default="", help="command to start each rank under (e.g. qemu-x86_64 -cpu Nehalem)")
    p.add_argument("--pushes", nargs="*", default=list(PUSHES), choices=list(PUSHES))
    p.add_argument("--groups", nargs="*", default=["native", "pinned"], choices=["native", "pinned"])
    args = p.parse_args()
    wrapper = shlex.split(args.wrapper)
    from data_pipeline import prepare

    golden = json.loads((GOLDEN / "nvfp4_losses.json").read_text())["losses"]
    tmp = Path(tempfile.mkdtemp(prefix="cpu_numerics_"))
    prepare([str(GOLDEN / "corpus.jsonl")], tmp / "data", vocab_size=512, workers=0, progress=False)
    cfg = golden_config(tmp / "cfg.json", tmp / "data")
    rows = []
    print(f"{cpu_model()}{' under ' + args.wrapper if wrapper else ''}")
    print(f"{'group':7} {'environment':15} {'step 12 loss':>14} {'max |diff| to first':>20} {'= golden':>9} {'s':>5}")
    for group in args.groups:
        first = None
        for name in args.pushes:
            env = {**PUSHES[name], **(PORTABLE_CPU_ENV if group == "pinned" else {})}
            t = time.time()
            curve = golden_curve(cfg, tmp / f"run-{group}-{len(rows)}", env, wrapper)
            first = first or curve
            row = {"group": group, "push": name, "env": env, "losses": curve, "seconds": round(time.time() - t, 1),
                   "max_abs_diff_to_first": max(abs(a - b) for a, b in zip(curve, first, strict=True)),
                   "equals_golden": curve == golden}
            rows.append(row)
            print(f"{group:7} {name:15} {curve[-1]:14.9f} {row['max_abs_diff_to_first']:20.3g} "
                  f"{str(row['equals_golden']):>9} {row['seconds']:5.0f}", flush=True)
    date = datetime.date.today().isoformat()
    cpu = cpu_model()
    tag = "".join(c if c.isalnum() else "-" for c in cpu).strip("-").lower()
    if wrapper:
        tag += "_" + "".join(c if c.isalnum() else "-" for c in args.wrapper).strip("-").lower()
    out = REPO / "bench" / "results" / f"cpu_numerics_{tag}_{date}.json"
    out.write_text(json.dumps({"cpu": cpu, "wrapper": args.wrapper, "date": date, "golden": golden, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
