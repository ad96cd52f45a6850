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

.PHONY: venv demo test lint bench clean pipeline mlflow-ui prefect-up prefect-down

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[pipeline,dev]"
	touch $@

demo: venv pipeline  ## the main job: the whole DVC pipeline on the embedded defaults (synthetic data, CPU)

pipeline: venv
	@test -d .dvc || $(VENV)/bin/dvc init -q --no-scm
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

prefect-up: venv  ## local Prefect server + gpu pool + deployments + worker (state in .prefect/)
	flows/local.sh up

prefect-down:  ## stop the local Prefect server and worker (by process id)
	flows/local.sh down

MLFLOW_PORT ?= 5000
mlflow-ui: venv  ## browse runs, metrics, plots and registered scorers on http://127.0.0.1:$(MLFLOW_PORT)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

test: venv lint  ## the whole test suite (CPU)
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check clic tests bench stages flows
	$(VENV)/bin/mypy clic

bench: venv  ## throughput benchmark, prints JSON
	$(PY) bench/bench_pretrain.py

clean:
	rm -rf data models metrics plots mlartifacts mlflow.db bench/results
