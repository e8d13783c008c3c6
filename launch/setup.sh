#!/usr/bin/env bash
# Create .venv and install ds_fp4 with its dev extras.
#
# Torch goes in first, because every later package that depends on it would otherwise let pip pick
# a multi-GB CUDA wheel:
#   * if the Python we start from already has a CUDA build of torch (a GPU node's image), the venv is
#     created with --system-site-packages and that build is kept;
#   * otherwise the CPU build TORCH_SPEC (default torch==2.13.0) is installed into the venv. On a CPU
#     machine outside this workplace, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#     so pip finds the +cpu wheel.
# Every later pip call is constrained to the torch version now installed, so nothing replaces it.
# Re-runs are cheap: the Makefile only calls this script when pyproject.toml or this file changed.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

base_torch_cuda=$("$PYTHON" - <<'PY' 2>/dev/null || true
try:
    import torch
    print(torch.version.cuda or "")
except Exception:
    print("")
PY
)

if [ ! -x "$VENV/bin/python" ]; then
    if [ -n "$base_torch_cuda" ]; then
        echo "setup: keeping the CUDA $base_torch_cuda build of torch from $PYTHON (--system-site-packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
pip_install() {  # pip's exit status survives the filter (pipefail); the filter drops a harmless warning
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }
}
pip_install --upgrade pip || echo "setup: could not upgrade pip; going on with $("$PY" -m pip --version)"

if ! "$PY" -W ignore -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC (CPU build)"
    pip_install "$TORCH_SPEC" || { echo "setup: pip could not install $TORCH_SPEC" >&2; exit 1; }
fi
torch_version=$("$PY" -W ignore -c "import torch; print(torch.__version__)")
constraints="$VENV/torch-constraint.txt"
echo "torch==$torch_version" > "$constraints"
echo "setup: torch $torch_version"

pip_install -c "$constraints" -e ".[$EXTRAS]" \
    || { echo "setup: pip could not install .[$EXTRAS]; see its output above" >&2; exit 1; }
"$PY" -c "import ds_fp4, data_pipeline, launch, deepspeed" 2>/dev/null \
    || { echo "setup: the install did not import; see pip's output above" >&2; exit 1; }
echo "setup: ready ($VENV)"
