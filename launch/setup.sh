#!/usr/bin/env bash
# Create $VENV and install ds_fp4 with the extras in $EXTRAS, at the versions of the lock file.
#
#   bash launch/setup.sh                      .venv, extras "dev", versions from requirements.lock
#   EXTRAS=dev,mpi bash launch/setup.sh       adds mpi4py to an existing .venv (extras only grow)
#   LOCK=none VENV=.venv-latest bash ...      the newest versions pyproject.toml allows (make test-latest)
#
# Torch goes in first, because every later package that depends on it would otherwise let pip pick
# a multi-GB CUDA wheel:
#   * if the Python we start from already has a CUDA build of torch (a GPU node's image), the venv is
#     created with --system-site-packages and that build is kept, with the triton it came with;
#   * otherwise the CPU build TORCH_SPEC (default torch==2.13.0) and TRITON_SPEC (triton==3.9.0, which
#     runs the kernels under TRITON_INTERPRET=1) are installed into the venv. On a CPU machine outside
#     this workplace, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu so pip finds the
#     +cpu wheel.
# Every later pip call is constrained to that torch and to the lock file (which leaves torch and triton
# out, so a GPU node's own builds are never replaced). A re-run is a no-op while pyproject.toml, the lock
# file and this script are unchanged and the venv already has the extras asked for.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.9.0}
EXTRAS=${EXTRAS:-dev}
LOCK=${LOCK:-requirements.lock}
STAMP="$VENV/.ds_fp4-installed"

if [ "$LOCK" != none ] && [ ! -f "$LOCK" ]; then
    echo "setup: lock file $LOCK not found; run from the repository root, or LOCK=none for pyproject's ranges" >&2
    exit 1
fi
inputs=$(cat pyproject.toml "$0" $([ "$LOCK" != none ] && echo "$LOCK") | sha256sum | cut -c1-16)
# Extras already installed with these same inputs are kept: asking for fewer never uninstalls anything.
installed_extras=""
if [ -f "$STAMP" ] && [ "$(sed -n 's/^inputs=//p' "$STAMP")" = "$inputs|$LOCK" ]; then
    installed_extras=$(sed -n 's/^extras=//p' "$STAMP")
fi
extras=$(echo "$installed_extras,$EXTRAS" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
if [ -n "$installed_extras" ] && [ "$extras" = "$installed_extras" ] && [ -x "$VENV/bin/python" ]; then
    echo "setup: $VENV is up to date (extras $installed_extras, ${LOCK/#none/pyproject ranges})"
    exit 0
fi

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
rm -f "$STAMP"  # from here until the end the venv is being changed: no stamp says it is ready
pip_install() {  # pip's exit status survives the filter (pipefail); the filter drops a harmless warning
    "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }
}

if ! "$PY" -W ignore -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC and $TRITON_SPEC (CPU build)"
    pip_install "$TORCH_SPEC" "$TRITON_SPEC" || { echo "setup: pip could not install $TORCH_SPEC" >&2; exit 1; }
fi
torch_version=$("$PY" -W ignore -c "import torch; print(torch.__version__)")
constraints="$VENV/torch-constraint.txt"
echo "torch==$torch_version" > "$constraints"
echo "setup: torch $torch_version; extras $extras; versions from ${LOCK/#none/the ranges in pyproject.toml}"

lock_args=()
[ "$LOCK" != none ] && lock_args=(-c "$LOCK")
pip_install -c "$constraints" "${lock_args[@]}" -e ".[$extras]" \
    || { echo "setup: pip could not install .[$extras]; see its output above" >&2; exit 1; }
"$PY" -c "import ds_fp4, data_pipeline, launch, deepspeed" 2>/dev/null \
    || { echo "setup: the install did not import; see pip's output above" >&2; exit 1; }
printf 'inputs=%s|%s\nextras=%s\n' "$inputs" "$LOCK" "$extras" > "$STAMP"
echo "setup: ready ($VENV)"
