"""MLflow glue shared by the DVC stages (the core library never imports MLflow).

- Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` in params, else
  ``sqlite:///<project>/mlflow.db`` with artifacts under ``<project>/mlartifacts``.
- One run per stage execution in experiment ``mlflow.experiment``, nested under a parent run per
  pipeline invocation. The invocation is ``CLIC_PIPELINE_ID`` when set (Prefect flows and
  ``make pipeline`` set it), else the ``dvc`` process that launched the stage (pid + start time).
- A stage that raises marks its run and the parent FAILED, never leaves them RUNNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from clic.config import flatten  # noqa: E402
from clic.engine.checkpoint import git_revision  # noqa: E402


def tracking_uri(params: dict[str, Any]) -> str:
    return (os.environ.get("MLFLOW_TRACKING_URI") or (params.get("mlflow") or {}).get("tracking_uri")
            or f"sqlite:///{ROOT / 'mlflow.db'}")


def setup(params: dict[str, Any]) -> str:
    """Point MLflow at the store, check it answers, and return the experiment id."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    name = (params.get("mlflow") or {}).get("experiment", "clic")
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise ValueError(f"MLflow tracking store {uri} is unreachable or unusable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); start the server or unset MLFLOW_TRACKING_URI") from exc
    if exp is not None:
        return exp.experiment_id
    artifacts = Path(os.environ.get("CLIC_ARTIFACT_ROOT") or ROOT / "mlartifacts")
    location = artifacts.as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


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
    run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"clic.invocation": inv, "clic.kind": "pipeline", "git.commit": git_revision(ROOT),
                                  **_prefect_tag()})
    return run.info.run_id


def _prefect_tag() -> dict[str, str]:
    """Link back to the Prefect flow run that launched this stage, if any."""
    fid = os.environ.get("CLIC_PREFECT_FLOW_RUN_ID") or os.environ.get("PREFECT__FLOW_RUN_ID")
    return {"prefect.flow_run_id": fid} if fid else {}


def code_version() -> str:
    """Hash of the package source: a changed method must retrain, not resume."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "clic").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


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
        mlflow.set_tag("clic.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        MlflowClient().set_terminated(parent, "FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def finish_parent(params: dict[str, Any]) -> str:
    """Mark the invocation's parent run FINISHED (the last stage calls this); returns its id."""
    exp = setup(params)
    parent = parent_run(exp)
    MlflowClient().set_terminated(parent, "FINISHED")
    return parent
