"""MLflow glue shared by the DVC stages (the core library never imports MLflow): the store, one
run per stage execution nested under one parent run per pipeline invocation (``dvc repro`` or a
Prefect flow run; ``CLIC_PIPELINE_ID``/``CLIC_RUN_NAME`` name it), the registered scorers' links.
A stage that raises marks its run and the parent FAILED with the error as ``error.txt``. What a
user sees of it: docs/usage.md, "MLflow".
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

import mlflow  # noqa: E402
import psutil  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from clic.engine.checkpoint import code_version, git_revision  # noqa: E402
from clic.params import Params, flatten, mlflow_config  # noqa: E402

EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI: training runs vs GenAI traces
TRAINING = "custom_model_development"
KEY_METRICS = ("pcc", "srcc")  # with every ``<dataset>_top1``: copied onto the parent run


def tracking_uri(params: Params) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or mlflow_config(params).tracking_uri
            or f"sqlite:///{ROOT / 'mlflow.db'}")


UI_FILE = ".mlflow-ui"  # written by `make mlflow-ui`: "<url> <pid>" of the UI it started
TRAINING_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens GenAI pages without it


def ui_url(tracking: str = "") -> str:
    """Base address of the MLflow UI a link should open: ``MLFLOW_UI_URL``; else the UI that
    `make mlflow-ui` started in this project, while it runs (whatever its port); else the tracking
    server itself; else ``http://127.0.0.1:$MLFLOW_PORT`` (5000)."""
    if os.environ.get("MLFLOW_UI_URL"):
        return os.environ["MLFLOW_UI_URL"].rstrip("/")
    project = Path(os.environ.get("CLIC_PROJECT_DIR") or ROOT)
    with contextlib.suppress(OSError, ValueError):
        url, pid = (project / UI_FILE).read_text().split()
        os.kill(int(pid), 0)  # raises when that UI has stopped
        return url.rstrip("/")
    tracking = tracking or os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):
        return tracking.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}"


def ui_link(path: str, tracking: str = "") -> str:
    """``path`` (``experiments/1/runs/<id>``, ``models/clic-clicv2/versions/3``) in the MLflow UI,
    in its training (not GenAI) view."""
    return f"{ui_url(tracking)}/#/{path}?{TRAINING_VIEW}"


