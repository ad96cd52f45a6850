"""CLICv2 shifted patchify (Chen, Zhao, Liu 2025, arXiv 2503.06641).

One random resized crop is rendered on a canvas of side ``size + patch``; view 1 is the window at
``origin``, view 2 the window at ``origin + (dy, dx)`` (:class:`clic.transforms.plan.ShiftPlan`),
so patch (i, j) of view 2 sees patch (i, j) of view 1 moved by less than half a patch: the
positive then shares more pixels with its anchor than any neighbouring (negative) patch does.
Flips are shared so corresponding patches keep their geometry; colour jitter is drawn per view.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from clic.config import ShiftConfig
from clic.transforms.batch import BatchPhotometric, DeviceViews
from clic.transforms.common import MEAN, STD, photometric
from clic.transforms.plan import ShiftPlan, shifted_windows, turn


class ShiftedPatchViews:
    """PIL image -> dict(view1, view2: (3, size, size) normalised tensors, shift: (2,) long (dy, dx))."""

    def __init__(self, size: int, patch: int, cfg: ShiftConfig, photometric_ops: bool = True) -> None:
        self.size, self.patch, self.plan = size, patch, ShiftPlan(size, patch, cfg)
        self.photometric_ops = photometric_ops  # False: uint8 views, finished by device_views()
        self.photo = T.Compose(photometric(cfg.jitter, cfg.jitter_p))
        self.norm = T.Normalize(MEAN, STD)

    def __call__(self, img: Image.Image) -> dict:
        cut, (dy, dx) = self.plan.draw(*img.size)
        canvas = turn(F.resized_crop(img, *cut.box, [self.size + self.patch] * 2, antialias=True), cut)
        x = F.to_tensor(canvas) if self.photometric_ops else F.pil_to_tensor(canvas)  # (3, size + P, size + P)
        v1, v2 = shifted_windows(x, self.size, dy, dx)
        if self.photometric_ops:
            v1, v2 = self.norm(self.photo(v1)), self.norm(self.photo(v2))
        return {"view1": v1, "view2": v2, "shift": torch.tensor([dy, dx], dtype=torch.long)}


def device_views(cfg: ShiftConfig) -> DeviceViews:
    """The device-side half of :class:`ShiftedPatchViews` built with ``photometric_ops=False``."""
    photo = BatchPhotometric(cfg.jitter, cfg.jitter_p)
    return DeviceViews({"view1": photo, "view2": photo})
