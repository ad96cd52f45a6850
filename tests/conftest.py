"""Shared fixtures: tiny prepared datasets and real photos from scikit-image (offline, CC0)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, server: subprocess.Popen | None = None, seconds: float = 120) -> None:
    """Until ``url`` answers; fails when ``server`` (the process serving it) exits first or the
    time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server is None or server.poll() is None, f"the server of {url} exited"
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds} s"
            time.sleep(0.5)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "camera")


@pytest.fixture(autouse=True)
def _fresh_mlflow_tracking_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` is process-global and wins over ``MLFLOW_TRACKING_URI``: a test
    that set it must not decide which store a later test reads. Reset after every test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # also unsets the variable it had exported
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photos from scikit-image's wheel, written as JPEG/PNG files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    out = []
    for i, name in enumerate(PHOTOS):
        arr = np.asarray(getattr(data, name)())
        img = Image.fromarray(arr)
        path = folder / f"{name}.{'jpg' if i % 2 == 0 else 'png'}"
        img.save(path)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic dataset small enough for one-batch runs."""
    from clic.config import DataConfig, SyntheticConfig
    from clic.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    cfg = DataConfig(raw_dir=str(root / "raw"), out_dir=str(root / "prepared"), cache_size=64,
                     synthetic=SyntheticConfig(n_train=48, n_test=16, size=64))
    return prepare(cfg, seed=3, workers=2)


def tiny_overrides(method: str) -> dict:
    """Pretraining params for a seconds-long run."""
    base = {"image_size": 32, "patch_size": 8, "epochs": 2, "batch_size": 8, "num_workers": 0,
            "checkpoint_every": 1, "moco": {"queue_size": 8, "dim": 16}, "clicv2": {"dim": 16, "max_tokens": 64}}
    if method == "clicv2":
        base.update(backbone="vit_tiny", depth=1, optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05})
    else:
        base.update(backbone="resnet18")
    return base
