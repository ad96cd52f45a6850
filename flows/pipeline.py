"""Prefect flows over the DVC stages.

- ``pretrain(method, dataset, overrides)``: fetch, validate, pretrain and probe one method;
- ``evaluate(dataset, methods, alias)``: re-probe the registered scorers on a dataset;
- ``pipeline(dataset, overrides)``: every stage (all methods, baselines, transfer, comparison).

Each task runs ``dvc repro <stage>`` in the flow's isolated workspace (so DVC decides what is
already done). Fetching retries; GPU stages hold one slot of the global concurrency limit
``gpu`` (``make prefect-up`` creates it with one slot per GPU of the worker). Each run publishes a
markdown artifact with its metrics and the MLflow run ids, and its MLflow runs carry the flow-run
id as tag ``prefect.flow_run_id``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from clic.config import METHODS
from flows.workspace import ROOT, stage_env, workspace

GPU_STAGES = ("pretrain", "probe", "baselines", "transfer")


def _run_dvc(ws: Path, target: str) -> str:
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", target] if target != "all" else ["dvc", "repro"]
    env = stage_env(ROOT, str(flow_run.id or "local"))
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "system_metrics" not in line:
            logger.info(line)
    if proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if "error" in x.lower() or "failed" in x.lower()]
        raise RuntimeError(f"stage {target} failed: {' | '.join(errors[-4:]) or proc.stderr[-1500:]}")
    return proc.stdout


@task(retries=2, retry_delay_seconds=10, task_run_name="fetch")
def fetch(ws: Path) -> str:
    """Preparing data may hit a flaky mount or archive read: retried."""
    return _run_dvc(ws, "fetch")


@task(task_run_name="{target}")
def stage(ws: Path, target: str) -> str:
    if target.split("@")[0] in GPU_STAGES or target == "all":
        with concurrency("gpu", occupy=1):
            return _run_dvc(ws, target)
    return _run_dvc(ws, target)


def _mlflow_runs(env: dict[str, str]) -> list[tuple[str, str, str]]:
    """(run name, run id, status) of this flow run's MLflow runs."""
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["clic"], output_format="list",
                              filter_string=f"tags.`prefect.flow_run_id` = '{env['CLIC_PREFECT_FLOW_RUN_ID']}'")
    return [(r.info.run_name, r.info.run_id, r.info.status) for r in runs]


@contextlib.contextmanager
def closes_mlflow_parent() -> Iterator[None]:
    """End this flow run's MLflow parent run FINISHED, or FAILED when the flow raises."""
    status = "FINISHED"
    try:
        yield
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            import mlflow

            env = stage_env(ROOT, str(flow_run.id or "local"))
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name("clic")
            if exp is not None:
                query = f"tags.`clic.invocation` = '{env['CLIC_PIPELINE_ID']}' and tags.`clic.kind` = 'pipeline'"
                for run in client.search_runs([exp.experiment_id], query):
                    client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001 - never hide the flow's own outcome
            get_run_logger().warning("could not close the MLflow parent run: %s", exc)


def publish(ws: Path, title: str, metric_files: dict[str, Path], extra: str = "") -> dict[str, Any]:
    """A markdown artifact: one row per model with its metrics, then the MLflow runs."""
    env = stage_env(ROOT, str(flow_run.id or "local"))
    rows, results = [], {}
    for name, f in metric_files.items():
        m = json.loads(f.read_text()) if f.exists() else {}
        results[name] = m
        cells = " | ".join(f"{m.get(k, float('nan')):.4f}" for k in ("pcc", "srcc", "krcc", "rmse"))
        rows.append(f"| {name} | {cells} |")
    runs = _mlflow_runs(env)
    md = [f"# {title}", "", "| model | PCC | SRCC | KRCC | RMSE |", "|---|---|---|---|---|", *rows, "",
          f"MLflow store: `{env['MLFLOW_TRACKING_URI']}`, workspace: `{ws}`", "", "| MLflow run | id | status |",
          "|---|---|---|", *[f"| {n} | `{i}` | {s} |" for n, i, s in sorted(runs)], "", extra]
    create_markdown_artifact(markdown="\n".join(md), key=title.lower().replace(" ", "-").replace("/", "-")[:60],
                             description=title)
    return results


@flow(name="pretrain", log_prints=True)
def pretrain(method: str = "clicv2", dataset: str = "", overrides: dict[str, Any] | None = None) -> dict:
    """Fetch, validate, pretrain and probe one method in an isolated workspace."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    with workspace("pretrain", method, dataset, overrides) as ws, closes_mlflow_parent():
        fetch(ws)
        stage(ws, "validate")
        stage(ws, f"pretrain@{method}")
        stage(ws, f"probe@{method}")
        return publish(ws, f"pretrain {method}", {method: ws / "metrics" / "probe" / f"{method}.json"})


@flow(name="evaluate", log_prints=True)
def evaluate(dataset: str = "", methods: list[str] | None = None, alias: str = "champion",
             overrides: dict[str, Any] | None = None) -> dict:
    """Re-probe the registered scorers ``clic-<method>@<alias>`` on a dataset."""
    import mlflow

    methods = list(methods or METHODS)
    with workspace("evaluate", "", dataset, overrides) as ws, closes_mlflow_parent():
        fetch(ws)
        stage(ws, "validate")
        env = stage_env(ROOT, str(flow_run.id or "local"))
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        files = {}
        for m in methods:
            local = mlflow.artifacts.download_artifacts(f"models:/clic-{m}@{alias}", dst_path=str(ws / "registry" / m))
            scorer = next(Path(local).rglob("scorer.pt"))
            out = ws / "reports" / "evaluate" / m
            with concurrency("gpu", occupy=1):
                proc = subprocess.run(["clic", "probe", "--model", str(scorer), "--out", str(out)], cwd=ws, env=env,
                                      capture_output=True, text=True)
            get_run_logger().info(proc.stdout + proc.stderr[-2000:])
            if proc.returncode != 0:
                raise RuntimeError(f"re-probing clic-{m}@{alias} failed: {proc.stderr.strip().splitlines()[-1:]}")
            files[f"clic-{m}@{alias}"] = out / "metrics.json"
        return publish(ws, f"evaluate {dataset or 'default'}", files)


@flow(name="pipeline", log_prints=True)
def pipeline(dataset: str = "", overrides: dict[str, Any] | None = None) -> dict:
    """Every stage for every method and baseline; publishes the comparison table."""
    with workspace("pipeline", "", dataset, overrides) as ws, closes_mlflow_parent():
        fetch(ws)
        stage(ws, "all")
        table = (ws / "metrics" / "comparison.md").read_text()
        return publish(ws, "pipeline", {m: ws / "metrics" / f"{m}.json" for m in METHODS},
                       extra="## Comparison\n\n" + table)