def setup(params: Params) -> str:
    """Point MLflow at the store, check it answers, and return the experiment id."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    name = mlflow_config(params).experiment
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise ValueError(f"MLflow tracking store {uri} is unreachable or unusable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); start the server or unset MLFLOW_TRACKING_URI") from exc
    if exp is None:
        artifacts = Path(os.environ.get("CLIC_ARTIFACT_ROOT") or ROOT / "mlartifacts")
        location = artifacts.as_uri() if uri.startswith("sqlite:") else None
        try:
            return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: TRAINING})
        except mlflow.exceptions.MlflowException:  # a concurrent stage created it first
            if (exp := client.get_experiment_by_name(name)) is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND) != TRAINING:  # stores made before the tag
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, TRAINING)
    return exp.experiment_id


def invocation_id() -> str:
    """Identity of the pipeline invocation this stage belongs to: ``CLIC_PIPELINE_ID`` (Prefect
    flows and study cells set it), else the ``dvc`` process that launched the stage."""
    if os.environ.get("CLIC_PIPELINE_ID"):
        return os.environ["CLIC_PIPELINE_ID"]
    me = psutil.Process()
    with contextlib.suppress(psutil.Error):
        for proc in me.parents()[:6]:  # up to the dvc process that runs the stage commands
            if "dvc" in [Path(a).name for a in proc.cmdline()[:3]]:
                return f"dvc-{proc.pid}-{proc.create_time()}"
    return f"proc-{me.pid}-{me.create_time()}"


def parent_run(experiment_id: str) -> str:
    """The invocation's parent run, created by its first stage. Under a plain ``dvc repro`` each
    stage closes it when done (:func:`stage_run`) and the next one reopens it."""
    inv = invocation_id()
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`clic.invocation` = '{inv}' and tags.`clic.kind` = 'pipeline'",
                               max_results=1)
    if found:
        if found[0].info.status == "FINISHED" and _closes_own_parent():
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=os.environ.get("CLIC_RUN_NAME") or "pipeline",
                            tags={"clic.invocation": inv, "clic.kind": "pipeline", "git.commit": git_revision(ROOT),
                                  **_prefect_tag(), **_study_tags()})
    return run.info.run_id


def _closes_own_parent() -> bool:
    """A plain ``dvc repro``: no stage knows it is the last one (DVC skips the unchanged ones, so
    ``compare``, which closes the parent, may never run), so each stage closes the parent when it
    finishes. A Prefect flow or study cell (``CLIC_PIPELINE_ID``) closes its own."""
    return not os.environ.get("CLIC_PIPELINE_ID")


def _study_tags() -> dict[str, str]:
    """A study cell's invocation run sits under the study's run (``CLIC_PARENT_RUN_ID``) with the
    cell's tags (``CLIC_RUN_TAGS``, a JSON object: study, method, seed, variant), set by
    flows/study.py."""
    tags = json.loads(os.environ.get("CLIC_RUN_TAGS") or "{}")
    if os.environ.get("CLIC_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = os.environ["CLIC_PARENT_RUN_ID"]
    return {str(k): str(v) for k, v in tags.items()}


def _prefect_tag() -> dict[str, str]:
    """Link back to the Prefect flow run that launched this stage, if any."""
    fid = os.environ.get("CLIC_PREFECT_FLOW_RUN_ID") or os.environ.get("PREFECT__FLOW_RUN_ID")
    return {"prefect.flow_run_id": fid} if fid else {}


@contextlib.contextmanager
def stage_run(params: Params, stage: str, method: str = "", config: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage execution, nested in the invocation's parent run."""
    exp = setup(params)
    parent = parent_run(exp)
    run_tags = {"mlflow.parentRunId": parent, "clic.stage": stage, "clic.kind": "stage",
                "git.commit": git_revision(ROOT), "clic.code_version": code_version(),
                "dvc.stage": f"{stage}@{method}" if method else stage, **(tags or {}), **_prefect_tag()}
    if method:
        run_tags["clic.method"] = method
    run = mlflow.start_run(experiment_id=exp, run_name=f"{stage} {method}".strip(), tags=run_tags,
                           log_system_metrics=True)
    try:
        if config:
            mlflow.log_dict(config, "config.yaml")  # the resolved config, as one readable artifact
            # MLflow sends the params in batches of at most 100
            mlflow.log_params({k: (str(v)[:500] if v is not None else "") for k, v in flatten(config).items()})
        yield run
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
        mlflow.set_tag("clic.error", text[:5000])
        with contextlib.suppress(Exception):  # the tag above already holds the error
            mlflow.log_text(text + "\n\n" + traceback.format_exc(), "error.txt")
        mlflow.end_run("FAILED")
        MlflowClient().set_terminated(parent, "FAILED")
        raise
    else:
        if method:  # the method's key metrics onto the parent, as ``<method>_<key>``
            metrics = MlflowClient().get_run(run.info.run_id).data.metrics
            mlflow.log_metrics({f"{method}_{k}": v for k, v in metrics.items()
                                if k in KEY_METRICS or k.endswith("_top1")}, run_id=parent)
        mlflow.end_run("FINISHED")
        client = MlflowClient()
        if _closes_own_parent() and client.get_run(parent).info.status == "RUNNING":  # not a FAILED one
            client.set_terminated(parent, "FINISHED")


def finish_parent(params: Params) -> str:
    """Mark the invocation's parent run FINISHED (the last stage calls this); returns its id."""
    exp = setup(params)
    parent = parent_run(exp)
    MlflowClient().set_terminated(parent, "FINISHED")
    return parent


def log_evaluation(params: Params, method: str, alias: str, metrics: dict[str, float],
                   artifacts: list[Path]) -> tuple[str, str]:
    """A child run ``evaluate <method>`` for a re-probed registered scorer ``clic-<method>@<alias>``:
    its metrics linked to the model version (tags, and MLflow 3's ``model_id`` so they also show on
    the logged model's page). Returns (run id, model version)."""
    setup(params)
    name = f"clic-{method}"
    mv = MlflowClient().get_model_version_by_alias(name, alias)
    # the logged model behind the version: its id, or the source ``models:/<model id>`` of a version
    # registered from a logged model (the sqlite store leaves ``model_id`` empty)
    source = mv.source or ""
    model_id = getattr(mv, "model_id", None) or (
        source[len("models:/"):] if source.startswith("models:/m-") else None)
    tags = {"clic.model": name, "clic.model_version": str(mv.version), "clic.alias": alias,
            "clic.model_run_id": mv.run_id or "", "clic.model_id": model_id or ""}
    with stage_run(params, "evaluate", method, tags=tags) as run:
        mlflow.log_metrics(metrics, model_id=model_id)
        for f in artifacts:
            if f.exists():
                mlflow.log_artifact(str(f), "report")
    return run.info.run_id, str(mv.version)
