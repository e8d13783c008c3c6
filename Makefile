# The two entry points the README opens with: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo-cpu.json
RANKS ?= 2
# One thread per rank: two ranks on two cores, no OpenMP threads spinning against each other.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint clean lock test-latest test-triton36
# launch/setup.sh decides itself whether anything is to do (pyproject.toml, requirements.lock, the extras
# asked for in EXTRAS): a no-op re-run takes a few milliseconds.
setup:
	VENV=$(VENV) bash launch/setup.sh

# The embedded default: prepares the stdlib corpus on first use, then trains the demo on $(RANKS) CPU ranks.
train: setup
	$(VENV)/bin/deepspeed --num_gpus $(RANKS) launch/train.py --deepspeed_config $(CONFIG)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ds_fp4 data_pipeline launch tests bench

# Re-resolve requirements.lock from pyproject.toml's ranges (then run the whole suite before committing it).
lock:
	rm -rf .venv-lock
	VENV=.venv-lock LOCK=none EXTRAS=dev,mpi,bench bash launch/setup.sh
	.venv-lock/bin/python launch/lock.py write .venv-lock requirements.lock

# Not run in CI: the newest versions pyproject.toml allows, the fast tests, and what drifted from the lock.
test-latest:
	rm -rf .venv-latest
	VENV=.venv-latest LOCK=none bash launch/setup.sh
	.venv-latest/bin/python launch/lock.py drift .venv-latest requirements.lock
	.venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

# Not run in CI: tests/kernels (interpreter and AOT compile) and the self-test under Triton 3.6, the version
# the lent GPU machine has, in a side venv: CI's CPU torch (the machine's torch 2.11 is a CUDA build of
# several GB), numpy 2.2 (3.6's interpreter fails on numpy >= 2.3), the rest at the lock's versions.
test-triton36:
	rm -rf .venv-triton36
	python3 -m venv .venv-triton36
	grep -v '^numpy==' requirements.lock > .venv-triton36/constraints.txt
	.venv-triton36/bin/pip install -q --disable-pip-version-check -c .venv-triton36/constraints.txt \
		torch==2.13.0 triton==3.6.0 numpy==2.2.6 pydantic pytest pytest-timeout hypothesis
	PYTHONPATH=. .venv-triton36/bin/python -m pytest -q -p no:cacheprovider tests/kernels tests/ds_fp4/test_selftest.py \
		-k "not initialize"

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-triton36 runs .pytest_cache
