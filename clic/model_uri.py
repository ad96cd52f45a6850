"""A scorer named by an MLflow URI (``models:/clic-clicv2@champion``, ``runs:/<id>/scorer``), fetched
to a local file: the core's one door to the tracker.

MLflow is imported here only, inside :func:`download`, and only through its public API
(``mlflow.artifacts.download_artifacts``, ``mlflow.environment_variables``): the core runs where
MLflow is not installed, and only loading a URI needs it (``pip install 'clic[pipeline]'``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

SCHEMES = ("models:/", "runs:/")


def is_uri(text: str) -> bool:
    """Whether ``text`` names a model for MLflow to fetch rather than a local file."""
    return "://" in text or text.startswith(SCHEMES)


def fetch_scorer(uri: str) -> Path:
    """The local scorer file of ``uri``: downloaded (:func:`download`), then found inside what came
    (:func:`scorer_file`)."""
    return scorer_file(download(uri), uri)


def scorer_file(local: Path, uri: str) -> Path:
    """The scorer file inside what an MLflow URI downloaded: a file, a folder holding
    ``scorer.pt``, or a logged pyfunc model (its ``MLmodel`` names the ``scorer`` artifact; read as
    YAML data, nothing in it is run)."""
    if local.is_file():
        return local
    if (local / "scorer.pt").is_file():
        return local / "scorer.pt"
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml  # noqa: PLC0415

        try:
            spec = yaml.safe_load(mlmodel.read_text())
            rel = spec["flavors"]["python_function"]["artifacts"]["scorer"]["path"]
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise ValueError(f"{uri}: {mlmodel} names no 'scorer' artifact ({exc!r}); "
                             "not a clic scorer model") from None
        path = (local / rel).resolve()
        if path.is_relative_to(local.resolve()) and path.is_file():
            return path
        raise ValueError(f"{uri}: {mlmodel} names the scorer artifact {rel!r}, which is not a file inside the model")
    raise ValueError(f"{uri}: downloaded to {local}, which holds neither scorer.pt nor an MLflow model (MLmodel)")


def download(uri: str) -> Path:
    """Fetch ``uri`` from MLflow. The store is ``MLFLOW_TRACKING_URI`` (which
    ``mlflow.set_tracking_uri`` also sets) or ``MLFLOW_REGISTRY_URI``, else the project's
    ``./mlflow.db`` when it exists; nothing is created. HTTP calls are bounded (1 retry, 10 s
    timeout unless the MLflow variables say otherwise), and every failure is one ``ValueError``
    naming the URI and the store."""
    try:
        import mlflow  # noqa: PLC0415
        from mlflow.environment_variables import MLFLOW_REGISTRY_URI, MLFLOW_TRACKING_URI  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(f"{uri}: loading a URI needs MLflow (pip install 'clic[pipeline]')") from exc
    tracking = MLFLOW_TRACKING_URI.get() or ""
    if not tracking:
        if not Path("mlflow.db").is_file():
            raise ValueError(f"{uri}: no MLflow store to read it from: set MLFLOW_TRACKING_URI (a tracking server "
                             "such as http://127.0.0.1:5000, or sqlite:////abs/path/mlflow.db), or run from the "
                             "project folder that holds mlflow.db")
        tracking = f"sqlite:///{Path('mlflow.db').resolve()}"
    registry = MLFLOW_REGISTRY_URI.get() or tracking
    store = registry if uri.startswith("models:/") else tracking
    for candidate in {tracking, registry}:
        if candidate.startswith("sqlite:///") and not Path(candidate.removeprefix("sqlite:///")).is_file():
            raise ValueError(f"{uri}: the MLflow store {candidate} does not exist")
        if candidate.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)  # the retry warnings would bury the one error below
    try:
        return Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=tracking, registry_uri=registry))
    except Exception as exc:  # noqa: BLE001 - MLflow, HTTP and SQL errors: one message, no traceback
        text = str(exc).strip()
        errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
        first = errno.group(0) if errno else (text.splitlines() or [type(exc).__name__])[0][:300]
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in first.lower():
            raise ValueError(f"{uri}: no such model in the MLflow store {store} ({first})") from None
        if store.startswith(("http://", "https://")):
            raise ValueError(f"{uri}: the MLflow tracking server {store} is unreachable or failed ({first}); "
                             "start it or point MLFLOW_TRACKING_URI at a running one") from None
        raise ValueError(f"{uri}: cannot load it from the MLflow store {store} ({first})") from None
    finally:
        retries.setLevel(level)
