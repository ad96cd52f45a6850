"""A complexity scorer: frozen encoder + fitted linear head + preprocessing, in one safe file.

    scorer = clic.load_scorer("models/clicv2/scorer.pt")
    scores = scorer(["a.jpg", pil_image, tensor_batch])      # numpy array, the label's scale

The file holds tensors, numbers and strings only (``torch.load(weights_only=True)``). ``scorer.map``
applies the head to every spatial position (ResNet feature map / ViT patch tokens): because the
features are mean-pooled and the head is linear, the mean of the map equals the image's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clic.config import PretrainConfig, from_dict, to_dict
from clic.embed import eval_transform, extract, load_for_model
from clic.engine import checkpoint as ckpt
from clic.engine.train import autocast
from clic.evaluation.probe import LinearHead
from clic.models.backbones import ResNetBackbone, ViTBackbone, build_backbone

ImageLike = str | Path | Image.Image | torch.Tensor


class Scorer:
    def __init__(self, backbone: ResNetBackbone | ViTBackbone, cfg: PretrainConfig, head: LinearHead,
                 meta: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.cfg, self.head, self.meta = cfg, head, dict(meta or {})
        self.transform = eval_transform(cfg.image_size)
        w = torch.from_numpy(head.weight / head.scale).float()  # fold standardisation into the head
        self._w = w.to(self.device)
        self._b = float(head.bias - (head.mean / head.scale) @ head.weight)

    # ------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, "auto"):
            return self.backbone(x.to(self.device)).float()

    def _tensor(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        img = item if isinstance(item, Image.Image) else load_for_model(item, self.cfg.image_size)
        return self.transform(img.convert("RGB"))

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Scores for PIL images, paths, a (3, H, W) tensor or a normalised (B, 3, H, W) batch."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch = images
        else:
            items = [images] if isinstance(images, str | Path | Image.Image | torch.Tensor) else list(images)
            batch = torch.stack([self._tensor(i) for i in items])
        return (self.features(batch) @ self._w + self._b).cpu().numpy().astype(np.float64)

    def score_files(self, paths: Sequence[Path], batch_size: int = 64, workers: int = 2,
                    progress: bool = True) -> tuple[np.ndarray, list[int], list[str]]:
        """Scores of the decodable files (decoding in loader workers, overlapped with compute),
        their indices in ``paths``, and one error message per unreadable file."""
        feats, kept, errors = extract(self.backbone, paths, self.cfg.image_size, batch_size, workers,
                                      self.device, progress)
        return feats.astype(np.float64) @ self._w.cpu().double().numpy() + self._b, kept, errors

    # --------------------------------------------------------------------------------- maps
    @torch.no_grad()
    def map(self, image: ImageLike) -> np.ndarray:
        """Per-position complexity (h, w): the head applied to each spatial feature."""
        x = self._tensor(image)[None].to(self.device)
        with autocast(self.device, "auto"):
            spatial = self.backbone.forward_spatial(x).float()[0]  # (D, h, w)
        return torch.einsum("dhw,d->hw", spatial, self._w).cpu().numpy() + self._b

    def save(self, path: str | Path) -> None:
        ckpt.save_atomic({"kind": "clic-scorer", "config": to_dict(self.cfg), "head": self.head.state(),
                          "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
                          "meta": self.meta, "git": ckpt.git_revision()}, path)


def load_scorer(path_or_uri: str | Path, device: str | torch.device | None = None) -> Scorer:
    """A scorer from a local file, or from an MLflow URI (``models:/clic-clicv2@champion``,
    ``runs:/<id>/scorer``) when MLflow is installed (imported only for URIs)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = str(path_or_uri)
    path = Path(text)
    if "://" in text or text.startswith(("models:/", "runs:/")):
        try:
            import mlflow  # noqa: PLC0415 - optional integration, only for URIs
        except ImportError as exc:
            raise ValueError(f"{text}: loading a URI needs MLflow (pip install 'clic[pipeline]')") from exc
        local = Path(mlflow.artifacts.download_artifacts(text))
        path = local / "scorer.pt" if local.is_dir() else local
    state = ckpt.load(path)
    if state.get("kind") != "clic-scorer":
        raise ValueError(f"{path}: not a clic scorer (kind={state.get('kind')!r}); fit one with `clic probe`")
    cfg = from_dict(PretrainConfig, state["config"], f"{path}:config")
    backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth, cfg.pool)
    backbone.load_state_dict(state["backbone"])
    return Scorer(backbone, cfg, LinearHead.from_state(state["head"]), state.get("meta"), device)


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
