"""End to end: `dvc repro` on tiny params in a temporary copy of the project, MLflow read back
through a real server on loopback, and the pipeline's failure modes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import REPO, free_port, wait_http

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "CLIC_PIPELINE"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def make_project(root: Path, tweak=None) -> Path:  # type: ignore[no-untyped-def]
    for item in ("clic", "stages", "dvc.yaml", "params.yaml"):
        src = REPO / item
        (shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy(src, root / item))
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"]["synthetic"].update(n_train=48, n_test=24, size=48, n_class_train=6, n_class_val=3)
    p["pretrain"]["common"].update(batch_size=16, image_size=32, num_workers=0)
    for m in ("moco", "clic", "clicv2"):
        p["pretrain"][m]["epochs"] = 1
    p["pretrain"]["common"]["moco"]["queue_size"] = 16
    p["pretrain"]["clicv2"]["depth"] = 1
    p["probe"].update(bootstrap=20, workers=1)
    p["transfer"]["epochs"] = 3
    if tweak:
        tweak(p)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "-q", "--no-scm"], cwd=root, check=True, env=_env())
    return root


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([BIN / "dvc", *args], cwd=root, capture_output=True, text=True, timeout=1500, env=_env())
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"))
    dvc(root, "repro")
    return root


def _runs(root: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["clic"], output_format="list")


def test_repro_writes_metrics_runs_and_models(project: Path) -> None:
    for m in ("moco", "clic", "clicv2"):
        metrics = json.loads((project / "metrics" / f"{m}.json").read_text())
        assert {"pcc", "srcc", "krcc", "rmse", "synthetic_top1"} <= set(metrics)
        assert -1 <= metrics["srcc"] <= 1 and 0 <= metrics["synthetic_top1"] <= 1 and metrics["n"] == 24
        assert (project / "reports" / m / "scatter.png").exists() and (project / "models" / m / "encoder.pt").exists()
    table = (project / "metrics" / "comparison.md").read_text().splitlines()
    assert table[0].startswith("Smoke run on synthetic shapes") and "docs/results.md" in table[0] and not table[1]
    assert len(table) == 2 + 2 + 6  # the smoke line, a blank, header, rule, 3 methods, 2 random encoders, hand-crafted
    assert json.loads((project / "metrics" / "validation.json").read_text())["success"] is True
    runs = _runs(project)
    parents = [r for r in runs if r.data.tags.get("clic.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("clic.kind") == "stage"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and parents[0].info.run_name == "pipeline"
    assert len(stages) == 1 + 1 + 3 + 3 + 1 + 3 + 1  # fetch validate pretrain probe baselines transfer compare
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in stages)
    pre = next(r for r in stages if r.info.run_name == "pretrain clicv2")
    assert pre.data.params["clicv2.mask_ratio"] == "0.4" and pre.data.tags["clic.dataset_fingerprint"]
    assert "loss" in pre.data.metrics and "mem" in pre.data.metrics
    probe = next(r for r in stages if r.info.run_name == "probe clic")
    assert {"pcc", "srcc", "krcc", "rmse"} <= set(probe.data.metrics)
    key = parents[0].data.metrics  # the runs list shows each method's key metrics on the parent
    assert key["clic_srcc"] == probe.data.metrics["srcc"] and key["clic_pcc"] == probe.data.metrics["pcc"]
    assert {f"{m}_synthetic_top1" for m in ("moco", "clic", "clicv2")} <= set(key)
    from mlflow import MlflowClient

    client = MlflowClient()
    for m in ("moco", "clic", "clicv2"):
        assert str(client.get_model_version_by_alias(f"clic-{m}", "champion").version) == "1"
        assert str(client.get_model_version_by_alias(f"clic-{m}", "current").version) == "1"


def test_second_repro_does_nothing(project: Path) -> None:
    start = time.time()
    res = dvc(project, "repro")
    assert "Data and pipelines are up to date" in res.stdout
    assert time.time() - start < 60


def test_a_repro_whose_last_stages_are_skipped_closes_its_parent_run(project: Path) -> None:
    """`compare` closes the parent run, but DVC skips it when its inputs came out the same; the
    parent of such an invocation (here: only the baselines run again) is FINISHED all the same,
    not RUNNING for ever in the MLflow UI (it was, after every fresh clone's `make demo`)."""
    before = {r.info.run_id for r in _runs(project)}
    out = dvc(project, "repro", "--force", "--single-item", "baselines", "transfer@moco").stdout
    assert "Running stage 'baselines'" in out and "Running stage 'compare'" not in out
    new = [r for r in _runs(project) if r.info.run_id not in before]
    assert sorted((r.data.tags["clic.kind"], r.info.status) for r in new) == [("pipeline", "FINISHED"),
                                                                             ("stage", "FINISHED"),
                                                                             ("stage", "FINISHED")]
    parent = next(r for r in new if r.data.tags["clic.kind"] == "pipeline")
    # the second stage reopened the parent that the first one closed, and closed it again when it ended
    assert parent.info.end_time >= max(r.info.end_time for r in new if r.data.tags["clic.kind"] == "stage")
    assert all(r.info.status != "RUNNING" for r in _runs(project))


def test_scorer_loads_from_the_registry(project: Path) -> None:
    import mlflow
    import pandas as pd

    from stages.probe import input_example

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/clic-clicv2@champion")
    out = model.predict(input_example())
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["score", "error"] and len(out) == 1
    assert out["error"][0] == ""
    import clic.scorer

    direct = clic.scorer.load_scorer(project / "reports" / "clicv2" / "scorer.pt", "cpu")
    from stages.scorer_model import ScorerModel

    img = ScorerModel._image(input_example()["image"][0])
    assert out["score"][0] == pytest.approx(float(direct(img)[0]), abs=1e-5)


def test_champion_stays_when_the_same_model_is_probed_again(project: Path) -> None:
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["probe"]["bootstrap"] = 21  # re-probe: same features, same SRCC
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    dvc(project, "repro")
    from mlflow import MlflowClient

    _runs(project)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("clic-moco", "current").version) == "2"
    assert str(client.get_model_version_by_alias("clic-moco", "champion").version) == "1"  # no better on validation
    why = client.get_model_version("clic-moco", "2").tags["champion_decision"]
    assert "difference against version 1" in why and "+0.0000" in why and "champion version 1 kept" in why
    assert "pretrain" not in dvc(project, "status").stdout  # probing again did not retrain


