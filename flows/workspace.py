"""Isolated workspaces for flow runs (no Prefect imports: plain helpers, unit-testable).

A workspace, ``workspaces/<flow>-<hash of flow, method, dataset, overrides>``, is a copy of the
project's code and params with the run's overrides applied; runs with the same settings share it
under a file lock, others never write the same outputs. All share the DVC cache and MLflow store.
Overrides and pruning (``CLIC_KEEP_WORKSPACES``): docs/usage.md, "Prefect".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from clic.config import ParamError
from clic.data.shards import is_url
from clic.params import TOP_LEVEL, Params, apply_overrides, load_params

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CODE = ("clic", "stages", "dvc.yaml", "params.yaml")


def workspace_key(flow: str, method: str, dataset: str, overrides: dict[str, Any]) -> str:
    blob = json.dumps([flow, method, dataset, overrides], sort_keys=True, default=str)
    return f"{flow}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def workspace(flow: str, method: str = "", dataset: str = "", overrides: dict[str, Any] | None = None,
              root: Path = ROOT, profile: str = "params.yaml", path: Path | None = None) -> Iterator[Path]:
    """Create or refresh the workspace and hold its lock for the duration of the block.
    ``profile``: the params file the workspace starts from (``params/real-photos.yaml``; relative
    to ``root``); ``path``: the workspace's folder (a study cell's), else one keyed by the settings
    among the flow's others, the oldest of which are pruned."""
    base = load_params(root / profile)
    overrides = resolve_overrides(overrides or {}, method, base)
    if dataset:
        overrides.setdefault("data.source", dataset)
    params = apply_overrides(base, [_item(k, v) for k, v in overrides.items()])
    load_check(params, method)
    tree = params.tree
    _anchor_paths(tree, root)
    key = workspace_key(flow, method, dataset, overrides if profile == "params.yaml" else {**overrides, "": profile})
    ws = path or root / "workspaces" / key
    ws.mkdir(parents=True, exist_ok=True)
    with (ws / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.utime(ws)  # newest first when pruning
        if path is None:
            prune_workspaces(root / "workspaces", flow, keep_count(), keep=ws)
        for item in CODE:
            src, dst = root / item, ws / item
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dst)
        (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        if not (ws / ".dvc").is_dir():
            subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=ws, check=True)
        shared_cache = root / ".dvc" / "cache"
        shared_cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(shared_cache)],
                       cwd=ws, check=True)
        drop_torn_rwlock(ws)
        yield ws


def drop_torn_rwlock(ws: Path) -> bool:
    """Remove DVC's ``.dvc/tmp/rwlock`` when it does not parse: a ``dvc`` killed while writing it
    (a cancelled flow run) leaves it empty, and every later ``dvc repro`` in the folder then stops
    with "Unable to read RWLock-file ... JSON structure is corrupted". The caller holds the
    workspace's lock, so no other DVC of ours is using the file; a well-formed one is DVC's to
    judge (it names the processes that hold it). Returns whether one was removed."""
    rwlock = ws / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(rwlock.read_text())
        return False
    except FileNotFoundError:
        return False
    except ValueError:
        rwlock.unlink()
        log.warning("%s: removed DVC's torn read/write lock file (left by a killed dvc)", rwlock)
        return True


def _anchor_paths(params: dict[str, Any], root: Path) -> None:
    """Make the relative paths of inputs absolute (``pretrain.data`` entries, ``data.path``,
    ``data.csv``): they are written relative to the project root, and the
    stages run inside ``workspaces/<key>``, where they would point elsewhere. Outputs stay inside
    the workspace."""
    def anchor(p: Any) -> str:
        return str(p) if not p or is_url(str(p)) or Path(p).is_absolute() else str((root / p).resolve())

    data = (params.get("pretrain") or {}).get("data")
    if data:
        params["pretrain"]["data"] = [anchor(p) for p in ([data] if isinstance(data, str) else data)]
    for key in ("path", "csv"):
        if (params.get("data") or {}).get(key):
            params["data"][key] = anchor(params["data"][key])


def _item(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML


def resolve_overrides(overrides: Any, method: str, params: Params) -> dict[str, Any]:
    """Full dotted keys for the overrides, checked against the params schema (every field the
    code knows, whether or not ``params.yaml`` lists it); ``ValueError`` naming a key that is
    unknown or a value of the wrong type. A key relative to the method's section counts for a
    ``pretrain`` run (``epochs`` -> ``pretrain.<method>.epochs``)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides: expected a mapping of params.yaml keys to values, e.g. "
                         f'{{"pretrain.clicv2.epochs": 1}}, got {type(overrides).__name__} {overrides!r}')
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # full key -> the key as given
    for key, value in overrides.items():
        full = key if key.split(".")[0] in TOP_LEVEL or not method else f"pretrain.{method}.{key}"
        if full in out and out[full] != value:
            raise ValueError(f"overrides: {key!r} and {given[full]!r} both set {full} ({value!r} and "
                             f"{out[full]!r}); give it once")
        out[full], given[full] = value, key
    items = [_item(k, v) for k, v in out.items()]
    try:
        apply_overrides(params, items)
    except ParamError as exc:  # named by the key as given (not as --set), with the hint for method-relative keys
        key = next((given[f] for f in out if re.match(rf"{re.escape(f)}($|[.\[])", exc.key)), "")
        exc = ParamError(exc.key, next((exc.template.removeprefix(f"--set {i!r}: ") for i in items
                                        if exc.template.startswith(f"--set {i!r}: ")), exc.template))
        hint = (f" (keys may also be relative to pretrain.{method}, e.g. 'epochs')" if method else
                "; method-relative keys such as 'epochs' are for pretrain runs only")
        raise ValueError(f"overrides: {key!r}: {exc}{hint}" if key else f"overrides: {exc}") from None
    return out


def keep_count() -> int:
    raw = os.environ.get("CLIC_KEEP_WORKSPACES", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"CLIC_KEEP_WORKSPACES={raw!r}: expected a whole number >= 1")
    return int(raw)


def prune_workspaces(folder: Path, flow: str, count: int, keep: Path | None = None) -> list[Path]:
    """Remove all but the ``count`` most recently used workspaces of ``flow`` (never ``keep``, nor
    one whose lock another run holds); returns the removed ones."""
    others = sorted((p for p in folder.glob(f"{flow}-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for old in others[max(count - (keep is not None), 0):]:
        with (old / ".lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a running flow
            shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def load_check(params: Params, method: str) -> None:
    """Fail before any work when the overrides make the params invalid."""
    from clic.methods import names
    from clic.params import data_config, pretrain_config, probe_config, transfer_config

    data_config(params)
    probe_config(params)
    transfer_config(params)
    for m in [method] if method else names():
        pretrain_config(params, m)


def stage_env(root: Path, flow_run_id: str, run_name: str = "") -> dict[str, str]:
    """Environment for the stage commands: the project's MLflow store, one parent run per flow run
    named ``run_name``, unbuffered output (streamed into the flow's logs as it comes)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if run_name:
        env["CLIC_RUN_NAME"] = run_name
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env["CLIC_PIPELINE_ID"] = f"prefect-{flow_run_id}"
    env["CLIC_PREFECT_FLOW_RUN_ID"] = flow_run_id
    env["CLIC_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env
