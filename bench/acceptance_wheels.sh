#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has no network), for Python 3.12 on manylinux x86_64, at the
# versions of requirements.lock, into .whl/ (ignored by git; the device tool carries it: carry=[".whl"]).
# deepspeed ships only as a source archive: its pure-Python wheel is built here (its ops JIT-compile at
# run time). bench/gpu_acceptance.sh installs only those the machine does not have.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pin() { grep -i "^$1==" requirements.lock || { echo "acceptance_wheels: $1 is not in requirements.lock" >&2; exit 1; }; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin lightning)" "$(pin lightning-utilities)" "$(pin pytorch-lightning)" "$(pin torchmetrics)" \
    "$(pin fsspec)" "$(pin PyYAML)" "$(pin py-cpuinfo)" "$(pin msgpack)" "$(pin einops)"
ls -la .whl
du -sh .whl
