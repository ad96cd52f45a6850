"""bench/gpu_corpus.py, the one command a lent GPU runs, at a tiny size on the CPU through the same
code: calibration, epochs fitted to the time share, encoders in one folder, then the probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import REPO


def test_gpu_corpus_script_trains_both_methods_in_its_time_and_probes_them(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    for i in range(24):  # JPEGs, as a web corpus: decode_on device reads their bytes
        (corpus / f"s{i % 3}").mkdir(parents=True, exist_ok=True)
        arr = (rng.random((40, 48, 3)) * 255 * rng.random()).astype(np.uint8)
        Image.fromarray(arr).save(corpus / f"s{i % 3}" / f"{i}.jpg", quality=90)
    profile = tmp_path / "tiny.yaml"
    profile.write_text(f"""extends: {REPO / 'params' / 'gpu-corpus.yaml'}
data:
  source: synthetic
  out_dir: {tmp_path / 'prepared'}
  raw_dir: {tmp_path / 'raw'}
  cache_size: 48
  synthetic: {{n_train: 30, n_test: 10, size: 48}}
probe: {{image_size: 32, workers: 0, bootstrap: 20, folds: 2}}
pretrain:
  data: [{corpus}]
  common:
    image_size: 32
    patch_size: 8
    batch_size: 8
    num_workers: 0
    compile: false
    amp: "off"
    moco: {{queue_size: 4, dim: 16, bn_splits: 2}}
    clicv2: {{dim: 16, max_tokens: 64}}
  clic: {{backbone: resnet18}}
  clicv2: {{backbone: vit_tiny, depth: 1}}
""")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "bench/gpu_corpus.py", "--out", str(out), "--params", str(profile),
                          "--seconds", "240", "--calibration-steps", "2", "--fill", "0.05"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    gpu = json.loads((out / "gpu.json").read_text())
    for method in ("clic", "clicv2"):
        row = gpu["methods"][method]
        assert row["calibration_images_per_s"] > 0 and row["corpus_images"] == 24 and not row["cut"]
        assert row["epochs"] >= 1 and row["epochs_done"] == row["epochs"]
        assert Path(row["encoder"]).name == "encoder.pt" and Path(row["encoder"]).is_file()
        assert Path(row["encoder"]).parent == out / method  # one output folder
    cfg = json.loads((out / "clicv2" / "metrics.jsonl").read_text().splitlines()[0])
    assert cfg["epoch"] == 0
    for method in ("clic", "clicv2"):  # probed by `clic probe --model` on the encoders, not retrained
        metrics = json.loads((out / "probe" / method / "metrics.json").read_text())
        assert -1 <= metrics["srcc"] <= 1 and (out / "probe" / method / "predictions.csv").is_file()
    assert (out / "probe" / "prepared" / "table.csv").is_file()
    # beside them only the prepared folder's lock file (filelock keeps it: removing one is racy)
    assert sorted(p.name for p in (out / "probe").iterdir()) == ["clic", "clicv2", "prepared", "prepared.lock"]
