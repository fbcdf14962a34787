# The two commands a new user needs: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment at .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the portable kernels: float comparisons between code paths must hold on any CPU
PORTABLE := ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1

.PHONY: setup demo demo-var demo-t2i compare test test-fast test-numerics lint example
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/ccalign demo

demo-var: setup
	$(BIN)/ccalign demo --family var

demo-t2i: setup
	$(BIN)/ccalign demo --family t2i

compare: setup
	$(BIN)/ccalign demo --methods cca,gft,ddo --out runs/compare

example: setup
	$(BIN)/python examples/own_family.py

test: setup
	$(BIN)/python -m pytest -q

# the edit loop: everything but the tests marked slow (worker processes, end-to-end demos)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# the tests that compare floats of two code paths, again on the portable kernels (CI runs it)
test-numerics: setup
	$(PORTABLE) $(BIN)/python -m pytest -q -m numerics

lint: setup
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/lint-imports