@contextlib.contextmanager
def _mlflow_server(project: Path) -> Iterator[int]:
    """A real MLflow server on the project's store at 127.0.0.1:<port>, stopped by its process id."""
    port = free_port()
    proc = subprocess.Popen([BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlflow_server_serves_the_pipeline_store(project: Path) -> None:
    with _mlflow_server(project) as port:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

        def call(path: str, body: dict | None = None) -> dict:
            req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        exp = call("/experiments/get-by-name?experiment_name=clic")["experiment"]
        runs = call("/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                     "filter": "tags.`clic.stage` = 'probe' and tags.`clic.method` = 'clicv2'"})["runs"]
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        local = json.loads((project / "metrics" / "probe" / "clicv2.json").read_text())
        assert metrics["srcc"] == pytest.approx(local["srcc"]) and metrics["pcc"] == pytest.approx(local["pcc"])
        model = call("/registered-models/alias?name=clic-clicv2&alias=champion")["model_version"]
        assert model["name"] == "clic-clicv2" and model["run_id"] in {r["info"]["run_id"] for r in runs}


def _chromium_dom(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (Debian's package)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe
    res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--window-size=1600,1000", "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    return res.stdout


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium is not installed (Debian: apt-get install chromium): no browser check")
def test_mlflow_ui_shows_training_runs_in_a_browser(project: Path) -> None:
    """The MLflow UI in a real browser: experiment `clic` is a training experiment whose runs page
    lists the pipeline run, a probe run's page shows its metrics and its scatter-plot artifact."""
    import mlflow

    _runs(project)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("clic")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    probe = next(r for r in _runs(project) if r.info.run_name == "probe clicv2")
    with _mlflow_server(project) as port:
        ui = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        runs_page = _chromium_dom(f"{ui}?workflowType=machine_learning")
        assert ">pipeline<" in runs_page and "Run Name" in runs_page, runs_page[-2000:]
        assert "No data available" not in runs_page  # not the empty GenAI traces overview
        # the links we print carry the training view: run pages without GenAI's evaluation pages,
        # model pages with the model registry (not the prompts and AI gateway) in the side bar
        run_page = _chromium_dom(f"{ui}/runs/{probe.info.run_id}?workflowType=machine_learning")
        assert "probe clicv2" in run_page and ">srcc<" in run_page and "Evaluation runs" not in run_page
        assert f"{probe.data.metrics['srcc']:.3f}"[:-1] in run_page  # its value, as shown
        assert "Evaluation runs" in _chromium_dom(f"{ui}/runs/{probe.info.run_id}")  # what the bare link opens
        base = f"http://127.0.0.1:{port}/#/models/clic-clicv2"
        for page in (f"{base}?workflowType=machine_learning", f"{base}/versions/1?workflowType=machine_learning"):
            dom = _chromium_dom(page)
            assert ">Model registry<" in dom and ">Prompts<" not in dom and "champion" in dom, page
            assert "new Model Registry UI" not in dom  # no announcement pop-up over the page
        artifact = _chromium_dom(f"{ui}/runs/{probe.info.run_id}/artifacts/report/scatter.png")
        assert 'alt="report/scatter.png" src="blob:' in artifact  # the plot itself, loaded into the page


def test_corrupt_dataset_stops_at_validate(tmp_path: Path, photos: list[Path]) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for i, ph in enumerate(photos):
        (folder / f"{i}.png").write_bytes(ph.read_bytes())
        names.append(f"{i}.png")
    (folder / "leak.png").write_bytes(photos[0].read_bytes())  # same content as 0.png, other split
    rows = [f"{n},{0.1 * (i + 1):.2f},{'train' if i < 5 else 'test'}" for i, n in enumerate(names)]
    rows[0] = "0.png,0.1,train"
    (folder / "scores.csv").write_text("image,score,split\n" + "\n".join(rows) + "\nleak.png,0.5,test\n")

    def tweak(p: dict) -> None:
        p["data"].update(source="folder", path=str(folder), csv=str(folder / "scores.csv"), cache_size=48)
        p["validate"]["min_rows"] = 2

    root = make_project(tmp_path / "proj", tweak)
    res = dvc(root, "repro", check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "failed to reproduce 'validate'" in out
    assert "leaks_across_splits: 2 unexpected rows" in out
    assert not (root / "models").exists()
    runs = _runs(root)
    assert {r.info.run_name: r.info.status for r in runs}["validate"] == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)


def test_bad_params_and_unreachable_server_fail_clearly(tmp_path: Path) -> None:
    def tweak(p: dict) -> None:
        p["pretrain"]["moco"]["epochs"] = -1
        p["pretrain"]["clicv2"]["patch_size"] = 7

    root = make_project(tmp_path, tweak)
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", *a], cwd=root, capture_output=True,  # noqa: E731
                                          text=True, timeout=300, env={**_env(), **kw})
    res = run("stages.pretrain", "moco")
    assert res.returncode == 2 and "pretrain.moco.epochs must be > 0, got -1" in res.stderr
    res = run("stages.pretrain", "clicv2")  # the file is validated whole: every error, each at its key
    assert res.returncode == 2 and "pretrain.moco.epochs must be > 0, got -1" in res.stderr
    assert re.search(r"\n  and \S*params\.yaml: pretrain\.clicv2\.patch_size=7 must divide image_size=32", res.stderr)
    res = run("stages.pretrain", "simclr")
    assert res.returncode != 0 and "usage" in res.stderr
    p = yaml.safe_load((root / "params.yaml").read_text())
    del p["pretrain"]["moco"]["epochs"], p["pretrain"]["clicv2"]["patch_size"]
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    port = free_port()  # nothing listens there
    res = run("stages.fetch", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert res.returncode == 2 and "unreachable" in res.stderr and f"127.0.0.1:{port}" in res.stderr
    assert not (root / "data" / "prepared").exists()


def _validation(path: Path, human: np.ndarray, pred: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"img{i}.png,{h:.6f},{q:.6f}" for i, (h, q) in enumerate(zip(human, pred, strict=True))]
    path.write_text("name,human,predicted\n" + "\n".join(rows) + "\n")
    return path


def test_champion_moves_only_when_validation_says_better(project: Path, tmp_path: Path) -> None:
    """Through the probe stage's own ``register``: a first version is champion; a version better
    by noise on the validation images (a smoke run) is not promoted and says why; a clearly better
    one is. Each version's validation predictions are read back from its MLflow run."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    sys.path.insert(0, str(REPO))
    from stages.probe import register

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("clic")
    scorer = str(project / "reports" / "clicv2" / "scorer.pt")
    rng = np.random.default_rng(0)
    human = rng.uniform(0, 1, 60)
    weak = human + rng.normal(0, 0.5, 60)  # SRCC ~0.5
    from scipy.stats import spearmanr

    lucky = weak  # another model of the same quality whose draw happens to rank these images better
    while spearmanr(lucky, human)[0] <= spearmanr(weak, human)[0] + 0.02:
        lucky = human + rng.normal(0, 0.5, 60)
    strong = human + rng.normal(0, 0.05, 60)  # SRCC ~0.99
    versions = {}
    for name, pred in (("weak", weak), ("lucky", lucky), ("strong", strong)):
        csv = _validation(tmp_path / name / "validation.csv", human, pred)
        with mlflow.start_run(run_name=f"probe {name}"):
            mlflow.log_artifact(str(csv), "report")
            versions[name] = register("x", scorer, {"srcc": 0.5}, "fp", str(csv))
    client = MlflowClient()
    tag = {n: client.get_model_version("clic-x", v).tags["champion_decision"] for n, v in versions.items()}
    assert tag["weak"] == "first version of this model: champion"
    assert f"champion version {versions['weak']} kept" in tag["lucky"] and "lower bound" in tag["lucky"]
    assert tag["strong"].endswith("> 0: promoted")
    assert str(client.get_model_version_by_alias("clic-x", "champion").version) == versions["strong"]
    assert str(client.get_model_version_by_alias("clic-x", "current").version) == versions["strong"]


def test_registered_scorer_from_the_shell_python_and_rest(project: Path, tmp_path: Path) -> None:
    """What the probe stage registered (its real layout) scores the same image the same from
    `clic score models:/...` (rows on stdout), `clic.load_scorer`, the pyfunc in an interpreter that
    cannot import the project, and `mlflow models serve` over REST with the documented curl, where
    a bad row gets its own error and the good rows are scored."""
    import base64
    import re

    import clic.scorer

    store = f"sqlite:///{project / 'mlflow.db'}"
    img = tmp_path / "photo.png"

    from clic.data.synthetic import render

    render(1, 1, 64, "mixed")[0].save(img)
    direct = float(clic.scorer.load_scorer(project / "reports" / "clicv2" / "scorer.pt", "cpu")(img)[0])
    env = {**_env(), "MLFLOW_TRACKING_URI": store}
    res = subprocess.run([BIN / "clic", "score", "--model", "models:/clic-clicv2@champion", str(img)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()
    assert rows[0] == "path,score" and len(rows) == 2 and rows[1].startswith(f"{img},")
    assert float(rows[1].split(",")[1]) == pytest.approx(direct, abs=1e-5)
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        assert float(clic.scorer.load_scorer("models:/clic-clicv2@champion", "cpu")(img)[0]) == pytest.approx(direct,
                                                                                                          abs=1e-5)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    # the logged model's requirements: PyPI pins from the lock, no bare `clic` (it travels as code)
    import mlflow

    mlflow.set_tracking_uri(store)
    local = Path(mlflow.artifacts.download_artifacts("models:/clic-clicv2@champion", dst_path=str(tmp_path / "m")))
    reqs = [r for r in (local / "requirements.txt").read_text().split() if r]
    lock = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1].strip()
            for line in (REPO / "requirements" / "lock.txt").read_text().splitlines() if "==" in line}
    assert reqs and all("==" in r for r in reqs) and not any(r.split("==")[0] == "clic" for r in reqs), reqs
    assert all(lock.get(r.split("==")[0].lower().replace("_", "-")) == r.split("==")[1] for r in reqs), reqs
    assert (local / "code" / "clic" / "scorer.py").is_file()
    # a fresh interpreter where the project is not importable: clic comes from the model's own code
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()]
sys.path[:] = [p for p in sys.path if p and (not p.startswith({str(REPO)!r}) or "/.venv/" in p)]
try:
    import clic
    raise SystemExit("the project is importable: " + clic.__file__)
except ModuleNotFoundError:
    pass
import base64, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/clic-clicv2@champion")
import clic
out = model.predict(pd.DataFrame({{"image": [base64.b64encode(open({str(img)!r}, "rb").read()).decode()]}}))
print(clic.__file__)
print(repr(float(out["score"][0])))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    where, score = res.stdout.strip().splitlines()[-2:]
    assert not Path(where).is_relative_to(REPO) and "/code/clic/" in where
    assert float(score) == pytest.approx(direct, abs=1e-5)
    # REST: the two commands of docs/usage.md (the README links there), on a free port
    usage = (REPO / "docs" / "usage.md").read_text()
    block = re.search(r"```bash\n(mlflow models serve .*?)```", usage, re.S)
    assert block, "docs/usage.md: no `mlflow models serve` example"
    serve_cmd, curl_cmd = (c.strip() for c in block.group(1).split("\n\n", 1))
    port = free_port()
    serve_cmd = serve_cmd.replace("5001", str(port)).rstrip("&").strip()
    curl_cmd = curl_cmd.replace("5001", str(port)).replace("photo.jpg", str(img))
    server = subprocess.Popen(["bash", "-c", f"exec {serve_cmd}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server)
        res = subprocess.run(["bash", "-c", curl_cmd], capture_output=True, text=True, timeout=120)
        answer = json.loads(res.stdout)["predictions"]
        assert answer[0]["score"] == pytest.approx(direct, abs=1e-5) and not answer[0]["error"]
        good = base64.b64encode(img.read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[good], ["not an image"], [good]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())["predictions"]
        assert [a["score"] == pytest.approx(direct, abs=1e-5) for a in (answer[0], answer[2])] == [True, True]
        assert answer[1]["error"].startswith("row 1: not base64-encoded image bytes")
        assert answer[1]["score"] is None  # JSON null, never NaN
    finally:
        server.terminate()
        server.wait(timeout=30)
