"""bench/gpu_acceptance.sh --dry-run: the GPU acceptance run rehearsed end to end on the CPU.

Every stage a lent GPU will run (self-test, kernel tests, kernel bench, NVFP4 and BF16 training through
the DeepSpeed launcher, Lightning's fit) runs here at toy size through the same shell entry point, so a
broken stage is found here and not in the few minutes a GPU is lent for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"selftest", "tests_kernels", "bench_kernels", "train_nvfp4", "train_bf16", "lightning_fit"}


def test_the_dry_run_rehearses_every_stage_and_writes_its_figures(tmp_path):
    out = tmp_path / "acceptance.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--dry-run", "--out", str(out),
                           "--runs", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["device"] == "cpu (dry run)"
    assert set(doc["stages"]) == STAGES
    for name, stage in doc["stages"].items():
        assert stage["rc"] == 0, (name, stage["tail"])
    assert doc["stages"]["selftest"]["figures"]["ok"] is True
    assert doc["stages"]["tests_kernels"]["figures"].get("passed", 0) > 0
    assert not doc["stages"]["tests_kernels"]["figures"].get("failed")
    for precision in ("nvfp4", "bf16"):
        figures = doc["stages"][f"train_{precision}"]["figures"]
        assert figures["steps"] > 0 and math.isfinite(figures["final_loss"]), figures
        assert figures["tokens_per_s"] > 0
    assert 0.5 < doc["stages"]["train_nvfp4"]["figures"]["loss_vs_bf16"] < 2.0
