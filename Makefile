# Two commands for a newcomer: `make reproduce` and `make test`. Both install the locked environment
# (.venv, from uv.lock, with the machine's python3) when it is missing or out of date.
PYTHON ?= python3
UV_VERSION ?= 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
VENV := .venv
CORES ?= all
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (logical: one per logical CPU); each test module runs whole on one (tests/conftest.py)
TEST_WORKERS ?= logical
SMOKE_ARGS ?=
# rules call `papa`; the locked environment must come first on PATH
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install reproduce report test test-unit lint bench smoke clean

install: $(VENV)/.installed

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON) --no-python-downloads --compile-bytecode
	@touch $@

reproduce: install
	mkdir -p reports
	$(VENV)/bin/snakemake --cores $(CORES)
	$(VENV)/bin/snakemake --cores 1 --report reports/report.html

test: install
	$(VENV)/bin/ruff check papa tests benchmarks
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# the math and small pieces only (tests/unit/), one thread each: under a minute
test-unit: install
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# every config (paper and default) at smoke scale (scale: smoke, docs/smoke.md) on fake data, in a temporary dir: one
# summary line per config (time, runs, tables rendered); SMOKE_ARGS="config/paper/table3.yaml --keep" for one
smoke: install
	$(VENV)/bin/python -m tests.smoke_configs $(SMOKE_ARGS)

lint: install
	$(VENV)/bin/ruff check papa tests benchmarks
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs .snakemake
