"""Helpers for the trainer tests: a small prepared corpus, run configs, and real rank processes.

Ranks are started the way srun starts tasks: one `python launch/train.py` process per rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment, so each rank's exit code is
observable (a launcher would fold them into one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_runs import DEMO, REPO, steps, write_config  # noqa: F401  (re-exported for the tests here)

from launch.distributed import free_port  # noqa: F401  (re-exported for the tests here)

TRAIN = REPO / "launch" / "train.py"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


class Ranks:
    """W rank processes of one run; each writes its output to out_dir/rank<r>.log."""

    def __init__(self, config: Path, world: int, overrides: list[str] = (), script: Path = TRAIN,
                 log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        port = str(free_port())
        self.logs = []
        self.procs = []
        log_dir = Path(log_dir or config.parent)
        for r in range(world):
            log = open(log_dir / f"rank{r}.{int(time.time() * 1000)}.log", "w")
            rank_env = child_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=port, **(env or {}))
            cmd = [sys.executable, str(script), "--deepspeed_config", str(config)]
            for o in overrides:
                cmd += ["--set", o]
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            self.logs.append(log)

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        for log in self.logs:
            log.close()
        return codes

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)
        for p in self.procs:
            p.wait()

    def output(self) -> str:
        return "\n".join(Path(log.name).read_text() for log in self.logs)


def run(config: Path, world: int, overrides: list[str] = (), expect: int | None = 0, timeout: float = 600,
        **kw) -> Ranks:
    ranks = Ranks(config, world, overrides, **kw)
    codes = ranks.wait(timeout)
    if expect is not None and any(c != expect for c in codes):
        raise AssertionError(f"exit codes {codes}, expected {expect}:\n{ranks.output()[-6000:]}")
    ranks.codes = codes
    return ranks


def wait_for(predicate, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
