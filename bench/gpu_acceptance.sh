#!/usr/bin/env bash
# The GPU acceptance run, in one call on a lent GPU machine (no network): bench/gpu_acceptance.py's stages.
#
#   bash bench/acceptance_wheels.sh        # here, with network: the wheels the GPU machine lacks, into .whl/
#   (device tool) run command="bash bench/gpu_acceptance.sh" carry=[".whl"] timeout_s=560
#                 the JSON comes back through $OUT; the stages share a 480 s budget (--budget)
#   bash bench/gpu_acceptance.sh --dry-run # any machine: every stage at toy size on the CPU
#
# The GPU machine's Python has torch, triton, numpy, pyarrow, transformers, ... but no deepspeed, no
# lightning. A venv that sees the system packages gets the carried wheels of whatever does not import
# there, without dependencies and without the network; then the stages run with the repository on
# PYTHONPATH. It writes bench/results/gpu_acceptance_<device>_<date>.json (figures per stage).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python  # the README's venv (make setup), where the dry run is rehearsed
fi
if [ "${1:-}" != "--dry-run" ] && [ -d .whl ]; then
    VENV=${ACCEPTANCE_VENV:-/tmp/ds_fp4-acceptance}
    "$PY" -m venv --system-site-packages "$VENV" || exit 1
    for wheel in .whl/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        if "$VENV/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            continue  # the machine has it already: keep its version
        fi
        "$VENV/bin/python" -m pip install -q --no-index --no-deps "$wheel" || { echo "could not install $wheel" >&2; exit 1; }
    done
    PY=$VENV/bin/python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_acceptance.py "$@"
