"""Isolated workspaces for flow runs (no Prefect imports: plain helpers, unit-testable).

A workspace is a copy of the project's code and params (``clic/``, ``stages/``, ``dvc.yaml``,
``params.yaml``) with the run's overrides applied, under ``workspaces/<flow>-<hash>``, where the
hash covers the flow, method, dataset and overrides. Runs with identical settings share (and
reuse, via DVC's up-to-date checks) one workspace, serialised by a file lock; runs with other
settings get their own, so two concurrent runs can never write the same outputs. All workspaces
share the project's DVC cache and MLflow store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from clic.config import apply_overrides, load_params

ROOT = Path(__file__).resolve().parents[1]
CODE = ("clic", "stages", "dvc.yaml", "params.yaml")


def workspace_key(flow: str, method: str, dataset: str, overrides: dict[str, Any]) -> str:
    blob = json.dumps([flow, method, dataset, overrides], sort_keys=True, default=str)
    return f"{flow}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def workspace(flow: str, method: str = "", dataset: str = "", overrides: dict[str, Any] | None = None,
              root: Path = ROOT) -> Iterator[Path]:
    """Create or refresh the workspace and hold its lock for the duration of the block."""
    overrides = dict(overrides or {})
    if dataset:
        overrides.setdefault("data.source", dataset)
    params = apply_overrides(load_params(root / "params.yaml"), _flat_items(overrides))
    load_check(params, method)
    _anchor_paths(params, root)
    ws = root / "workspaces" / workspace_key(flow, method, dataset, overrides)
    ws.mkdir(parents=True, exist_ok=True)
    with (ws / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for item in CODE:
            src, dst = root / item, ws / item
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dst)
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if not (ws / ".dvc").is_dir():
            subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=ws, check=True)
        shared_cache = root / ".dvc" / "cache"
        shared_cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(shared_cache)],
                       cwd=ws, check=True)
        yield ws


def _anchor_paths(params: dict[str, Any], root: Path) -> None:
    """Make relative ``pretrain.data`` entries absolute: they are written relative to the project
    root, and the stages run inside ``workspaces/<key>``, where they would point elsewhere."""
    data = (params.get("pretrain") or {}).get("data")
    if data:
        params["pretrain"]["data"] = [str(p) if Path(p).is_absolute() else str((root / p).resolve())
                                      for p in ([data] if isinstance(data, str) else data)]


def _flat_items(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]


def load_check(params: dict[str, Any], method: str) -> None:
    """Fail before any work when the overrides make the params invalid."""
    from clic.config import data_config, pretrain_config, probe_config

    data_config(params)
    probe_config(params)
    if method:
        pretrain_config(params, method)


def stage_env(root: Path, flow_run_id: str) -> dict[str, str]:
    """Environment for the stage commands: the project's MLflow store, grouped per flow run."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env["CLIC_PIPELINE_ID"] = f"prefect-{flow_run_id}"
    env["CLIC_PREFECT_FLOW_RUN_ID"] = flow_run_id
    env["CLIC_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env
