# The two commands a new user needs: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment at .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-var compare test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/ccalign demo

demo-var: setup
	$(BIN)/ccalign demo --family var

compare: setup
	$(BIN)/ccalign demo --methods cca,gft,ddo --out runs/compare

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
