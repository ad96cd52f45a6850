"""MLflow glue shared by the DVC stages (the core library never imports MLflow).

- Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` in params, else
  ``sqlite:///<project>/mlflow.db`` with artifacts under ``<project>/mlartifacts``.
- One run per stage execution in experiment ``mlflow.experiment``, nested under a parent run per
  pipeline invocation. The invocation is ``CLIC_PIPELINE_ID`` when set (Prefect flows and
  ``make pipeline`` set it), else the ``dvc`` process that launched the stage (pid + start time).
- The parent run is named by what the invocation is (``CLIC_RUN_NAME``: ``pretrain clicv2``,
  ``evaluate``; ``pipeline`` by default) and carries each method's key metrics
  (``<method>_pcc``, ``<method>_srcc``, ``<method>_<dataset>_top1``) so the runs list shows them.
- The experiment is tagged as model training (``mlflow.experimentKind``), so the MLflow 3 UI opens
  on its runs rather than on the GenAI traces view.
- A stage that raises marks its run and the parent FAILED, never leaves them RUNNING, and logs the
  error text as the artifact ``error.txt``.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from clic.engine.checkpoint import code_version, git_revision  # noqa: E402
from clic.params import flatten, mlflow_config  # noqa: E402

EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI: training runs vs GenAI traces
KEY_METRICS = ("pcc", "srcc")  # with every ``<dataset>_top1``: copied onto the parent run


def tracking_uri(params: dict[str, Any]) -> str:
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
    try:
        url, pid = (project / UI_FILE).read_text().split()
        os.kill(int(pid), 0)  # raises when that UI has stopped
        return url.rstrip("/")
    except (OSError, ValueError):
        pass
    tracking = tracking or os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):
        return tracking.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}"


def ui_link(path: str, tracking: str = "") -> str:
    """``path`` (``experiments/1/runs/<id>``, ``models/clic-clicv2/versions/3``) in the MLflow UI,
    in its training (not GenAI) view."""
    return f"{ui_url(tracking)}/#/{path}?{TRAINING_VIEW}"


def setup(params: dict[str, Any]) -> str:
    """Point MLflow at the store, check it answers, and return the experiment id."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    name = mlflow_config(params).experiment
    client = MlflowClient()
    kind = {EXPERIMENT_KIND: "custom_model_development"}
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise ValueError(f"MLflow tracking store {uri} is unreachable or unusable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); start the server or unset MLFLOW_TRACKING_URI") from exc
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND) != kind[EXPERIMENT_KIND]:  # stores made before the tag
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, kind[EXPERIMENT_KIND])
        return exp.experiment_id
    artifacts = Path(os.environ.get("CLIC_ARTIFACT_ROOT") or ROOT / "mlartifacts")
    location = artifacts.as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=kind)
    except mlflow.exceptions.MlflowException:  # a concurrent stage created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _proc_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def invocation_id() -> str:
    """Identity of the pipeline invocation this stage belongs to."""
    if os.environ.get("CLIC_PIPELINE_ID"):
        return os.environ["CLIC_PIPELINE_ID"]
    pid = os.getppid()
    for _ in range(6):  # walk up to the dvc process that runs the stage commands
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
            if "dvc" in [Path(a.decode(errors="replace")).name for a in argv]:
                return f"dvc-{pid}-{_proc_start(pid)}"
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return f"proc-{os.getpid()}-{_proc_start(os.getpid())}"


def parent_run(experiment_id: str) -> str:
    inv = invocation_id()
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`clic.invocation` = '{inv}' and tags.`clic.kind` = 'pipeline'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=os.environ.get("CLIC_RUN_NAME") or "pipeline",
                            tags={"clic.invocation": inv, "clic.kind": "pipeline", "git.commit": git_revision(ROOT),
                                  **_prefect_tag()})
    return run.info.run_id


def _prefect_tag() -> dict[str, str]:
    """Link back to the Prefect flow run that launched this stage, if any."""
    fid = os.environ.get("CLIC_PREFECT_FLOW_RUN_ID") or os.environ.get("PREFECT__FLOW_RUN_ID")
    return {"prefect.flow_run_id": fid} if fid else {}


@contextlib.contextmanager
def stage_run(params: dict[str, Any], stage: str, method: str = "", config: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage execution, nested in the invocation's parent run."""
    exp = setup(params)
    parent = parent_run(exp)
    run_tags = {"mlflow.parentRunId": parent, "clic.stage": stage, "clic.kind": "stage",
                "git.commit": git_revision(ROOT), "clic.code_version": code_version(),
                "dvc.stage": f"{stage}@{method}" if method else stage, **(tags or {})}
    if method:
        run_tags["clic.method"] = method
    run_tags.update(_prefect_tag())
    run = mlflow.start_run(experiment_id=exp, run_name=f"{stage} {method}".strip(), tags=run_tags,
                           log_system_metrics=True)
    try:
        if config:
            mlflow.log_dict(config, "config.yaml")  # the resolved config, as one readable artifact
            flat = {k: (str(v)[:500] if v is not None else "") for k, v in flatten(config).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
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
        _copy_key_metrics(run.info.run_id, parent, method)
        mlflow.end_run("FINISHED")


def _copy_key_metrics(run_id: str, parent: str, method: str) -> None:
    """``pcc``/``srcc``/``<dataset>_top1`` of a method's stage onto the parent as ``<method>_<key>``."""
    if not method:
        return
    metrics = MlflowClient().get_run(run_id).data.metrics
    keep = {f"{method}_{k}": v for k, v in metrics.items() if k in KEY_METRICS or k.endswith("_top1")}
    if keep:
        mlflow.log_metrics(keep, run_id=parent)


def finish_parent(params: dict[str, Any]) -> str:
    """Mark the invocation's parent run FINISHED (the last stage calls this); returns its id."""
    exp = setup(params)
    parent = parent_run(exp)
    MlflowClient().set_terminated(parent, "FINISHED")
    return parent


def log_evaluation(params: dict[str, Any], method: str, alias: str, metrics: dict[str, float],
                   artifacts: list[Path]) -> tuple[str, str]:
    """A child run ``evaluate <method>`` for a re-probed registered scorer ``clic-<method>@<alias>``:
    its metrics linked to the model version (tags, and MLflow 3's ``model_id`` so they also show on
    the logged model's page). Returns (run id, model version)."""
    setup(params)
    name = f"clic-{method}"
    mv = MlflowClient().get_model_version_by_alias(name, alias)
    # the logged model behind the version: its id, or the source ``models:/<model id>`` of a version
    # registered from a logged model (the sqlite store leaves ``model_id`` empty)
    model_id = getattr(mv, "model_id", None) or (mv.source[len("models:/"):] if (mv.source or "").startswith(
        "models:/m-") else None)
    tags = {"clic.model": name, "clic.model_version": str(mv.version), "clic.alias": alias,
            "clic.model_run_id": mv.run_id or "", "clic.model_id": model_id or ""}
    with stage_run(params, "evaluate", method, tags=tags) as run:
        mlflow.log_metrics(metrics, model_id=model_id)
        for f in artifacts:
            if f.exists():
                mlflow.log_artifact(str(f), "report")
    return run.info.run_id, str(mv.version)
