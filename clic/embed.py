"""Frozen-encoder features for image files: ``clic embed``.

Loads ``encoder.pt`` (or a training ``checkpoint.pt``) safely, rebuilds the backbone from the
stored config, and extracts features without gradients in batches, decoding in loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from clic import methods
from clic.config import PretrainConfig
from clic.cores import torch_threads
from clic.data.imageio import ImageError, decode_opened, is_image_file, load_rgb
from clic.engine import checkpoint as ckpt
from clic.engine.train import autocast
from clic.models.backbones import ResNetBackbone, ViTBackbone, build_backbone
from clic.params import from_dict
from clic.transforms.common import MEAN, STD

log = logging.getLogger(__name__)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PretrainConfig]:
    """Backbone (eval mode) and its config from ``encoder.pt`` or ``checkpoint.pt``."""
    backbone, cfg = rebuild_backbone(ckpt.load(path, "cpu"), path)
    return backbone.to(device).eval(), cfg


def rebuild_backbone(state: Mapping[str, Any], path: str | Path) -> tuple[ResNetBackbone | ViTBackbone,
                                                                         PretrainConfig]:
    """The backbone of a saved encoder, training checkpoint or scorer ``state``, rebuilt from its
    stored config; weights that do not fit it are a ``ValueError`` naming the file, the config and
    the mismatch (missing and unexpected keys, shape differences)."""
    if "config" not in state:
        raise ValueError(f"{path}: no config stored; not a clic encoder or checkpoint")
    cfg = from_dict(PretrainConfig, state["config"], f"{path}:config")
    backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth, cfg.pool)
    if "backbone" in state:
        weights = state["backbone"]
    elif "model" in state:  # training checkpoint: take the online backbone
        prefix = methods.get(cfg.method).weights_prefix
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    else:
        raise ValueError(f"{path}: holds neither 'backbone' nor 'model' weights")
    own = backbone.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} in the file vs {tuple(v.shape)} in the model"
              for k, v in own.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
        problems = [f"{what}: {some(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise ValueError(f"{path}: the stored weights do not fit the stored config (backbone={cfg.backbone}, "
                         f"image_size={cfg.image_size}, patch_size={cfg.patch_size}, depth={cfg.depth}, "
                         f"pool={cfg.pool}): {'; '.join(problems)}; the file was edited or written by another "
                         "version of clic")
    backbone.load_state_dict(weights)
    return backbone, cfg


def eval_transform(size: int, whole: bool = False) -> T.Compose:
    """Resize the short side to ``size`` and centre-crop a square (the whole image for squares);
    ``whole``: resize the whole image to ``size`` x ``size`` without cropping, the aspect ratio
    not kept (ICNet's IC9600 protocol)."""
    if whole:
        return T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders walked recursively for image files (sorted); none is an error."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if is_image_file(q) and q.is_file():
                    paths.append(q)
                elif is_image_file(q) and q.is_symlink():
                    log.warning("skipped %s: a link that cannot be followed (dangling, or a loop)", q)
        elif p.exists():
            paths.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not paths:
        raise ValueError("no image files found in the given inputs")
    return paths


def skip_unreadable(n: int, kept: list[int], errors: list[str]) -> None:
    """Warn of each image that could not be read; refuse a run where none of the ``n`` could."""
    for e in errors:
        log.warning("skipped unreadable image: %s", e)
    if not kept:
        raise ValueError(f"none of the {n} images could be read (first: {errors[0] if errors else '?'})")


def load_for_model(source: str | Path | Image.Image, size: int) -> Image.Image:
    """Decode an image (a path, or a PIL image the caller opened) that will be resized to ``size``:
    EXIF orientation applied, any mode to 8-bit RGB, JPEG files at a reduced DCT scale keeping at
    least twice that side (scores move by ~1% of their spread, decoding is 4-5x cheaper). Paths and
    PIL images go through the same decoding (:func:`clic.data.imageio.decode_opened`). A JPEG file
    corrupted mid-stream is refused as prepare refuses it (Pillow would decode it into grey)."""
    if isinstance(source, Image.Image):
        return decode_opened(source, min_size=2 * size)
    return load_rgb(source, min_size=2 * size, strict=True)


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], size: int, whole: bool = False) -> None:
        self.paths, self.size, self.transform = list(paths), size, eval_transform(size, whole)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_for_model(self.paths[i], self.size)), i, ""
        except ImageError as exc:
            return torch.zeros(3, 1, 1), i, str(exc)


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    good = [t for t, _, e in items if not e]
    return (torch.stack(good) if good else None, [i for _, i, e in items if not e], [e for _, _, e in items if e])


@torch.no_grad()
def extract(backbone: nn.Module, paths: Sequence[Path], size: int, batch_size: int = 64, workers: int = 2,
            device: str | torch.device = "cpu", progress: bool = True, whole: bool = False,
            forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
            threads: int | None = None) -> tuple[np.ndarray, list[int], list[str]]:
    """Features (N_ok, D) float32, indices of the paths that decoded, and the errors of the rest.

    ``whole``: inputs are whole images squashed to ``size`` x ``size`` (else centre crops);
    ``forward``: what to compute from a normalised (B, 3, size, size) batch instead of
    ``backbone(x)``, e.g. ``backbone.forward_spatial`` for (N_ok, D, h, w) maps;
    ``threads``: intra-op threads of the forward for this call (default: torch's current count,
    all cores). Giving the workers their own cores (``threads`` = cores - ``workers``) pays only
    when decoding is the slow half (camera-sized JPEGs): ``bench/bench_eval.py`` on 2 cores, 1
    worker, 1536 px JPEGs 73.7 -> 77.6 img/s, but 448 px JPEGs 122 -> 77 img/s.
    """
    device = torch.device(device)
    loader = DataLoader(_Images(paths, size, whole), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    fn = forward or backbone
    feats, kept, errors = [], [], []
    with torch_threads(threads or torch.get_num_threads()):
        for x, idx, errs in tqdm(loader, desc="embed", unit="batch", disable=not progress):
            errors.extend(errs)
            if x is None:
                continue
            with autocast(device, "auto"):
                f = fn(x.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            kept.extend(idx)
    dim = int(getattr(backbone, "feature_dim", 0))
    array = torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)
    return array.astype(np.float32, copy=False), kept, errors


def embed_to_npz(model: str | Path, inputs: Iterable[str | Path], out: str | Path, batch_size: int = 64,
                 workers: int = 2, device: str | None = None, threads: int | None = None) -> tuple[int, list[str]]:
    """Write ``paths`` (str) and ``features`` (float32, N x D) to ``out``; returns (N, errors)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, cfg = load_encoder(model, dev)
    paths = expand_inputs(inputs)
    feats, kept, errors = extract(backbone, paths, cfg.image_size, batch_size, workers, dev, threads=threads)
    skip_unreadable(len(paths), kept, errors)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, paths=np.array([str(paths[i]) for i in kept], dtype=str), features=feats)
    tmp.replace(out)
    return len(kept), errors
