"""CLICv2 shifted patchify (Chen, Zhao, Liu 2025, arXiv 2503.06641).

Positives come from the same image content rather than from different crops: one random
resized crop is rendered on a canvas of side ``size + patch``; view 1 is the window at
``origin``, view 2 the window at ``origin + (dy, dx)``. Both views are patchified on their own
grid, so patch (i, j) of view 2 sees the content of patch (i, j) of view 1 moved by the shift.
The shift magnitude lies in ``[min_shift, max_shift] * patch``, strictly below half a patch, along
a direction drawn from horizontal, vertical or diagonal, with a random sign. Below half a patch
the positive (the same grid cell) always shares more pixels with the anchor than any negative
does: along a shifted axis the positive overlaps ``1 - s`` of the patch and the neighbouring cell
``s``; at ``s >= 1/2`` a negative would be the better match for the anchor's content. Colour jitter is drawn
independently per view; flips are shared so corresponding patches keep their geometry.
"""

from __future__ import annotations

import random

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from clic.config import ShiftConfig
from clic.transforms.batch import BatchPhotometric, DeviceViews
from clic.transforms.common import MEAN, STD, photometric


def draw_shift(patch: int, cfg: ShiftConfig) -> tuple[int, int]:
    """A (dy, dx) offset in pixels, each component with ``2 * |d| < patch``."""
    if not cfg.enabled:
        return 0, 0
    hi = min((patch - 1) // 2, int(round(cfg.max_shift * patch)))  # strictly below half a patch
    lo = min(hi, int(round(cfg.min_shift * patch)))
    mag = random.randint(lo, hi)
    direction = random.choice(cfg.directions)
    sy, sx = random.choice((-1, 1)), random.choice((-1, 1))
    if direction == "horizontal":
        return 0, sx * mag
    if direction == "vertical":
        return sy * mag, 0
    return sy * mag, sx * mag


def shifted_windows(canvas: torch.Tensor, size: int, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ``size`` x ``size`` windows of a (C, size + P, size + P) canvas: view 1 at the
    origin that lets both fit, view 2 moved by (dy, dx)."""
    oy, ox = max(0, -dy), max(0, -dx)
    return (canvas[:, oy:oy + size, ox:ox + size],
            canvas[:, oy + dy:oy + dy + size, ox + dx:ox + dx + size])


class ShiftedPatchViews:
    """PIL image -> dict(view1, view2: (3, size, size) normalised tensors, shift: (2,) long (dy, dx))."""

    def __init__(self, size: int, patch: int, cfg: ShiftConfig, photometric_ops: bool = True) -> None:
        if size % patch:
            raise ValueError(f"ShiftedPatchViews: patch={patch} must divide size={size}")
        self.size, self.patch, self.cfg = size, patch, cfg
        self.canvas = T.RandomResizedCrop(size + patch, scale=cfg.crop_scale, ratio=(1.0, 1.0), antialias=True)
        self.photometric_ops = photometric_ops  # False: uint8 views, finished by device_views()
        self.photo = T.Compose(photometric(cfg.jitter, cfg.jitter_p))
        self.norm = T.Normalize(MEAN, STD)

    def __call__(self, img: Image.Image) -> dict:
        canvas = self.canvas(img)
        if random.random() < self.cfg.hflip_p:
            canvas = F.hflip(canvas)
        x = F.to_tensor(canvas) if self.photometric_ops else F.pil_to_tensor(canvas)  # (3, size + P, size + P)
        dy, dx = draw_shift(self.patch, self.cfg)
        v1, v2 = shifted_windows(x, self.size, dy, dx)
        if self.photometric_ops:
            v1, v2 = self.norm(self.photo(v1)), self.norm(self.photo(v2))
        return {"view1": v1, "view2": v2, "shift": torch.tensor([dy, dx], dtype=torch.long)}


def device_views(cfg: ShiftConfig) -> DeviceViews:
    """The device-side half of :class:`ShiftedPatchViews` built with ``photometric_ops=False``."""
    photo = BatchPhotometric(cfg.jitter, cfg.jitter_p)
    return DeviceViews({"view1": photo, "view2": photo})
