"""Prefect flows over the DVC stages: ``pretrain(method, dataset, overrides)`` (fetch, validate,
pretrain, probe), ``evaluate(dataset, methods, alias)`` (re-probe the registered scorers) and
``pipeline(dataset, overrides)`` (every stage). Each task runs ``dvc repro --single-item <stage>``
in the flow's workspace (``flows/workspace.py``), streaming its output into the logs; a flow run
holds one slot of the concurrency limit ``gpu`` for all its GPU stages, groups its MLflow runs
under one parent run and publishes a markdown artifact. docs/usage.md, "Prefect", tells the rest.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from clic.methods import names as method_names
from clic.params import load_params
from flows.workspace import ROOT, stage_env, workspace

GPU_STAGES = ("pretrain", "probe", "baselines", "transfer")
# log lines that tell a person nothing: GX's import-time registry chatter, MLflow's system-metrics
# thread, DVC's remote hints (workspaces have no remote) and an empty list some libraries print
NOISE = ("Skipping registering function", "system_metrics", "Use `dvc push`", "to send your updates to remote",
         "To enable auto staging")


def clean_line(raw: bytes | str) -> str | None:
    """One output line as worth logging, or None: a progress bar's carriage-return redraws reduce to
    their last state, noise and blank lines go."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    parts = [p for p in text.rstrip("\n").split("\r") if p.strip()]
    if not parts:
        return None
    line = parts[-1].rstrip()
    if line.strip() in ("[]", "{}") or any(n in line for n in NOISE):
        return None
    return line


