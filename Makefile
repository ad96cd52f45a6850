# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv from the exact pins in requirements/lock.txt.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK=true DVC_NO_ANALYTICS=1 \
       GX_ANALYTICS_ENABLED=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[pipeline,dev]"
	touch $@

demo: venv  ## the main job on the embedded defaults (synthetic data, CPU)
	$(VENV)/bin/clic data prepare --transfer data/transfer
	for m in moco clic clicv2; do $(VENV)/bin/clic pretrain --method $$m --out models/$$m || exit 1; done
	$(VENV)/bin/clic embed --model models/clicv2/encoder.pt --out models/clicv2/features.npz data/raw
	@echo "encoders: models/<method>/encoder.pt; features: models/clicv2/features.npz"

test: venv lint  ## the whole test suite (CPU)
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check clic tests bench
	$(VENV)/bin/mypy clic

bench: venv  ## throughput benchmark, prints JSON
	$(PY) bench/bench_pretrain.py

clean:
	rm -rf data models metrics plots mlartifacts mlflow.db bench/results
