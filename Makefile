# The two entry points the README opens with: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo-cpu.json
RANKS ?= 2
# One thread per rank: two ranks on two cores, no OpenMP threads spinning against each other.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint clean lock test-latest
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

clean:
	rm -rf $(VENV) .venv-lock .venv-latest runs .pytest_cache
