"""Prefect for real on loopback: `flows/local.sh up` (server, pool, deployments, worker), a
deployment run to Completed with its MLflow runs, a failing stage that fails the flow run with
the stage's error in the logs, then `down` stops everything by process id."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_pipeline import BIN, _free_port, _runs, make_project

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_deployment_runs_on_a_real_server_and_worker(tmp_path: Path) -> None:
    import shutil

    root = make_project(tmp_path / "proj")
    for item in ("flows", "prefect.yaml"):
        src = REPO / item
        shutil.copytree(src, root / item) if src.is_dir() else shutil.copy(src, root / item)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(CLIC_BIN=str(BIN), PREFECT_PORT=str(port), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PATH=f"{BIN}:{env['PATH']}")
    script = root / "flows" / "local.sh"
    pids: list[int] = []
    try:
        up = subprocess.run([script, "up"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        pids = [int((tmp_path / "prefect" / f"{n}.pid").read_text()) for n in ("server", "worker")]
        assert all(_alive(p) for p in pids)

        def prefect(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
            return subprocess.run([BIN / "prefect", *args], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)

        ok = prefect("deployment", "run", "pretrain/clicv2", "--watch", "--watch-timeout", "540")
        assert "Completed" in ok.stdout, ok.stdout[-3000:] + ok.stderr[-2000:]
        flow_id = re.search(r"UUID: ([0-9a-f-]{36})", ok.stdout).group(1)  # type: ignore[union-attr]
        runs = _runs(root)
        mine = {r.info.run_name: r for r in runs if r.data.tags.get("prefect.flow_run_id") == flow_id}
        assert {"fetch", "validate", "pretrain clicv2", "probe clicv2"} <= set(mine)
        assert all(r.info.status == "FINISHED" for r in mine.values())  # parent run closed too
        artifact = prefect("artifact", "inspect", "pretrain-clicv2")
        assert "SRCC" in artifact.stdout and mine["probe clicv2"].info.run_id in artifact.stdout.replace("\n", "")

        bad = prefect("deployment", "run", "pretrain/moco", "--param",
                      'overrides={"validate.min_rows": 100000}', "--watch", "--watch-timeout", "540")
        assert "Failed" in bad.stdout, bad.stdout[-3000:]
        bad_id = re.search(r"UUID: ([0-9a-f-]{36})", bad.stdout).group(1)  # type: ignore[union-attr]
        logs = prefect("flow-run", "logs", bad_id).stdout
        assert "stage validate failed: validation failed: 1 of" in logs
        statuses = {r.info.run_name: r.info.status for r in _runs(root)
                    if r.data.tags.get("prefect.flow_run_id") == bad_id}
        assert statuses["validate"] == "FAILED" and "RUNNING" not in statuses.values()
    finally:
        down = subprocess.run([script, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0
    assert pids and not any(_alive(p) for p in pids)


def test_workspace_key_isolates_settings(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from flows.workspace import workspace_key

    a = workspace_key("pretrain", "clicv2", "", {"pretrain.clicv2.epochs": 3})
    assert a == workspace_key("pretrain", "clicv2", "", {"pretrain.clicv2.epochs": 3})
    assert a != workspace_key("pretrain", "clicv2", "", {"pretrain.clicv2.epochs": 4})
    assert a != workspace_key("pretrain", "moco", "", {"pretrain.clicv2.epochs": 3})
    assert json.dumps(a).startswith('"pretrain-')


def test_workspace_anchors_relative_corpus_paths(tmp_path: Path) -> None:
    """Stages run inside workspaces/<key>, so a relative pretrain.data must be made absolute."""
    sys.path.insert(0, str(REPO))
    from flows.workspace import _anchor_paths

    params = {"pretrain": {"data": ["../corpus", str(tmp_path / "abs")]}}
    _anchor_paths(params, tmp_path / "project")
    assert params["pretrain"]["data"] == [str(tmp_path / "corpus"), str(tmp_path / "abs")]
    single = {"pretrain": {"data": "photos"}}
    _anchor_paths(single, tmp_path)
    assert single["pretrain"]["data"] == [str(tmp_path / "photos")]
