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

.PHONY: venv demo test lint bench clean clean-workspaces clean-prefect pipeline mlflow-ui prefect-up prefect-down

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[pipeline,shards,dev]"
	touch $@

demo: venv pipeline  ## the main job: the whole DVC pipeline on the embedded defaults (synthetic data, CPU)

pipeline: venv
	@test -d .dvc || $(VENV)/bin/dvc init -q --no-scm
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

PREFECT_PORT ?= 4200
export PREFECT_PORT
prefect-up: venv  ## local Prefect server on http://127.0.0.1:$(PREFECT_PORT) + gpu pool + deployments + worker (state in .prefect/)
	flows/local.sh up

prefect-down:  ## stop the local Prefect server and worker (by process id)
	flows/local.sh down

MLFLOW_PORT ?= 5000
mlflow-ui: venv  ## browse runs, metrics, plots and registered scorers on http://127.0.0.1:$(MLFLOW_PORT)
	@$(PY) -c "import sqlite3; db = sqlite3.connect('file:mlflow.db?mode=ro', uri=True); \
	  row = db.execute(\"select experiment_id from experiments where name = 'clic'\").fetchone(); \
	  print(f'runs of experiment clic: http://127.0.0.1:$(MLFLOW_PORT)/#/experiments/{row[0]}?workflowType=machine_learning')" \
	  2>/dev/null || true
	@# .mlflow-ui tells the pipeline's and Prefect's links which UI runs (URL and process id); MLflow's
	@# job execution (7 task consumers, 2.3 GB resident against 0.5 GB) serves features this project does not use
	echo "http://127.0.0.1:$(MLFLOW_PORT) $$$$" > .mlflow-ui && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	  exec $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
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

KEEP ?= 0
clean-workspaces:  ## remove Prefect flow workspaces (KEEP=N keeps each flow's newest N; running ones stay)
	$(PY) -c "from pathlib import Path; from flows.workspace import prune_workspaces; \
	  [print('removed', p) for f in ('pretrain', 'evaluate', 'pipeline') \
	   for p in prune_workspaces(Path('workspaces'), f, $(KEEP))]; \
	  Path('workspaces').is_dir() and not any(Path('workspaces').iterdir()) and Path('workspaces').rmdir()"

clean-prefect: prefect-down  ## stop the local Prefect server and worker and delete their state (.prefect/)
	rm -rf .prefect
