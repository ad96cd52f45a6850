"""``decode_on: device`` on a GPU; prints JSON (a script, not a test).

On ``--n`` synthetic camera JPEGs (``--side`` px long side) and the same images as 448 px JPEGs:
- per method (MoCo v2 at 224 px, CLICv2 at 224 px / patch 16): the loader's half on one core
  (read the file, its header, draw the boxes), the device decoding a batch alone, and decoding
  plus cutting both views (images/s);
- pretraining images/s by epoch from the camera JPEGs with the loader decoding
  (``augment_on: device``) and with the device decoding (``decode_on: device``), same loader
  workers: ResNet-50 MoCo v2 and ViT-B/16 CLICv2, bf16 on CUDA.

Runs on CPU too (torchvision's decoder), where only the plumbing is meaningful.

    python bench/bench_gpu_decode.py [--n 1024] [--side 2400] [--batch 256] [--workers 6]
        [--epochs 3] [--train moco,clicv2]
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_decode import device_decode_rates, photo_like  # this folder's decode benchmark (on sys.path)
from common import emit, parser, timed

from clic.config import MocoViewConfig, PretrainConfig, ShiftConfig
from clic.data.imageio import resize_short
from clic.params import from_dict
from clic.pretrain import run
from clic.transforms.decode import PlanBoxes
from clic.transforms.plan import MocoPlan, ShiftPlan

KEYS = {"loader": "loader_half_images_per_s_one_core", "cut": "device_decode_and_cut_images_per_s",
        "decode": "device_decode_only_images_per_s"}


def _make(job: tuple[int, int, str, str]) -> None:
    i, side, big, small = job
    img = photo_like(np.random.default_rng(i), side, side * 3 // 4)
    img.save(Path(big) / f"{i:05d}.jpg", quality=90)
    resize_short(img, 448).save(Path(small) / f"{i:05d}.jpg", quality=95)


def device_rates(files: list[Path], dev: torch.device, batch: int) -> dict:
    """Loader half (one core) and device half (decode alone; decode + cut) images/s per method."""
    setups = {"moco_224": PlanBoxes(MocoPlan(224, MocoViewConfig())),
              "clicv2_224_p16": PlanBoxes(ShiftPlan(224, 16, ShiftConfig()))}
    return {name: {KEYS[k]: v for k, v in device_decode_rates(boxes, files, dev, batch, decode_only=True).items()}
            for name, boxes in setups.items()}


def train_rate(folder: Path, dev: torch.device, method: str, decode_on: str, workers: int, n: int, batch: int,
               epochs: int) -> dict:
    """Pretraining images/s by epoch on the JPEG folder ``folder``."""
    raw: dict = {"method": method, "image_size": 224, "batch_size": batch, "epochs": epochs, "num_workers": workers,
                 "checkpoint_every": 10**6, "augment_on": "device", "decode_on": decode_on,
                 "amp": "bf16" if dev.type == "cuda" else "off", "data": [str(folder)], "moco": {"queue_size": n // 2}}
    if method == "clicv2":
        raw.update(backbone="vit_base", patch_size=16, depth=0, optim={"name": "adamw", "base_lr": 1.5e-4})
    else:
        raw.update(backbone="resnet50")
    cfg = from_dict(PretrainConfig, raw)
    epochs_metrics: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        _, wall = timed(run, cfg, Path(tmp) / "unused", Path(tmp) / "out", device=str(dev), progress=False,
                        on_epoch=lambda e, m: epochs_metrics.append(m), corpus_dir=Path(tmp) / "corpus")
    return {"images_per_s_by_epoch": [round(m["images_per_s"], 1) for m in epochs_metrics],
            "wall_s": round(wall, 1), "workers": workers}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--side", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", default="moco,clicv2", help="methods to pretrain, comma-separated ('' for none)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "n": args.n,
                    "side": args.side, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp, "camera"), Path(tmp, "cache448")
        big.mkdir()
        small.mkdir()
        with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(_make, [(i, args.side, str(big), str(small)) for i in range(args.n)], chunksize=8))
        result["bytes_per_image"] = {d.name: int(np.mean([p.stat().st_size for p in d.iterdir()]))
                                     for d in (big, small)}
        for folder in (big, small):
            result[f"rates_{folder.name}"] = device_rates(sorted(folder.iterdir()), dev, args.batch)
        for method in filter(None, args.train.split(",")):
            for decode_on in ("loader", "device"):
                result[f"train_{method}_camera_decode_on_{decode_on}"] = train_rate(
                    big, dev, method, decode_on, args.workers, args.n, args.batch, args.epochs)
    emit(result)


if __name__ == "__main__":
    main()
