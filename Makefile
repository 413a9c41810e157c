# The two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: install demo test fuzz lint bench clean

# torch is pinned to the CPU wheel this machine carries; on a GPU box install torch first and
# the pin is satisfied by what is there (pip keeps an installed torch that meets >=2.1).
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m relex_stream synth --out $(DEMO)/trajectory --steps 10-80:10 --overwrite
	$(PY) -m relex_stream run --base $(DEMO)/trajectory/base --runs $(DEMO)/trajectory/runs \
		--target 200,400 --out $(DEMO)/out --overwrite --rebuild
	$(PY) -m relex_stream report $(DEMO)/out/trajectory.zarr --out $(DEMO)/report --overwrite
	$(PY) -m relex_stream backtest $(DEMO)/out/trajectory.zarr --holdout 3 --out $(DEMO)/backtest --overwrite

# Two workers (pytest-xdist): the suite is CPU-bound and mostly one thread per process, and CI
# machines have two cores; each file stays on one worker (--dist loadfile), so a module's
# fixtures are built once. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Hostile inputs, many examples (hypothesis has no deadline in these files): safetensors headers,
# JSON, flags and environment variables, and damaged or forged stores.
fuzz: install
	RELEX_FUZZ_EXAMPLES=$${RELEX_FUZZ_EXAMPLES:-2000} $(PY) -m pytest -q \
		tests/test_fuzz_inputs.py tests/test_fuzz_store.py

lint: install
	$(PY) -m ruff check relex_stream tests bench

bench: install
	$(PY) bench/bench_run.py

clean:
	rm -rf $(VENV) $(DEMO) bench/out .pytest_cache
