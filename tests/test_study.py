"""The study flow (flows/study.py): its grid, and a tiny study for real: a Prefect server and
worker on loopback (`flows/local.sh up`), a real MLflow store, the pipeline's DVC stages. Cancelled
after its first method cell and run again, it finishes without redoing that cell, and its table
equals the one of an uninterrupted study run in a second project; the table read from MLflow equals
the one computed from the cells' own prediction files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import free_port
from .test_pipeline import BIN, make_project

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from flows.study import Cell, Turns, plan, profile_methods, variant_methods  # noqa: E402

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
GRID = ("--param", "name=tiny", "--param", "profile=params.yaml", "--param", 'methods=["moco", "clic"]',
        "--param", "seeds=[0, 1]", "--param", "threads=1")


def test_plan_is_seed_major_with_baselines_first() -> None:
    cells = plan(["moco", "clicv2"], [0, 1], {"recipe": {}, "nomem": {"pretrain.clicv2.clicv2.mem": False}}, True)
    assert [c.key for c in cells] == [
        "recipe-baselines-seed0", "recipe-moco-seed0", "recipe-clicv2-seed0", "nomem-clicv2-seed0",
        "recipe-baselines-seed1", "recipe-moco-seed1", "recipe-clicv2-seed1", "nomem-clicv2-seed1"]
    assert cells[3].overrides == {"pretrain.clicv2.clicv2.mem": False}
    assert cells[0].stages == ["fetch", "validate", "baselines"]
    assert cells[1].stages == ["fetch", "validate", "pretrain@moco", "probe@moco"]
    assert Cell("clic", 2, "final").tags("s") == {"clic.study": "s", "clic.cell": "final-clic-seed2",
                                                  "clic.method": "clic", "clic.seed": "2", "clic.variant": "final"}


def test_variant_methods_and_bad_grids() -> None:
    assert variant_methods({"pretrain.clicv2.clicv2.mem": False}, ["moco", "clic", "clicv2"]) == ["clicv2"]
    assert variant_methods({"pretrain.clic.epochs": 2, "pretrain.moco.epochs": 2}, ["moco", "clic", "clicv2"]) \
        == ["moco", "clic"]
    # a key outside one method's section (the data, the probe, pretrain.common) changes them all
    assert variant_methods({"probe.image_size": 96}, ["moco", "clic"]) == ["moco", "clic"]
    assert variant_methods({"pretrain.common.image_size": 64}, ["moco", "clic"]) == ["moco", "clic"]
    for args, message in [((["mocov3"], [0], {}, True), "methods: expected some of"),
                          ((["moco"], [0, 0], {}, True), "seeds: expected distinct"),
                          ((["moco"], [-1], {}, True), "seeds: expected distinct"),
                          ((["moco"], [0], {"no good": {}}, True), "variants: name 'no good'"),
                          ((["moco"], [0], {"v": [1]}, True), "variants: 'v': expected a mapping")]:
        with pytest.raises(ValueError, match=message):
            plan(*args)


def test_a_variant_can_be_a_params_file_run_for_the_methods_it_changes() -> None:
    """``{"small-budget": "params/small-budget.yaml"}``: its cells run on that file in place of the
    study's profile, for the methods whose resolved settings it changes (all, when the data or the
    probe differ); a file that changes nothing, or is missing, is refused by name."""
    from .test_recipes import CHOSEN

    three = ["moco", "clic", "clicv2"]
    cells = plan(three, [0], {"recipe": {}, "small-budget": "params/small-budget.yaml"}, False,
                 "params/real-photos.yaml")
    changed = [m for m in three if CHOSEN[m]]
    assert [c.key for c in cells] == [f"recipe-{m}-seed0" for m in three] + [f"small-budget-{m}-seed0" for m in changed]
    assert all(c.profile == "" for c in cells[:3])
    assert all(c.profile == "params/small-budget.yaml" and c.overrides == {} for c in cells[3:])
    assert cells[3].tags("s")["clic.profile"] == "params/small-budget.yaml" and "clic.profile" not in cells[0].tags("s")
    assert profile_methods("params.yaml", "params/real-photos.yaml", ["moco", "clic"]) == ["moco", "clic"]
    # an overrides variant for a method the study does not run just has no cells (a params file would be refused)
    assert plan(["clicv2"], [0], {"recipe": {}, "moco-noblur": {"pretrain.moco.views.blur_p": 0.0}}, False,
                "params/real-photos.yaml") == [Cell("clicv2", 0)]
    for variant, message in [("params/real-photos.yaml", "changes none of moco against params/real-photos.yaml"),
                             ("params/nope.yaml", "params file 'params/nope.yaml' not found")]:
        with pytest.raises(ValueError, match=message):
            plan(["moco"], [0], {"v": variant}, False, "params/real-photos.yaml")
    with pytest.raises(ValueError, match="needs the study's profile"):
        plan(["moco"], [0], {"v": "params/small-budget.yaml"}, False)


def test_the_budget_search_variants_each_change_one_setting_of_one_method() -> None:
    """params/budget-search.variants.json (docs/results.md's search): every variant applies to the
    real-photos profile and changes exactly the one setting it names, of the one method it runs."""
    from clic.params import flatten as flat
    from clic.params import load_params, pretrain_config, to_dict

    variants = json.loads((REPO / "params" / "budget-search.variants.json").read_text())
    profile = REPO / "params" / "real-photos.yaml"
    recipe = {m: flat(to_dict(pretrain_config(load_params(profile), m))) for m in ("moco", "clic", "clicv2")}
    cells = plan(["moco", "clic", "clicv2"], [0], variants, baselines=False)
    assert len(cells) == 18 and [c.method for c in cells[:3]] == ["moco", "clic", "clicv2"]
    for cell in cells[3:]:
        (key, value), = cell.overrides.items()
        cfg = flat(to_dict(pretrain_config(load_params(profile, [f"{key}={json.dumps(value)}"]), cell.method)))
        changed = {k for k in cfg if cfg[k] != recipe[cell.method][k]}
        assert changed == {key.split(".", 2)[2]} and cfg[key.split(".", 2)[2]] == value, cell.variant


def test_turns_hand_out_slots_in_plan_order() -> None:
    import random
    import threading

    turns, order = Turns(), []
    lock = threading.Lock()

    def cell(i: int) -> None:
        time.sleep(random.random() / 50)
        with turns.turn(i), lock:
            order.append(i)

    threads = [threading.Thread(target=cell, args=(i,)) for i in reversed(range(12))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert order == list(range(12))

    failing = Turns()  # a cell that fails before its slot still lets the next one go
    with pytest.raises(RuntimeError), failing.turn(0):
        raise RuntimeError("workspace")
    with failing.turn(1):
        assert failing.next == 1


def _project(root: Path) -> Path:
    make_project(root, lambda p: p["data"].update(seed=0))  # one synthetic set for every seed
    for item in ("flows", "prefect.yaml"):
        src = REPO / item
        shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() \
            else shutil.copy(src, root / item)
    return root


def _client(root: Path):  # type: ignore[no-untyped-def]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _stage_runs(root: Path, cell_run: str, stage: str) -> list:
    client = _client(root)
    exp = client.get_experiment_by_name("clic").experiment_id
    return [r for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{cell_run}'")
            if r.data.tags.get("clic.stage") == stage]


def _workers_in(root: Path) -> list[int]:
    """Processes whose working folder is inside ``root``'s workspaces (stages left running)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(root / "workspaces") in os.readlink(proc / "cwd"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _numbers(table: dict) -> dict:
    """The table without the MLflow run ids (which differ between two studies)."""
    return {"rows": {r: {k: v for k, v in s.items() if k != "runs"} for r, s in table["rows"].items()},
            "differences": table["differences"], "images": table["images"]}


def test_clic_study_table_reads_the_store_that_the_params_name(tmp_path: Path) -> None:
    """`clic study table` (the one command of clic/ that reaches stages/) prints the table that
    :func:`stages.study_table.study_table` computes from the same MLflow store: cells of 2 methods x
    2 seeds, each with a finished probe run holding its ``report/predictions.csv``."""
    import numpy as np

    from stages.study_table import study_table

    client = _client(tmp_path)
    exp = client.create_experiment("clic", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    human = rng.uniform(size=30)
    for method in ("moco", "clic"):
        for seed in (0, 1):
            cell = client.create_run(exp, tags={"clic.study": "tiny", "clic.kind": "pipeline", "clic.seed": str(seed),
                                                "clic.cell": f"recipe-{method}-seed{seed}", "clic.method": method})
            probe = client.create_run(exp, tags={"mlflow.parentRunId": cell.info.run_id, "clic.stage": "probe"})
            noise = 0.1 if method == "clic" else 0.4
            pred = human + rng.normal(scale=noise, size=human.size)
            csv = tmp_path / "predictions.csv"
            rows = (f"img{i}.png,{p:.6f},{h:.6f},{'ab'[i % 2]}\n"
                    for i, (p, h) in enumerate(zip(pred, human, strict=True)))
            csv.write_text("name,predicted,human,category\n" + "".join(rows))
            client.log_artifact(probe.info.run_id, str(csv), "report")
            for run in (probe, cell):
                client.set_terminated(run.info.run_id)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run([sys.executable, "-m", "clic.cli", "study", "table", "tiny", "--bootstrap", "50", "--json",
                          str(tmp_path / "t.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| clic - moco |" in out.stdout
    printed = json.loads((tmp_path / "t.json").read_text())
    direct = json.loads(json.dumps(study_table(client, "tiny", n_boot=50)["json"]))
    assert list(printed["rows"]) == ["moco", "clic"] and printed["images"] == 30
    assert printed == direct
    assert printed["rows"]["clic"]["all"]["mean"] > printed["rows"]["moco"]["all"]["mean"]


def test_a_torn_dvc_rwlock_left_by_a_killed_dvc_is_dropped(tmp_path: Path) -> None:
    """A dvc killed while writing ``.dvc/tmp/rwlock`` (a cancelled study) leaves it empty and DVC
    then refuses every command in the workspace; the workspace drops it, and only a torn one."""
    from flows.workspace import drop_torn_rwlock

    subprocess.run([BIN / "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text("")
    torn = subprocess.run([BIN / "dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert torn.returncode != 0 and "RWLock" in torn.stderr + torn.stdout
    assert drop_torn_rwlock(tmp_path) and not rwlock.exists()
    assert subprocess.run([BIN / "dvc", "repro"], cwd=tmp_path, capture_output=True).returncode == 0
    rwlock.write_text('{"read": {}, "write": {}}')
    assert not drop_torn_rwlock(tmp_path) and rwlock.exists()  # a well-formed one is DVC's to judge


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two studies of six cells share two cores
def test_tiny_study_resumes_without_redoing_a_cell_and_its_table_is_mlflows(tmp_path: Path) -> None:
    from clic.evaluation.seed_table import Study, read_folder
    from stages.study_table import cell_runs, study_table

    root, reference = _project(tmp_path / "proj"), _project(tmp_path / "reference")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(CLIC_BIN=str(BIN), PREFECT_PORT=str(port), PREFECT_HOME=str(tmp_path / "prefect"), CLIC_GPU_SLOTS="2",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PATH=f"{BIN}:{env['PATH']}")

    def prefect(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "prefect", *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def state(flow_id: str) -> str:
        return json.loads(prefect("flow-run", "inspect", flow_id, "--output", "json").stdout)["state_type"]

    script = root / "flows" / "local.sh"
    uninterrupted: subprocess.Popen | None = None
    reference_log = (tmp_path / "reference.log").open("w")
    try:
        up = subprocess.run([script, "up"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        # the reference: the same grid in a second project (its own DVC cache and MLflow store),
        # the flow called in-process against the same server, never interrupted
        uninterrupted = subprocess.Popen(
            [sys.executable, "-c", "from flows.study import study; study(name='tiny', profile='params.yaml', "
             "methods=['moco', 'clic'], seeds=[0, 1], threads=1)"],
            cwd=reference, env={**env, "PYTHONPATH": str(reference)}, stdout=subprocess.DEVNULL,
            stderr=reference_log)  # a file: a pipe nobody reads fills, and the flow blocks holding its gpu slots

        started = prefect("deployment", "run", "study/real-photos", *GRID)
        flow_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)  # type: ignore[union-attr]
        first = "recipe-moco-seed0"
        for _ in range(600):  # until the first method cell is closed in MLflow
            done = [r for r in cell_runs(_client(root), "tiny", first) if r.info.status == "FINISHED"]
            if done or state(flow_id) in FINAL:
                break
            time.sleep(1)
        assert done, prefect("flow-run", "logs", flow_id).stdout[-3000:]
        cancel = prefect("flow-run", "cancel", flow_id)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        for _ in range(240):
            if state(flow_id) == "CANCELLED":
                break
            time.sleep(0.5)
        assert state(flow_id) == "CANCELLED"
        for _ in range(60):  # its stages go with it
            if not _workers_in(root):
                break
            time.sleep(0.5)
        assert not _workers_in(root), "stages still running after the flow run was cancelled"
        before = {r.data.tags["clic.cell"]: r.info.run_id for r in cell_runs(_client(root), "tiny")
                  if r.info.status == "FINISHED"}
        assert first in before and len(before) < 6
        encoder = root / "workspaces" / "study-tiny" / first / "models" / "moco" / "encoder.pt"
        stamp = encoder.stat().st_mtime_ns

        again = prefect("deployment", "run", "study/real-photos", *GRID, "--watch", "--watch-timeout", "1500",
                        timeout=1600)
        again_id = re.search(r"UUID: ([0-9a-f-]{36})", again.stdout).group(1)  # type: ignore[union-attr]
        assert state(again_id) == "COMPLETED", prefect("flow-run", "logs", again_id).stdout[-4000:]
        assert encoder.stat().st_mtime_ns == stamp
        client = _client(root)
        runs: dict = {}
        for r in cell_runs(client, "tiny"):  # newest first, as the table reads them
            runs.setdefault(r.data.tags["clic.cell"], r)
        assert set(runs) == {f"recipe-{m}-seed{s}" for m in ("baselines", "moco", "clic") for s in (0, 1)}
        assert all(r.info.status == "FINISHED" for r in runs.values())
        for cell, run_id in before.items():  # a cell done before the cancel: same run, nothing redone
            assert runs[cell].info.run_id == run_id
            stage = "baselines" if "baselines" in cell else "probe"
            assert len(_stage_runs(root, run_id, stage)) == 1, cell
        assert len(_stage_runs(root, before[first], "pretrain")) == 1
        srcc = runs["recipe-clic-seed1"].data.metrics  # the probe's numbers on the cell's run (UI columns)
        assert {"srcc", "pcc"} <= set(srcc)
        assert runs["recipe-clic-seed1"].data.tags["clic.method"] == "clic"
        assert runs["recipe-clic-seed1"].data.tags["mlflow.parentRunId"] == \
            runs["recipe-moco-seed0"].data.tags["mlflow.parentRunId"]  # both under the study's run

        table = study_table(client, "tiny", n_boot=200)["json"]
        assert list(table["rows"]) == ["moco", "clic", "handcrafted", "random_resnet18", "random_vit_tiny"]
        # the same table from the cells' own prediction files, no MLflow
        ws = root / "workspaces" / "study-tiny"
        files = {(m, s): ws / f"recipe-{m}-seed{s}" / "reports" / m / "predictions.csv"
                 for m in ("moco", "clic") for s in (0, 1)}
        files |= {(b, s): ws / f"recipe-baselines-seed{s}" / "reports" / "baselines" / b / "predictions.csv"
                  for b in ("handcrafted", "random_resnet18", "random_vit_tiny") for s in (0, 1)}
        direct = Study(read_folder(files))
        for row in table["rows"]:
            assert {k: v for k, v in table["rows"][row].items() if k != "runs"} == direct.summary(row), (
                row, table["rows"][row]["runs"], [(r.data.tags["clic.cell"], r.info.run_id, r.info.status)
                                                  for r in cell_runs(client, "tiny")])
        assert table["differences"][0] == direct.difference("clic", "moco", 200)
        # published on the study's run and as a Prefect artifact
        parent = runs["recipe-moco-seed0"].data.tags["mlflow.parentRunId"]
        logged = json.loads(Path(client.download_artifacts(parent, "study.json", str(tmp_path))).read_text())
        flows_table = study_table(client, "tiny")["json"]  # the flow's bootstrap: the default 2000 draws
        assert _numbers(logged) == _numbers(json.loads(json.dumps(flows_table)))
        clic_all = table["rows"]["clic"]["all"]["mean"]
        assert client.get_run(parent).data.metrics["clic_srcc_all"] == pytest.approx(clic_all)
        artifact = prefect("artifact", "inspect", "study-tiny").stdout.replace("\n", "").replace(" ", "")
        assert f"runs/{runs['recipe-clic-seed1'].info.run_id}" in artifact and "clic-moco" in artifact
        # `clic study table` prints the same numbers
        out = subprocess.run([BIN / "clic", "study", "table", "tiny", "--bootstrap", "200", "--json",
                              str(tmp_path / "t.json")], cwd=root, capture_output=True, text=True,
                             env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "| clic - moco |" in out.stdout
        assert _numbers(json.loads((tmp_path / "t.json").read_text())) == _numbers(json.loads(json.dumps(table)))

        assert uninterrupted.wait(timeout=1200) == 0, (tmp_path / "reference.log").read_text()[-3000:]
        ref = study_table(_client(reference), "tiny", n_boot=200)["json"]
        assert _numbers(json.loads(json.dumps(ref))) == _numbers(json.loads(json.dumps(table)))
    finally:
        if uninterrupted is not None and uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait(timeout=60)
        reference_log.close()
        down = subprocess.run([script, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0
