"""Linear classification probe on frozen features for any ImageFolder (``train/``, ``val/``).

Memory stays bounded at ImageNet scale: features are appended to ``.npy`` files on disk in
chunks, and the softmax head is trained in mini-batches reading from them. Reported as
``<name>_top1`` / ``<name>_top5`` (``imagenet_top1`` on ImageNet).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clic.data.imageio import is_image_file
from clic.embed import extract
from clic.evaluation.probe import fit_classifier, topk_accuracy

log = logging.getLogger(__name__)


def image_folder(root: Path, split: str, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing; expected an ImageFolder with train/<class>/ and val/<class>/")
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{folder}: found {len(classes)} class folders, need at least 2")
    found = [(p, c) for c, name in enumerate(classes) for p in sorted((folder / name).rglob("*"))
             if p.is_file() and is_image_file(p)]  # (path, class index)
    if not found:
        raise ValueError(f"{folder}: no images found")
    return [p for p, _ in found], np.array([c for _, c in found], np.int64), classes


def stream_features(backbone: nn.Module, paths: list[Path], size: int, out: Path, chunk: int = 8192,
                    batch_size: int = 128, workers: int = 2, device: str | torch.device = "cpu") -> np.memmap:
    """Features of ``paths`` written chunk by chunk into a (N, D) float32 memmap at ``out``."""
    if not paths:
        raise ValueError(f"no images to extract features from for {out}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    bar = tqdm(total=len(paths), desc=f"features {out.stem}", unit="img", disable=None)
    # appended chunk by chunk to a .npy file (header first, shape known from the first chunk):
    # a writable memmap would keep every written page resident, so memory grew with N
    with tmp.open("wb") as fh:
        for start in range(0, len(paths), chunk):
            feats, kept, errors = extract(backbone, paths[start:start + chunk], size, batch_size, workers, device,
                                          progress=False)
            if errors:
                raise ValueError(f"{len(errors)} unreadable images, e.g. {errors[0]}")
            if start == 0:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (len(paths), feats.shape[1])}
                np.lib.format.write_array_header_1_0(fh, header)
            fh.write(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
            bar.update(len(feats))
    bar.close()
    os.replace(tmp, out)
    return np.load(out, mmap_mode="r")


def transfer_probe(backbone: nn.Module, size: int, root: str | Path, name: str, work_dir: str | Path,
                   epochs: int = 50, lr: float = 0.1, batch_size: int = 128, workers: int = 2,
                   device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float]:
    root, work = Path(root), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tr_paths, tr_y, classes = image_folder(root, "train")
    va_paths, va_y, _ = image_folder(root, "val", classes)
    try:
        xtr, xva = (stream_features(backbone, paths, size, work / f"{split}.npy", batch_size=batch_size,
                                    workers=workers, device=device)
                    for split, paths in (("train", tr_paths), ("val", va_paths)))
        head = fit_classifier(xtr, tr_y, len(classes), epochs=epochs, lr=lr, seed=seed)
        logits = np.concatenate([head.predict(np.asarray(xva[s:s + 65536])) for s in range(0, len(xva), 65536)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {f"{name}_top1": topk_accuracy(logits, va_y, 1), f"{name}_top5": topk_accuracy(logits, va_y, 5),
            f"{name}_classes": float(len(classes)), f"{name}_train_images": float(len(tr_y))}
