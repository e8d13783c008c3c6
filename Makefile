# The two entry points the README opens with: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ds_fp4-installed

.PHONY: setup train test lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml launch/setup.sh
	VENV=$(VENV) bash launch/setup.sh
	touch $(STAMP)

train: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ds_fp4 data_pipeline launch tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
