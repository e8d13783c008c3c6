"""launch/setup.sh decides when to install and what: the lock file, the extras asked for, the stamp.

The interpreter here is a stand-in script that records each call and succeeds, so the decisions are
checked in milliseconds; the real installs run in every `make train` / `make test` / CI run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "{log}"
case "$*" in
  "-m venv "*) mkdir -p "${{@: -1}}/bin" && cp "$0" "${{@: -1}}/bin/python" ;;
  *"print(torch.__version__)"*) echo 2.13.0+cpu ;;
esac
exit 0
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the files setup.sh reads, and a fake python3 that logs its arguments to calls.log."""
    for name in ("pyproject.toml", "requirements.lock", "launch/setup.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(log=tmp_path / "calls.log"))
    fake.chmod(0o755)
    return tmp_path


def setup(checkout: Path, **env: str) -> tuple[str, list[str]]:
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", "launch/setup.sh"], cwd=checkout, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(checkout / "fake-python"), "VENV": ".venv", **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.stdout, [c for c in calls if "pip install" in c]


def test_installs_with_the_lock_and_records_extras_in_the_stamp(checkout):
    out, pips = setup(checkout, EXTRAS="dev")
    assert "versions from requirements.lock" in out
    assert pips[-1].endswith("-c requirements.lock -e .[dev]"), pips
    assert "extras=dev" in (checkout / ".venv" / ".ds_fp4-installed").read_text()


def test_a_rerun_is_a_no_op_and_more_extras_install_the_union(checkout):
    setup(checkout, EXTRAS="dev")
    out, pips = setup(checkout, EXTRAS="dev")
    assert "up to date" in out and pips == []
    out, pips = setup(checkout, EXTRAS="dev,mpi")  # .ci/run after `make train` in the same clone
    assert pips and pips[-1].endswith("-e .[dev,mpi]"), pips
    out, pips = setup(checkout, EXTRAS="dev")  # asking for fewer keeps what is there
    assert "up to date (extras dev,mpi" in out and pips == []


def test_a_changed_lock_file_or_pyproject_reinstalls(checkout):
    setup(checkout)
    with open(checkout / "requirements.lock", "a") as f:
        f.write("six==1.16.0\n")
    _, pips = setup(checkout)
    assert pips, "a new lock file must reinstall"
    (checkout / "pyproject.toml").write_text((checkout / "pyproject.toml").read_text() + "\n")
    _, pips = setup(checkout)
    assert pips, "a changed pyproject.toml must reinstall"


def test_lock_none_installs_from_the_ranges_and_a_missing_lock_is_an_error(checkout):
    out, pips = setup(checkout, LOCK="none")
    assert "versions from the ranges in pyproject.toml" in out
    assert "-c requirements.lock" not in pips[-1]
    proc = subprocess.run(["bash", "launch/setup.sh"], cwd=checkout, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(checkout / "fake-python"), "LOCK": "missing.lock"})
    assert proc.returncode == 1 and "lock file missing.lock not found" in proc.stderr


def test_the_lock_pins_everything_but_torch_and_triton():
    from launch.lock import read_lock

    pins = read_lock(REPO / "requirements.lock")
    assert {"deepspeed", "transformers", "numpy", "pyarrow", "tokenizers", "pytest", "mpi4py", "psutil"} <= set(pins)
    assert not {"torch", "triton"} & {name.lower() for name in pins}
    assert all(version for version in pins.values())
