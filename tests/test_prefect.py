"""Prefect for real on loopback: `flows/local.sh up` (server, pool, deployments, worker), a
deployment run to Completed with its MLflow runs, a failing stage that fails the flow run with
the stage's error in the logs, then `down` stops everything by process id."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import free_port, wait_http
from .test_pipeline import BIN, _runs, make_project

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
HOLD_GPU = """import pathlib, sys, time
from prefect.concurrency.sync import concurrency
with concurrency("gpu", occupy=1, strict=True):
    pathlib.Path(sys.argv[1]).write_text("held")
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.2)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _state(prefect, flow_id: str) -> str:  # type: ignore[no-untyped-def]
    return json.loads(prefect("flow-run", "inspect", flow_id, "--output", "json").stdout)["state_type"]


def test_deployment_runs_on_a_real_server_and_worker(tmp_path: Path) -> None:
    import shutil

    root = make_project(tmp_path / "proj")
    for item in ("flows", "prefect.yaml"):
        src = REPO / item
        shutil.copytree(src, root / item) if src.is_dir() else shutil.copy(src, root / item)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(CLIC_BIN=str(BIN), PREFECT_PORT=str(port), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PATH=f"{BIN}:{env['PATH']}")
    script = root / "flows" / "local.sh"
    pids: list[int] = []
    holder: subprocess.Popen | None = None
    mlflow_ui: subprocess.Popen | None = None
    try:
        up = subprocess.run([script, "up"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        # the MLflow UI as a user starts it, on another port than the default
        for item in ("Makefile", "pyproject.toml", "requirements/lock.txt"):
            (root / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / item, root / item)  # mtimes kept: make sees the venv as up to date
        ui_port = free_port()
        # -o: never (re)install into the venv the tests run from, even when pyproject.toml is newer
        mlflow_ui = subprocess.Popen(["make", "-s", "-o", f"{BIN.parent}/.installed", "mlflow-ui",
                                      f"VENV={BIN.parent}", f"MLFLOW_PORT={ui_port}"],
                                     cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_http(f"http://127.0.0.1:{ui_port}/health", mlflow_ui)
        url, ui_pid = (root / ".mlflow-ui").read_text().split()
        assert url == f"http://127.0.0.1:{ui_port}" and _alive(int(ui_pid))
        pids = [int((tmp_path / "prefect" / f"{n}.pid").read_text()) for n in ("server", "worker")]
        assert all(_alive(p) for p in pids)

        def prefect(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
            return subprocess.run([BIN / "prefect", *args], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)

        # another holder has the only gpu slot: the run logs that it waits, then runs once it is free
        held, release = tmp_path / "held", tmp_path / "release"
        holder = subprocess.Popen([sys.executable, "-c", HOLD_GPU, str(held), str(release)], env=env)
        for _ in range(300):
            if held.exists() or holder.poll() is not None:
                break
            time.sleep(0.2)
        assert held.exists(), "could not take the gpu slot"
        started = prefect("deployment", "run", "pretrain/clicv2", "--param", 'overrides={"checkpoint_every": 3}')
        flow_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)  # type: ignore[union-attr]
        logs = ""
        for i in range(150):
            logs = prefect("flow-run", "logs", flow_id).stdout
            if "waiting for a gpu slot" in logs or (i % 10 == 9 and _state(prefect, flow_id) in FINAL):
                break
            time.sleep(1)
        assert "waiting for a gpu slot" in logs and "Running stage 'pretrain@clicv2'" not in logs, logs[-3000:]
        release.write_text("")
        holder.wait(timeout=60)
        released = datetime.datetime.now()
        state = ""
        for _ in range(1080):
            state = _state(prefect, flow_id)
            if state in FINAL:
                break
            time.sleep(0.5)
        assert state == "COMPLETED", prefect("flow-run", "logs", flow_id).stdout[-3000:]
        logs = prefect("flow-run", "logs", flow_id).stdout
        assert "got a gpu slot after" in logs and re.search(r"clic\.pretrain: epoch 0: loss", logs), logs[-3000:]
        got = re.search(r"^(\S+ \S+) .*got a gpu slot after", logs, re.M).group(1)  # type: ignore[union-attr]
        gap = (datetime.datetime.fromisoformat(got) - released).total_seconds()
        assert gap < 5, f"the gpu slot sat idle {gap:.1f} s"  # polled each second, not after a back-off
        # each refused poll (HTTP 423 while the limit is full) is not an ERROR line in the worker's log
        assert "failed to process item" not in (tmp_path / "prefect" / "worker.log").read_text()
        for noise in ("Skipping registering function", "dvc push", "\n[]\n"):
            assert noise not in logs, noise
        ws = next(p for p in (root / "workspaces").glob("pretrain-*") if (p / "models" / "clicv2").is_dir())
        params = yaml.safe_load((ws / "params.yaml").read_text())
        assert params["pretrain"]["clicv2"]["checkpoint_every"] == 3 and "checkpoint_every" not in params

        runs = _runs(root)
        mine = {r.info.run_name: r for r in runs if r.data.tags.get("prefect.flow_run_id") == flow_id}
        assert {"flow pretrain/clicv2", "pretrain clicv2", "fetch", "validate", "probe clicv2"} <= set(mine)
        assert all(r.info.status == "FINISHED" for r in mine.values())  # parent run closed too
        parent = next(r for r in mine.values() if r.data.tags.get("clic.kind") == "pipeline")
        assert parent.info.run_name == "flow pretrain/clicv2"  # named apart from its stage run
        assert parent.data.metrics["clicv2_srcc"] == mine["probe clicv2"].data.metrics["srcc"]
        import mlflow

        exp = mlflow.MlflowClient().get_experiment_by_name("clic")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        artifact = prefect("artifact", "inspect", "pretrain-clicv2").stdout.replace("\n", "")
        assert "SRCC" in artifact and "RUNNING" not in artifact
        # links go to the UI that `make mlflow-ui` started (its port, not 5000), in the training view
        ui = f"http://127.0.0.1:{ui_port}/#/experiments/{exp.experiment_id}"
        flat = artifact.replace(" ", "")
        assert f"[flowpretrain/clicv2]({ui}/runs/{parent.info.run_id}?workflowType=machine_learning)|flow(parent)" \
            in flat, artifact[-2000:]
        stage = mine["pretrain clicv2"].info.run_id
        assert f"[pretrainclicv2]({ui}/runs/{stage}?workflowType=machine_learning)|stage" in flat
        assert f"({ui}?workflowType=machine_learning)" in flat

        ev = prefect("deployment", "run", "evaluate/all", "--param", 'methods=["clicv2"]', "--watch",
                     "--watch-timeout", "400")
        ev_id = re.search(r"UUID: ([0-9a-f-]{36})", ev.stdout).group(1)  # type: ignore[union-attr]
        assert "Completed" in ev.stdout, ev.stdout[-2000:] + prefect("flow-run", "logs", ev_id).stdout[-3000:]
        ev_runs = {r.info.run_name: r for r in _runs(root) if r.data.tags.get("prefect.flow_run_id") == ev_id}
        scored = ev_runs["evaluate clicv2"]  # the re-probe's metrics, linked to the model version it scored
        assert scored.data.tags["clic.model"] == "clic-clicv2" and scored.data.tags["clic.model_version"] == "1"
        assert ev_runs["flow evaluate"].data.metrics["clicv2_srcc"] == scored.data.metrics["srcc"]
        model = mlflow.MlflowClient().get_logged_model(scored.data.tags["clic.model_id"])
        assert any(m.key == "srcc" and m.run_id == scored.info.run_id for m in model.metrics)
        assert all(r.info.status == "FINISHED" for r in ev_runs.values())

        unknown = prefect("deployment", "run", "pretrain/moco", "--param", 'overrides={"epochz": 1}', "--watch",
                          "--watch-timeout", "300")
        assert "Failed" in unknown.stdout, unknown.stdout[-3000:]
        unknown_id = re.search(r"UUID: ([0-9a-f-]{36})", unknown.stdout).group(1)  # type: ignore[union-attr]
        unknown_logs = prefect("flow-run", "logs", unknown_id).stdout
        assert "overrides: 'epochz': pretrain.moco.epochz: unknown key" in unknown_logs, unknown_logs[-2000:]

        bad = prefect("deployment", "run", "pretrain/moco", "--param",
                      'overrides={"validate.min_rows": 100000}', "--watch", "--watch-timeout", "540")
        assert "Failed" in bad.stdout, bad.stdout[-3000:]
        bad_id = re.search(r"UUID: ([0-9a-f-]{36})", bad.stdout).group(1)  # type: ignore[union-attr]
        logs = prefect("flow-run", "logs", bad_id).stdout
        assert "stage validate failed: validation failed: 1 of" in logs
        bad_runs = {r.info.run_name: r for r in _runs(root) if r.data.tags.get("prefect.flow_run_id") == bad_id}
        statuses = {n: r.info.status for n, r in bad_runs.items()}
        assert statuses["validate"] == "FAILED" and "RUNNING" not in statuses.values()
        for name in ("validate", "flow pretrain/moco"):  # the stage's run and the parent run
            error = mlflow.artifacts.load_text(f"runs:/{bad_runs[name].info.run_id}/error.txt")
            assert "validation failed: 1 of" in error, error[:500]
    finally:
        if mlflow_ui is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(mlflow_ui.pid, signal.SIGTERM)
            mlflow_ui.wait(timeout=60)
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
        down = subprocess.run([script, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0
    assert pids and not any(_alive(p) for p in pids)


HOLD_AND_HANG = """import pathlib, sys, time
from prefect.concurrency.sync import concurrency
with concurrency("gpu", occupy=1, lease_duration=60, max_retries=0):
    pathlib.Path(sys.argv[1]).write_text("held")
    time.sleep(3600)
"""


def test_a_slot_held_across_a_server_restart_is_freed_when_its_holder_is_gone(tmp_path: Path) -> None:
    """A cell holds the only gpu slot, the server stops (`down`, a reboot), the cell's process dies with
    it; after `up` the slot comes back once the dead holder's lease expires. With Prefect's default
    in-memory lease storage the restarted server had no lease to expire and the slot stayed taken: every
    later run waited for it forever (seen when the budget search was resumed)."""
    import shutil

    root = tmp_path / "proj"
    root.mkdir()
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(CLIC_BIN=str(BIN), PREFECT_PORT=str(port), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PATH=f"{BIN}:{env['PATH']}", CLIC_GPU_SLOTS="1")
    script = root / "flows" / "local.sh"

    def local(cmd: str) -> None:
        res = subprocess.run([script, cmd], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    def active_slots() -> int:
        out = subprocess.run([BIN / "prefect", "gcl", "inspect", "gpu", "--output", "json"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return int(json.loads(out.stdout)["active_slots"])

    holders: list[subprocess.Popen] = []

    def hold(name: str) -> None:  # a holder that takes the slot and hangs; returns once it holds it
        held, err = tmp_path / name, tmp_path / f"{name}.err"
        with err.open("w") as fh:
            holders.append(subprocess.Popen([sys.executable, "-c", HOLD_AND_HANG, str(held)], env=env,
                                            stdout=subprocess.DEVNULL, stderr=fh))
        for _ in range(300):
            if held.exists() or holders[-1].poll() is not None:
                break
            time.sleep(0.2)
        assert held.exists(), err.read_text()[-3000:]

    try:
        local("up")
        hold("held")
        assert active_slots() == 1
        local("down")
        holders[0].kill()  # the holder dies while the server is down
        holders[0].wait(timeout=30)
        local("up")
        assert active_slots() == 1  # the lease came back with the server: the slot is not freed early
        slots = 1
        # the lease (60 s: the least Prefect takes, and the pipeline's) expires; the repossessor (every 15 s)
        # frees its slot
        for _ in range(75):
            slots = active_slots()
            if slots == 0:
                break
            time.sleep(2)
        assert slots == 0, "the dead holder's slot was never freed after the restart"
        hold("again")
        assert active_slots() == 1
    finally:
        for h in holders:
            if h.poll() is None:
                h.kill()
                h.wait(timeout=30)
        local("down")


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

    params = {"pretrain": {"data": ["../corpus", str(tmp_path / "abs"), "https://host/c/index.shards.json"]}}
    _anchor_paths(params, tmp_path / "project")
    assert params["pretrain"]["data"] == [str(tmp_path / "corpus"), str(tmp_path / "abs"),
                                          "https://host/c/index.shards.json"]
    single = {"pretrain": {"data": "photos"}}
    _anchor_paths(single, tmp_path)
    assert single["pretrain"]["data"] == [str(tmp_path / "photos")]


def test_overrides_accept_method_relative_keys_and_refuse_unknown_ones() -> None:
    sys.path.insert(0, str(REPO))
    from clic.params import load_params
    from flows.workspace import resolve_overrides

    params = load_params(REPO / "params.yaml")
    assert resolve_overrides({"epochs": 1, "image_size": 32, "probe.bootstrap": 5}, "clicv2", params) == {
        "pretrain.clicv2.epochs": 1, "pretrain.clicv2.image_size": 32, "probe.bootstrap": 5}
    assert resolve_overrides({"pretrain.clicv2.epochs": 1}, "", params) == {"pretrain.clicv2.epochs": 1}
    # fields params.yaml does not list are known too (the schema, not the file, decides)
    assert resolve_overrides({"rcm.mode": "authors", "max_images": 8}, "clic", params) == {
        "pretrain.clic.rcm.mode": "authors", "pretrain.clic.max_images": 8}
    with pytest.raises(ValueError, match=r"'epochz'.*pretrain\.moco\.epochz.*epochs.*relative to pretrain.moco"):
        resolve_overrides({"epochz": 1}, "moco", params)
    with pytest.raises(ValueError, match=r"'epochs'.*method-relative keys .* pretrain runs only"):
        resolve_overrides({"epochs": 1}, "", params)  # pipeline/evaluate: no method to be relative to
    with pytest.raises(ValueError, match=r"'validate.min_rowz'.*min_rows"):
        resolve_overrides({"validate.min_rowz": 1}, "", params)
    with pytest.raises(ValueError, match=r"'epochs'.*expected int"):
        resolve_overrides({"epochs": "many"}, "clicv2", params)
    with pytest.raises(ValueError, match=r"expected a mapping .* got str"):
        resolve_overrides("epochs=1", "clicv2", params)
    # one key reached twice (relative and full) with different values is refused, not resolved silently
    with pytest.raises(ValueError, match=r"'pretrain.clicv2.epochs' and 'epochs' both set pretrain.clicv2.epochs"):
        resolve_overrides({"epochs": 1, "pretrain.clicv2.epochs": 2}, "clicv2", params)
    assert resolve_overrides({"epochs": 2, "pretrain.clicv2.epochs": 2}, "clicv2", params) == {
        "pretrain.clicv2.epochs": 2}


def test_stage_output_lines_drop_redraws_and_noise() -> None:
    sys.path.insert(0, str(REPO))
    from flows.pipeline import clean_line

    assert clean_line(b"\repoch 0:  10%|#  | 1/10\repoch 0: 100%|###| 10/10\n") == "epoch 0: 100%|###| 10/10"
    assert clean_line(b"2026 INFO clic.pretrain: epoch 3: loss 1.2\n") == "2026 INFO clic.pretrain: epoch 3: loss 1.2"
    for noise in (b"INFO great_expectations._docs_decorators: Skipping registering function x because it is a\n",
                  b"[]\n", b"Use `dvc push` to send your updates to remote storage.\n", b"\r\n", b"   \n",
                  b"INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring system metrics.\n"):
        assert clean_line(noise) is None, noise


def test_prune_keeps_the_newest_workspaces_per_flow(tmp_path: Path) -> None:
    import fcntl

    sys.path.insert(0, str(REPO))
    from flows.workspace import prune_workspaces

    for i, name in enumerate(["pretrain-a", "pretrain-b", "pretrain-c", "pretrain-d", "pipeline-a"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big").write_bytes(b"x" * 10)
        (tmp_path / name / ".lock").touch()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    with (tmp_path / "pretrain-a" / ".lock").open("a") as held:  # a running flow holds the oldest one
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = prune_workspaces(tmp_path, "pretrain", 2)
    assert sorted(p.name for p in removed) == ["pretrain-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline-a", "pretrain-a", "pretrain-c", "pretrain-d"]
    assert [p.name for p in prune_workspaces(tmp_path, "pretrain", 1, keep=tmp_path / "pretrain-a")] == [
        "pretrain-d", "pretrain-c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline-a", "pretrain-a"]