def stream(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``cmd`` and log its output (stdout and stderr merged) line by line as it comes; returns
    the exit code and the last 200 kept lines."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:  # binary: split on \n only, so \r redraws stay within their line
            line = clean_line(raw)
            if line is not None:
                logger.info(line)
                tail.append(line)
        rc = proc.wait()
    return rc, list(tail)


def _env() -> dict[str, str]:
    return stage_env(ROOT, str(flow_run.id or "local"), os.environ.get("CLIC_RUN_NAME", ""))


@task(task_run_name="{target}")
def stage(ws: Path, target: str) -> str:
    rc, tail = stream(["dvc", "repro", "--single-item", target], ws, _env())
    if rc != 0:
        errors = [x for x in tail if "error" in x.lower() or "failed" in x.lower()]
        raise RuntimeError(f"stage {target} failed: {' | '.join(errors[-4:]) or chr(10).join(tail[-20:])}")
    return "\n".join(tail)


fetch = stage.with_options(name="fetch", retries=2, retry_delay_seconds=10)  # data may sit on a flaky mount


def repro(ws: Path, names: list[str]) -> None:
    """The DVC stages ``names`` in order, one task each (``fetch`` retried); one ``gpu`` slot held
    from the first GPU stage to the last."""
    gpu = [i for i, n in enumerate(names) if n.split("@")[0] in GPU_STAGES]
    first, last = (gpu[0], gpu[-1] + 1) if gpu else (len(names), len(names))
    for part, slot in ((names[:first], False), (names[first:last], True), (names[last:], False)):
        with gpu_slot() if slot and part else contextlib.nullcontext():
            for n in part:
                (fetch if n == "fetch" else stage)(ws, n)


def _locked(exc: BaseException | None) -> bool:
    response = getattr(exc, "response", None) or getattr(getattr(exc, "__cause__", None), "response", None)
    return getattr(response, "status_code", None) == 423


class _RefusedPolls(logging.Filter):
    """Drops the ERROR Prefect's slot service logs for each refused poll ("failed to process item",
    HTTP 423: the limit is full). ``gpu_slot`` polls each second, so a waiting cell wrote an
    "error" a second to the worker's log; any other failure of the service is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg != "Service %r failed to process item %r" or len(args) != 2 or not isinstance(args[1], tuple):
            return True
        future = args[1][-1] if args[1] else None
        if not isinstance(future, concurrent.futures.Future) or not future.done() or future.cancelled():
            return True
        return not _locked(future.exception())


_REFUSED_POLLS = _RefusedPolls()


@contextlib.contextmanager
def gpu_slot(poll_s: float = 1.0) -> Iterator[None]:
    """Hold one slot of the ``gpu`` limit for the block: taken once for all of a flow run's GPU
    stages (a finishing stage cannot hand it to itself again), polled every ``poll_s`` seconds
    while full rather than after the server's back-off (no idle slot between holders)."""
    logger = get_run_logger()
    logging.getLogger("prefect._internal.concurrency").addFilter(_REFUSED_POLLS)  # added once: addFilter skips a repeat
    start, told = time.monotonic(), 0.0
    with contextlib.ExitStack() as stack:
        while True:
            try:
                # a 60 s lease (renewed while held): a slot of a killed or cancelled run is back
                # within about a minute, not Prefect's default five
                stack.enter_context(concurrency("gpu", occupy=1, max_retries=0, lease_duration=60))
                break
            except ConcurrencySlotAcquisitionError as exc:
                if not _locked(exc):
                    raise
                if not told or time.monotonic() - told > 60:
                    logger.info("waiting for a gpu slot (concurrency limit 'gpu' is full), %.0f s so far",
                                time.monotonic() - start)
                    told = time.monotonic()
                time.sleep(poll_s)
        if told:
            logger.info("got a gpu slot after %.0f s", time.monotonic() - start)
        yield


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def mlflow_parent(name: str) -> Iterator[None]:
    """Name this flow run's MLflow parent run ``name``; on leaving, end it FINISHED, or FAILED with
    the error text as its artifact ``error.txt`` when the flow raises."""
    os.environ["CLIC_RUN_NAME"] = name
    status, error = "FINISHED", ""
    try:
        yield
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            import mlflow

            env = _env()
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            client = mlflow.MlflowClient()
            query = f"tags.`clic.invocation` = '{env['CLIC_PIPELINE_ID']}' and tags.`clic.kind` = 'pipeline'"
            for run in mlflow.search_runs(experiment_names=["clic"], filter_string=query, output_format="list"):
                if error:
                    client.log_text(run.info.run_id, error + "\n", "error.txt")
                    client.set_tag(run.info.run_id, "clic.error", error[:5000])
                client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001 - never hide the flow's own outcome
            get_run_logger().warning("could not close the MLflow parent run: %s", exc)


def publish(ws: Path, title: str, metric_files: dict[str, Path], extra: str = "") -> dict[str, Any]:
    """A markdown artifact: one row per model with its metrics, then this flow run's MLflow runs
    (parent first) linked to the MLflow UI. Call it after the parent run is closed."""
    import mlflow

    from stages.tracking import ui_link, ui_url

    env = _env()
    results = {name: json.loads(f.read_text()) if f.exists() else {} for name, f in metric_files.items()}
    rows: list[str] = []
    for name, m in results.items():
        cells = [name, *(f"{m.get(k, float('nan')):.4f}" for k in ("pcc", "srcc", "krcc", "rmse"))]
        rows.append("| " + " | ".join(cells) + " |")
    tracking = env["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(tracking)
    found = mlflow.search_runs(experiment_names=["clic"], output_format="list",
                               filter_string=f"tags.`prefect.flow_run_id` = '{env['CLIC_PREFECT_FLOW_RUN_ID']}'")
    runs = sorted(((r.data.tags.get("clic.kind") == "pipeline", r.info) for r in found),
                  key=lambda x: (not x[0], x[1].run_name))  # parent first
    links = [f"| [{r.run_name}]({ui_link(f'experiments/{r.experiment_id}/runs/{r.run_id}', tracking)}) "
             f"| {'flow (parent)' if parent else 'stage'} | `{r.run_id}` | {r.status} |" for parent, r in runs]
    exp = runs[0][1].experiment_id if runs else ""
    md = [f"# {title}", "", "| model | PCC | SRCC | KRCC | RMSE |", "|---|---|---|---|---|", *rows, "",
          f"MLflow store: `{tracking}`, workspace: `{ws}`; runs of experiment clic in the UI: "
          f"[{ui_url(tracking)}]({ui_link(f'experiments/{exp}', tracking)})", "",
          "| MLflow run | kind | id | status |", "|---|---|---|---|", *links, "",
          "Registered scorers: " + ", ".join(f"[clic-{m}]({ui_link(f'models/clic-{m}', tracking)})"
                                               for m in metric_files if m in method_names()), "", extra]
    create_markdown_artifact(markdown="\n".join(md), key=title.lower().replace(" ", "-").replace("/", "-")[:60],
                             description=title)
    return results


@flow(name="pretrain", log_prints=True)
def pretrain(method: str = "clicv2", dataset: str = "", overrides: dict[str, Any] | None = None) -> dict:
    """Fetch, validate, pretrain and probe one method in an isolated workspace.

    ``overrides``: params.yaml keys, e.g. ``{"pretrain.clicv2.epochs": 1}`` or, relative to the
    method, ``{"epochs": 1}``."""
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(method_names())}")
    with workspace("pretrain", method, dataset, overrides) as ws:
        with mlflow_parent(f"flow pretrain/{method}"):
            repro(ws, ["fetch", "validate", f"pretrain@{method}", f"probe@{method}"])
        return publish(ws, f"pretrain {method}", {method: ws / "metrics" / "probe" / f"{method}.json"})


@task(task_run_name="evaluate clic-{method}@{alias}")
def reprobe(ws: Path, method: str, alias: str) -> Path:
    """Re-probe the registered scorer ``clic-<method>@<alias>`` on the workspace's dataset and log
    the metrics to MLflow, linked to the model version."""
    import mlflow

    from clic.model_uri import scorer_file
    from stages import tracking

    env = _env()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    local = mlflow.artifacts.download_artifacts(f"models:/clic-{method}@{alias}",
                                                dst_path=str(ws / "registry" / method))
    scorer = scorer_file(Path(local), f"models:/clic-{method}@{alias}")
    out = ws / "reports" / "evaluate" / method
    rc, tail = stream(["clic", "probe", "--model", str(scorer), "--out", str(out)], ws, env)
    if rc != 0:
        raise RuntimeError(f"re-probing clic-{method}@{alias} failed: {' | '.join(tail[-4:])}")
    report = json.loads((out / "metrics.json").read_text())
    metrics = {k: float(report[k]) for k in ("pcc", "srcc", "krcc", "rmse", "rmae", "mae") if k in report}
    with _environ(env):
        run_id, version = tracking.log_evaluation(load_params(ws / "params.yaml"), method, alias, metrics,
                                                  [out / f for f in ("metrics.json", "predictions.csv", "scatter.png")])
    get_run_logger().info("clic-%s@%s (version %s): SRCC %.4f, logged to MLflow run %s", method, alias, version,
                          metrics.get("srcc", float("nan")), run_id)
    return out / "metrics.json"


@flow(name="evaluate", log_prints=True)
def evaluate(dataset: str = "", methods: list[str] | None = None, alias: str = "champion",
             overrides: dict[str, Any] | None = None) -> dict:
    """Re-probe the registered scorers ``clic-<method>@<alias>`` on a dataset."""
    methods = list(methods or method_names())
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise ValueError(f"methods: unknown {', '.join(unknown)}; expected some of {', '.join(method_names())}")
    with workspace("evaluate", "", dataset, overrides) as ws:
        files = {}
        with mlflow_parent("flow evaluate"):
            repro(ws, ["fetch", "validate"])
            with gpu_slot():
                for m in methods:
                    files[f"clic-{m}@{alias}"] = reprobe(ws, m, alias)
        return publish(ws, f"evaluate {dataset or 'default'}", files)


@flow(name="pipeline", log_prints=True)
def pipeline(dataset: str = "", overrides: dict[str, Any] | None = None) -> dict:
    """Every stage for every method and baseline, one task per stage; publishes the comparison."""
    with workspace("pipeline", "", dataset, overrides) as ws:
        with mlflow_parent("flow pipeline"):
            names = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=ws, env=_env(), check=True,
                                   capture_output=True, text=True).stdout.split()
            repro(ws, names)
        table = (ws / "metrics" / "comparison.md").read_text()
        return publish(ws, "pipeline", {m: ws / "metrics" / f"{m}.json" for m in method_names()},
                       extra="## Comparison\n\n" + table)
