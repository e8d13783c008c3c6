"""The lock file: the exact versions the test suite passed with, and what drifted since.

    python launch/lock.py write .venv-lock requirements.lock    # freeze a venv built from pyproject's ranges
    python launch/lock.py drift .venv-latest requirements.lock  # what the newest allowed versions change

launch/setup.sh installs with ``-c requirements.lock``: the README's commands and CI get these versions,
whatever pip would resolve today. torch and triton are left out on purpose: setup.sh installs the CPU
builds itself (TORCH_SPEC, TRITON_SPEC), and a GPU node keeps the CUDA torch it has and the triton that
came with it. Adopting newer versions is a deliberate step: ``make lock``, then the whole suite, then a
commit that says what moved.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

# Never locked: the torch stack (per machine: CPU build here, CUDA build on a GPU node), pip itself, and
# our own editable install.
UNLOCKED = re.compile(r"^(torch|triton|nvidia-.*|pip|ds[-_]fp4)$", re.I)


def frozen(venv: Path) -> dict[str, str]:
    """{distribution name: version} of everything installed in ``venv`` (pip's canonical names)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all", "--exclude-editable",
                          "--disable-pip-version-check"], check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and not UNLOCKED.match(name):
            pins[name] = version
    return pins


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def write(venv: Path, path: Path) -> None:
    pins = frozen(venv)
    py = subprocess.run([str(venv / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
                        check=True, capture_output=True, text=True).stdout.strip()
    head = (f"# Exact versions of everything ds_fp4 installs besides torch and triton (launch/lock.py).\n"
            f"# Resolved from pyproject.toml's ranges on {datetime.date.today()} with Python {py} on "
            f"{platform.machine()}; used by launch/setup.sh as pip constraints.\n")
    lines = [f"{name}=={pins[name]}\n" for name in sorted(pins, key=str.lower)]
    path.write_text(head + "".join(lines))
    print(f"wrote {path}: {len(pins)} packages")


def drift(venv: Path, path: Path) -> int:
    """Print what differs between the venv and the lock; returns the number of differences."""
    now, locked = frozen(venv), read_lock(path)
    changes = []
    for name in sorted(set(now) | set(locked), key=str.lower):
        if now.get(name) != locked.get(name):
            changes.append(f"  {name:28} {locked.get(name, '-'):>14} -> {now.get(name, '-')}")
    print(f"drift of {venv} against {path}: {len(changes)} package(s)" + (":" if changes else ""))
    print("\n".join(changes))
    return len(changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["write", "drift"])
    p.add_argument("venv", type=Path)
    p.add_argument("lock", type=Path)
    args = p.parse_args(argv)
    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"{args.venv} is not a virtual environment (no bin/python); create it with launch/setup.sh")
    if args.command == "write":
        write(args.venv, args.lock)
    else:
        drift(args.venv, args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
