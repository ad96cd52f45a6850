"""A complexity scorer: frozen encoder + fitted head + preprocessing, in one safe file.

    scorer = clic.load_scorer("models/clicv2/scorer.pt")
    scores = scorer(["a.jpg", pil_image, tensor_batch])      # numpy array, the label's scale

The file holds tensors, numbers and strings only (``torch.load(weights_only=True)``). Heads:
``linear`` (probe protocols ridge / sgd) on pooled features, and ``icnet`` (ICNet's map + score
head) on the spatial map. ``scorer.map`` is, for a linear head, the head applied to every spatial
position (ResNet feature map / ViT patch tokens): because the features are mean-pooled and the
head is linear, the mean of the map equals the image's score; for icnet it is ICNet's complexity
map (in [0, 1]; its mean is trained towards the score, not equal to it). ``input`` says whether
images are centre-cropped (``crop``) or resized whole to a square (``whole``, ICNet's protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clic.config import PretrainConfig
from clic.embed import eval_transform, extract, load_for_model, rebuild_backbone
from clic.engine import checkpoint as ckpt
from clic.engine.train import autocast
from clic.model_uri import fetch_scorer, is_uri
from clic.models.backbones import ResNetBackbone, ViTBackbone
from clic.models.heads import ICNetHead, LinearHead
from clic.params import to_dict

ImageLike = str | Path | Image.Image | torch.Tensor
BATCH_SIZE = 64  # images per forward: score_files' default, and the chunk a served request is scored in


class Scorer:
    def __init__(self, backbone: ResNetBackbone | ViTBackbone, cfg: PretrainConfig, head: LinearHead | ICNetHead,
                 meta: dict[str, Any] | None = None, device: str | torch.device = "cpu", whole: bool = False,
                 stages: bool = False) -> None:
        """``stages``: the head reads pools of several depths (``probe.features: stages``)."""
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.cfg, self.head, self.meta, self.whole, self.stages = cfg, head, dict(meta or {}), whole, stages
        self.transform = eval_transform(cfg.image_size, whole)
        if isinstance(head, ICNetHead):
            head.to(self.device).eval()
        else:
            w = torch.from_numpy(head.weight / head.scale).float()  # fold standardisation into the head
            self._w = w.to(self.device)
            self._b = float(head.bias - (head.mean / head.scale) @ head.weight)

    # ------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) of a normalised batch."""
        with autocast(self.device, "auto"):
            return self._pool(x.to(self.device)).float()

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_pooled_stages(x) if self.stages else self.backbone(x)

    @torch.no_grad()
    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of a normalised (B, 3, H, W) batch; the head runs in float32."""
        if not isinstance(self.head, ICNetHead):
            return self.features(x) @ self._w + self._b
        with autocast(self.device, "auto"):
            spatial = self.backbone.forward_spatial(x.to(self.device))  # (B, D, h, w)
        with torch.autocast(self.device.type, enabled=False):
            return self.head(spatial.float())[0]

    def _tensor(self, item: ImageLike) -> torch.Tensor:
        """One model input (3, size, size). Paths and PIL images share one decoding (EXIF
        orientation, 16-bit, transparency: :func:`clic.embed.load_for_model`); a uint8 (3, H, W)
        tensor is an RGB image and goes through the same resize and normalisation; a float tensor
        is taken as already normalised."""
        if isinstance(item, torch.Tensor) and item.dtype != torch.uint8:
            return item
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"a uint8 image tensor must be (3, H, W) RGB, got shape {tuple(item.shape)}")
            item = Image.fromarray(item.permute(1, 2, 0).cpu().numpy(), "RGB")
        return self.transform(load_for_model(item, self.cfg.image_size))

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Scores for paths, PIL images, a uint8 (3, H, W) or (B, 3, H, W) RGB tensor, or a
        normalised float (3, H, W) tensor or (B, 3, H, W) batch."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch = torch.stack([self._tensor(i) for i in images]) if images.dtype == torch.uint8 else images
        else:
            items = [images] if isinstance(images, str | Path | Image.Image | torch.Tensor) else list(images)
            batch = torch.stack([self._tensor(i) for i in items])
        return self._scores(batch).cpu().numpy().astype(np.float64)

    def score_files(self, paths: Sequence[Path], batch_size: int = BATCH_SIZE, workers: int = 2,
                    progress: bool = True, threads: int | None = None) -> tuple[np.ndarray, list[int], list[str]]:
        """Scores of the decodable files (decoding in loader workers, overlapped with compute),
        their indices in ``paths``, and one error message per unreadable file. ``threads``: of a
        CPU forward (default: all cores; :func:`clic.embed.extract`)."""
        icnet = isinstance(self.head, ICNetHead)  # linear heads run on the pooled features, in float64
        forward = self._scores if icnet else self._pool
        out, kept, errors = extract(self.backbone, paths, self.cfg.image_size, batch_size, workers, self.device,
                                    progress, self.whole, forward=forward, threads=threads)
        if icnet:
            return out.reshape(-1).astype(np.float64), kept, errors
        return out.astype(np.float64) @ self._w.cpu().double().numpy() + self._b, kept, errors

    # --------------------------------------------------------------------------------- maps
    @torch.no_grad()
    def map(self, image: ImageLike) -> np.ndarray:
        """Per-position complexity (h, w): the linear head applied to each spatial feature, or
        ICNet's complexity map."""
        if self.stages:
            raise ValueError("this scorer's head reads pools of several depths (probe.features: stages); a "
                             "per-position map needs one of the last stage (probe.features: last)")
        x = self._tensor(image)[None].to(self.device)
        with autocast(self.device, "auto"):
            spatial = self.backbone.forward_spatial(x).float()  # (1, D, h, w)
        if isinstance(self.head, ICNetHead):
            return self.head(spatial)[1][0, 0].cpu().numpy().astype(np.float64)
        return torch.einsum("dhw,d->hw", spatial[0], self._w).cpu().numpy() + self._b

    def view(self, image: Image.Image) -> Image.Image:
        """The part of ``image`` the model scores: the centre square (crop) or all of it (whole)."""
        if self.whole:
            return image
        size = min(image.size)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        return image.crop((left, top, left + size, top + size))

    def save(self, path: str | Path) -> None:
        ckpt.save_atomic({"kind": "clic-scorer", "config": to_dict(self.cfg), "head": self.head.state(),
                          "head_type": "icnet" if isinstance(self.head, ICNetHead) else "linear",
                          "input": "whole" if self.whole else "crop", "features": "stages" if self.stages else "last",
                          "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
                          "meta": self.meta, "git": ckpt.git_revision()}, path)


