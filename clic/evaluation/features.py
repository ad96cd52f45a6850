"""Frozen features of a prepared dataset, cached by (model, dataset, preprocessing) fingerprint.

Extraction runs without gradients in batches (bf16 autocast on CUDA) while loader workers decode
and resize the next batches, so decoding overlaps compute.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clic.data.table import Record, fingerprint
from clic.embed import extract

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def dataset_features(backbone: nn.Module, records: list[Record], root: Path, size: int, model_key: str,
                     cache_dir: str | Path | None = None, batch_size: int = 64, workers: int = 2,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """(N, D) float32 features of ``records`` (in order); cached under ``cache_dir`` when given."""
    cache = None
    if cache_dir:
        key = hashlib.sha256(f"{model_key}|{fingerprint(records)}|{size}|{[r.name for r in records]}".encode())
        cache = Path(cache_dir) / f"features-{key.hexdigest()[:20]}.npy"
        if cache.is_file():
            return np.load(cache)
    paths = [r.image_path(root) for r in records]
    feats, kept, errors = extract(backbone, paths, size, batch_size, workers, device, progress=False)
    if errors:
        raise ValueError(f"{len(errors)} images could not be read: {errors[0]}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.npy")
        np.save(tmp, feats)
        os.replace(tmp, cache)
    return feats
