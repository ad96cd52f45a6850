"""Frozen features of a prepared dataset, cached by (model, dataset, preprocessing) fingerprint.

Extraction runs without gradients in batches (bf16 autocast on CUDA) while loader workers decode
and resize the next batches, so decoding overlaps compute. Features are pooled vectors (N, D) or,
for heads that need the layout (``probe.protocol: icnet``), spatial maps (N, D, h, w).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from clic.data.archive import file_sha256
from clic.data.table import Record, fingerprint, resolve
from clic.embed import extract

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """A short content key of a file (the first 16 hex digits of its SHA-256)."""
    return file_sha256(path)[:16]


def input_paths(records: list[Record], root: Path, size: int) -> tuple[list[Path], bool]:
    """The file each record is read from for a model fed ``size`` px, and whether any is a source.

    The prepared cache is used when it holds enough pixels (its short side, ``cache_size`` in
    ``meta.json``, is at least ``size``, or the source is no larger); otherwise the source image,
    so that probing above the cache size (e.g. ICNet's 512 px) never upsamples the cache.
    """
    meta = root / "meta.json"
    cache_size = int(json.loads(meta.read_text()).get("cache_size", 0)) if meta.is_file() else 0
    paths, any_source, missing = [], False, 0
    for r in records:
        source = resolve(root, r.path)
        if not r.cache or cache_size >= size or (r.width and cache_size >= min(r.width, r.height)):
            paths.append(r.image_path(root))
        elif source.is_file():
            paths.append(source)
            any_source = True
        else:
            paths.append(root / r.cache)
            missing += 1
    if missing:
        log.warning("%d source images are missing: read from the %d px cache, upsampled to %d px",
                    missing, cache_size, size)
    return paths, any_source


def dataset_features(backbone: nn.Module, records: list[Record], root: Path, size: int, model_key: str,
                     cache_dir: str | Path | None = None, batch_size: int = 64, workers: int = 2,
                     device: str | torch.device = "cpu", whole: bool = False, spatial: bool = False,
                     flip: bool = False, stages: bool = False) -> np.ndarray:
    """Float32 features of ``records`` (in order): (N, D) pooled, or (N, D, h, w) with ``spatial``
    (``backbone.forward_spatial``); cached under ``cache_dir`` when given.

    ``whole``: the whole image resized to ``size`` x ``size`` (else the centre crop); ``flip``:
    features of the horizontally flipped images (a training augmentation for frozen features);
    ``stages``: pools of several depths (``backbone.forward_pooled_stages``) instead of the last.
    """
    paths, any_source = input_paths(records, root, size)
    cache = None
    if cache_dir:
        tags = "".join(f"|{t}" for t, on in (("whole", whole), ("spatial", spatial), ("flip", flip),
                                             ("source", any_source), ("stages", stages)) if on)
        key = hashlib.sha256(f"{model_key}|{fingerprint(records)}|{size}|{[r.name for r in records]}{tags}".encode())
        cache = Path(cache_dir) / f"features-{key.hexdigest()[:20]}.npy"
        if cache.is_file():
            return np.load(cache)
    base = cast(Callable[[torch.Tensor], torch.Tensor], backbone.forward_spatial if spatial
                else backbone.forward_pooled_stages if stages else backbone)
    feats, kept, errors = extract(backbone, paths, size, batch_size, workers, device, progress=False, whole=whole,
                                  forward=lambda x: base(x.flip(-1) if flip else x))  # x: (B, 3, H, W), flip W
    if errors:
        raise ValueError(f"{len(errors)} images could not be read: {errors[0]}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.npy")
        np.save(tmp, feats)
        os.replace(tmp, cache)
    return feats