def load_scorer(path_or_uri: str | Path, device: str | torch.device | None = None) -> Scorer:
    """A scorer from a local file, or from an MLflow URI (``models:/clic-clicv2@champion``,
    ``runs:/<id>/scorer``) when MLflow is installed (:mod:`clic.model_uri`, imported only for URIs)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = str(path_or_uri)
    path = fetch_scorer(text) if is_uri(text) else Path(text)
    state = ckpt.load(path)
    if state.get("kind") != "clic-scorer":
        raise ValueError(f"{path}: not a clic scorer (kind={state.get('kind')!r}); fit one with `clic probe`")
    backbone, cfg = rebuild_backbone(state, path)
    head_type, view = state.get("head_type", "linear"), state.get("input", "crop")
    features = state.get("features", "last")
    if head_type not in ("linear", "icnet") or view not in ("crop", "whole") or features not in ("last", "stages"):
        raise ValueError(f"{path}: unknown scorer head {head_type!r}, input {view!r} or features {features!r}; "
                         "a newer clic wrote it")
    head = ICNetHead.from_state(state["head"]) if head_type == "icnet" else LinearHead.from_state(state["head"])
    return Scorer(backbone, cfg, head, state.get("meta"), device, whole=view == "whole", stages=features == "stages")


def blend_heatmap(image: Image.Image, values: np.ndarray, alpha: float = 0.5,
                  vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Overlay ``values`` (h, w), upsampled bilinearly, on ``image`` with a blue-to-red colormap."""
    lo = float(np.min(values) if vmin is None else vmin)
    hi = float(np.max(values) if vmax is None else vmax)
    t = np.clip((values - lo) / max(hi - lo, 1e-8), 0, 1)
    small = Image.fromarray((t * 255).astype(np.uint8), "L").resize(image.size, Image.Resampling.BILINEAR)
    u = np.asarray(small, np.float64) / 255.0
    # a perceptually ordered ramp: dark blue -> cyan -> yellow -> red
    stops = np.array([[0.1, 0.1, 0.6], [0.0, 0.8, 0.9], [1.0, 0.9, 0.1], [0.85, 0.05, 0.05]])
    pos = u * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    rgb = (stops[i] * (1 - f) + stops[i + 1] * f) * 255
    heat = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return Image.blend(image.convert("RGB"), heat, alpha)
