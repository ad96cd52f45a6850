"""DVC's own comparison on a git project as a DVC user keeps it: dvc.lock and the small metrics
files in git (``/metrics/`` and ``/plots/`` are not git-ignored), two ``dvc exp run -S`` experiments,
their params and metrics read back through ``dvc exp show --json``, ``dvc exp diff`` and
``dvc metrics diff``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .test_pipeline import _env, dvc, make_project

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PROBE = "metrics/probe/moco.json"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True, env={
        **_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org"}).stdout


def _experiments(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name (or rev for the baseline) -> {"params": params.yaml's, "metrics": file -> values}."""
    found: dict[str, dict[str, Any]] = {}

    def take(entry: dict[str, Any]) -> None:
        data = entry.get("data") or {}
        found[entry.get("name") or entry["rev"]] = {
            "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
            "metrics": {f: v.get("data", {}) for f, v in (data.get("metrics") or {}).items()}}

    for entry in shown:
        take(entry)
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                take(rev)
    return found


def test_two_experiments_compare_through_dvc_exp_show(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    shutil.rmtree(root / ".dvc")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    git(root, "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "true")
    dvc(root, "repro", "probe@moco")
    # what DVC's example project keeps in git: the lock and the small metrics files
    status = {line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines()}
    assert {PROBE, "dvc.lock", "metrics/validation.json", "plots/train/moco.csv"} <= status, sorted(status)
    assert not any(p.startswith(("data/", "models/", "reports/", "mlflow", "mlartifacts/")) for p in status), \
        sorted(status)  # data, weights, reports and MLflow state stay out of git
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "baseline")

    dvc(root, "exp", "run", "-n", "boot77", "-S", "probe.bootstrap=77", "probe@moco")
    dvc(root, "exp", "run", "-n", "seed1", "-S", "seed=1", "probe@moco")
    shown = _experiments(json.loads(dvc(root, "exp", "show", "--json").stdout))
    main = next(v for k, v in shown.items() if k not in ("boot77", "seed1", "workspace"))
    boot, seed = shown["boot77"], shown["seed1"]
    assert boot["params"]["probe"]["bootstrap"] == 77 and seed["params"]["seed"] == 1
    assert isinstance(boot["metrics"][PROBE]["srcc"], float) and isinstance(seed["metrics"][PROBE]["srcc"], float)
    assert isinstance(main["metrics"][PROBE]["srcc"], float) and main["params"]["seed"] == 0
    # the bootstrap only changes the interval: the same predictions, the same SRCC
    assert shown["boot77"]["metrics"][PROBE]["srcc"] == pytest.approx(main["metrics"][PROBE]["srcc"])
    assert shown["seed1"]["metrics"][PROBE]["srcc"] != main["metrics"][PROBE]["srcc"]
    diff = json.loads(dvc(root, "exp", "diff", "main", "seed1", "--json").stdout)
    seed_diff = diff["params"]["params.yaml"]["seed"]
    assert (seed_diff["old"], seed_diff["new"]) == (0, 1)
    assert "srcc" in diff["metrics"][PROBE]
    # an experiment kept as a branch compares as any revision does
    dvc(root, "exp", "branch", "seed1", "seed-1")
    metrics = json.loads(dvc(root, "metrics", "diff", "main", "seed-1", "--json").stdout)
    assert metrics[PROBE]["srcc"]["new"] == pytest.approx(shown["seed1"]["metrics"][PROBE]["srcc"])
