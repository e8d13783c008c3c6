# The two entry points the README opens with: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ds_fp4-installed
CONFIG ?= configs/demo-cpu.json
RANKS ?= 2
# One thread per rank: two ranks on two cores, no OpenMP threads spinning against each other.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml launch/setup.sh
	VENV=$(VENV) bash launch/setup.sh
	touch $(STAMP)

# The embedded default: prepares the stdlib corpus on first use, then trains the demo on $(RANKS) CPU ranks.
train: setup
	$(VENV)/bin/deepspeed --num_gpus $(RANKS) launch/train.py --deepspeed_config $(CONFIG)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ds_fp4 data_pipeline launch tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
