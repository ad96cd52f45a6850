"""The geometry of each method's views, drawn once per image as a plan: where each view is cut
(a box on the image as displayed), its flips and, for CLIC's key, its rotation; for CLICv2 the
canvas and the shift of view 2.

The loader cuts a plan from the decoded PIL image (:mod:`clic.transforms.moco`,
:mod:`clic.transforms.shifted`) and the training device cuts the same plan from the batch it
decoded (:mod:`clic.transforms.decode`): the geometry is described once, so nothing depends on two
implementations drawing random numbers in the same order. Draws come from the sample's seeded
RNGs (torch for boxes, flips and rotations as torchvision draws them; python for the shift).
"""

from __future__ import annotations

import dataclasses
import random

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from clic.config import MocoViewConfig, ShiftConfig


@dataclasses.dataclass(frozen=True)
class Cut:
    """One view: ``box`` (top, left, h, w) resized to the view's side, then flipped
    (``hflip``, ``vflip``) and rotated by ``angle`` degrees (0: none)."""

    box: tuple[int, int, int, int]
    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0


def turn(img: Image.Image, cut: Cut) -> Image.Image:
    """A cut's flips and rotation on a PIL image (nearest, corners black: torchvision's
    RandomRotation)."""
    if cut.hflip:
        img = F.hflip(img)
    if cut.vflip:
        img = F.vflip(img)
    return F.rotate(img, cut.angle) if cut.angle else img


def crop_box(width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (top, left, h, w) for an image of this size, from the
    image's size alone (no pixels)."""
    shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # no pixels allocated
    top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
    return int(top), int(left), int(h), int(w)


def _chance(p: float) -> bool:
    return p > 0 and bool(torch.rand(1) < p)


class MocoPlan:
    """MoCo v2 / CLIC: a random resized crop per view with a horizontal flip; the key adds CLIC's
    vertical flip and rotation. ``views.key_rotation_deg`` > 0 draws an angle in
    ``[-deg, deg]`` with probability ``key_rotation_p``."""

    views = ("query", "key")
    patch = None  # views cut straight from the image (no canvas)
    ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, MoCo's

    def __init__(self, size: int, cfg: MocoViewConfig) -> None:
        self.size, self.cfg = size, cfg

    def draw(self, width: int, height: int) -> dict[str, Cut]:
        cfg = self.cfg
        query = Cut(crop_box(width, height, cfg.crop_scale, self.ratio), _chance(cfg.hflip_p))
        box = crop_box(width, height, cfg.crop_scale, self.ratio)
        hflip, vflip, angle = _chance(cfg.hflip_p), _chance(cfg.key_vflip_p), 0.0
        if cfg.key_rotation_deg > 0 and _chance(cfg.key_rotation_p):
            angle = float(torch.empty(1).uniform_(-cfg.key_rotation_deg, cfg.key_rotation_deg))
        return {"query": query, "key": Cut(box, hflip, vflip, angle)}


class ShiftPlan:
    """CLICv2: one square random resized crop rendered as a canvas of side ``size + patch``, its
    horizontal flip, and the shift (dy, dx) of view 2's window (:func:`draw_shift`)."""

    views = ("view1", "view2")

    def __init__(self, size: int, patch: int, cfg: ShiftConfig) -> None:
        self.size, self.patch, self.cfg = size, patch, cfg

    def draw(self, width: int, height: int) -> tuple[Cut, tuple[int, int]]:
        canvas = Cut(crop_box(width, height, self.cfg.crop_scale, (1.0, 1.0)), random.random() < self.cfg.hflip_p)
        return canvas, draw_shift(self.patch, self.cfg)


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
