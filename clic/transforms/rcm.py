"""Random Crop and Mix (CLIC, Liu et al. 2024): mosaics of square crops of one image.

With ``s`` the image's short side and ``c = crops``, crops are square with side ``s/c``, ``s/2c``
or ``s/4c`` (the three scales). ``rcm.mode``: ``authors``, the authors' script (``data/scm.py``):
one scale per mosaic, two crops of it and lightly augmented copies fill the ``grid²`` cells,
shuffled, pasted at native size, the mosaic resized only as a whole; ``pool``: ``c``, ``2c``,
``4c`` crops of the three sides pooled, ``grid²`` of them drawn shuffled, each augmented with
probability ``aug_p`` and resized to a cell. ``max_upscale`` keeps out the scales that would be
upsampled more (upsampling blurs, and blur changes complexity). docs/design.md ("RCM ...") gives
the details and the deviations from the authors. A mosaic is a positive of its source image
(``rcm.pairing``: as the key view, or as an extra training image).
"""

from __future__ import annotations

import math
import random
from typing import Literal

from PIL import Image
from torchvision import transforms as T

from clic.config import RCMConfig

Box = tuple[int, int, int, int]  # (left, top, right, bottom)


class RandomCropMix:
    """PIL image -> PIL mosaic of side ``out_size`` (``authors`` with ``out_size`` None: of side
    ``grid * tile``, the tiles at native size).

    ``source_resolution`` is read by :class:`clic.data.dataset.ViewDataset`: extra mosaics are then
    cut from the record's source file instead of the resized cache (when the file exists).
    """

    def __init__(self, out_size: int | None, crops: int = 3, grid: int = 2, aug_p: float = 0.5,
                 rotation_deg: float = 20.0, jitter: float = 0.2, mode: Literal["pool", "authors"] = "pool",
                 max_upscale: float = 2.0, source_resolution: bool = False) -> None:
        if mode not in ("pool", "authors"):
            raise ValueError(f"RandomCropMix: mode must be pool or authors, got {mode!r}")
        if crops < 1 or grid < 1 or (out_size is not None and out_size < grid):
            raise ValueError(f"RandomCropMix: need out_size >= grid >= 1 and crops >= 1, got "
                             f"out_size={out_size}, grid={grid}, crops={crops}")
        # the settings' bounds are RCMConfig's (clic.config); out_size is the caller's
        if mode == "pool" and out_size is None:
            raise ValueError("RandomCropMix: pool mode resizes crops to cells of out_size // grid; give out_size")
        self.out_size, self.crops, self.grid, self.aug_p = out_size, crops, grid, aug_p
        self.mode, self.max_upscale, self.source_resolution = mode, max_upscale, source_resolution
        flips = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
        # pool: the whole light recipe, applied to a crop with probability aug_p
        self.light = T.Compose([*flips, T.RandomRotation(rotation_deg), T.ColorJitter(jitter, jitter, jitter)])
        # authors: applied to every copy; rotation and jitter each with probability aug_p
        self.copy_aug = T.Compose([*flips, T.RandomApply([T.RandomRotation(rotation_deg)], p=aug_p),
                                   T.RandomApply([T.ColorJitter(jitter, jitter, jitter, min(jitter, 0.5))], p=aug_p)])

    @classmethod
    def from_config(cls, cfg: RCMConfig, out_size: int | None) -> RandomCropMix:
        """The RCM of ``pretrain.<method>.rcm`` rendering mosaics of side ``out_size``."""
        return cls(out_size, cfg.crops, cfg.grid, cfg.aug_p, cfg.rotation_deg, cfg.jitter, cfg.mode,
                   cfg.max_upscale, cfg.source_resolution)

    def sides(self, short: int) -> list[int]:
        """Crop sides of the three scales, largest first: ``s/c``, ``s/2c``, ``s/4c``."""
        return [max(1, short // k) for k in (self.crops, 2 * self.crops, 4 * self.crops)]

    def crop_boxes(self, width: int, height: int, min_side: int = 1) -> list[Box]:
        """The pool: ``c``, ``2c``, ``4c`` random square boxes of the three sides, keeping only the
        scales with side >= ``min_side`` (the largest scale when none), topped up to ``grid²`` boxes
        with more of the largest kept scale."""
        sides = self.sides(min(width, height))
        counts = (self.crops, 2 * self.crops, 4 * self.crops)
        kept = [(k, side) for k, side in zip(counts, sides, strict=True) if side >= min_side] or [(counts[0], sides[0])]
        boxes = [_random_box(width, height, side) for k, side in kept for _ in range(k)]
        boxes += [_random_box(width, height, kept[0][1]) for _ in range(self.grid ** 2 - len(boxes))]
        return boxes

    def draw_boxes(self, width: int, height: int) -> list[Box]:
        """Pool mode: the ``grid²`` boxes of one mosaic, in cell order (row-major)."""
        assert self.out_size is not None
        cell = self.out_size // self.grid
        min_side = math.ceil(cell / self.max_upscale)  # max_upscale .inf: 0, every scale
        boxes = self.crop_boxes(width, height, min_side)
        random.shuffle(boxes)
        return boxes[: self.grid * self.grid]

    def draw_side(self, short: int, scale: int | None = None) -> int:
        """Authors mode: the tile side of one mosaic, uniform over the scales the cap allows, or of
        scale ``scale`` (0: ``s/c``, 1: ``s/2c``, 2: ``s/4c``) when given."""
        sides = self.sides(short)
        if scale is not None:
            return sides[scale % len(sides)]
        if self.out_size is not None:
            sides = [t for t in sides if self.grid * t * self.max_upscale >= self.out_size] or sides[:1]
        return random.choice(sides)

    def __call__(self, img: Image.Image, scale: int | None = None) -> Image.Image:
        """A mosaic of ``img``; authors mode at scale ``scale`` (see :meth:`draw_side`) when given."""
        if self.mode == "pool":
            assert self.out_size is not None
            cell = self.out_size // self.grid
            crops = [img.crop(box) for box in self.draw_boxes(*img.size)]
            crops = [self.light(c) if random.random() < self.aug_p else c for c in crops]
            return self._paste([c.resize((cell, cell), Image.Resampling.BICUBIC) for c in crops], cell)
        side = self.draw_side(min(img.size), scale)
        originals = [img.crop(_random_box(*img.size, side)) for _ in range(2)]
        tiles = originals + [self.copy_aug(originals[i % 2]) for i in range(self.grid ** 2 - 2)]
        random.shuffle(tiles)
        return self._paste(tiles, side)  # native size: rotation and jitter keep the tile's size

    def extra(self, img: Image.Image, k: int) -> Image.Image:
        """The ``k``-th extra training mosaic of ``img`` (``rcm.pairing`` extra/both): authors mode
        at scale ``k mod 3``, one mosaic per scale as the authors' script; pool mode draws."""
        return self(img, k)

    def _paste(self, tiles: list[Image.Image], side: int) -> Image.Image:
        """The ``grid²`` tiles of side ``side`` pasted row-major, the mosaic resized to ``out_size``."""
        mosaic = Image.new("RGB", (side * self.grid, side * self.grid))
        for i, tile in enumerate(tiles):
            mosaic.paste(tile, ((i % self.grid) * side, (i // self.grid) * side))
        if self.out_size is not None and mosaic.size[0] != self.out_size:
            mosaic = mosaic.resize((self.out_size, self.out_size), Image.Resampling.BICUBIC)
        return mosaic


def extra_mosaics(cfg: RCMConfig, image_size: int) -> RandomCropMix:
    """The RCM that makes extra training images (``rcm.pairing`` extra/both). ``pool`` renders
    them at twice the view size (at least 64 px); ``authors`` leaves them at native size for the
    view pipeline to crop and resize, as the authors' mosaics written to disk."""
    return RandomCropMix.from_config(cfg, max(image_size * 2, 64) if cfg.mode == "pool" else None)


def _random_box(width: int, height: int, side: int) -> Box:
    x = random.randint(0, width - side)
    y = random.randint(0, height - side)
    return (x, y, x + side, y + side)
