"""The README's first command, `make train`, as CI can afford it: the very launcher, script and config,
with 3 steps and a 300-file slice of the standard library for the embedded corpus."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from .conftest import REPO, child_env, free_port, steps

pytestmark = pytest.mark.slow  # real multi-rank training runs

COMMAND = "launch/train.py --deepspeed_config configs/demo-cpu.json"


def test_the_readme_main_job_is_make_train_running_the_demo_config():
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert first[0].startswith("make train") and first[1].startswith("make test")
    dry = subprocess.run(["make", "-n", "train"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"/bin/deepspeed --num_gpus 2 {COMMAND}" in dry, dry


def test_the_main_job_prepares_the_embedded_corpus_and_trains_under_the_deepspeed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           *COMMAND.split(),
           "--set", f'trainer.out_dir="{tmp_path / "run"}"', "--set", "trainer.max_steps=3",
           "--set", f'data.embedded.out_dir="{tmp_path / "data"}"', "--set", "data.embedded.max_files=300"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "done: 3 steps" in proc.stdout
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert (tmp_path / "data" / "tokenizer.json").is_file()
    rows = steps(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows.values())
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"
