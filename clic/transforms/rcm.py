"""Random Crop and Mix (CLIC, Liu et al. 2024; reconstructed from the authors' public code).

From one image with short side ``s`` take square crops at three scales: ``c`` crops of side
``s/c``, ``2c`` of side ``s/2c`` and ``4c`` of side ``s/4c`` (``c = 3`` by default). Each crop is
lightly augmented (flips, rotation up to ``rotation_deg``, colour jitter) with probability
``aug_p``; ``grid * grid`` of them, shuffled, are resized to one cell and stitched into a
``grid x grid`` mosaic of side ``out_size``. The mosaic mixes local content of its source image at
several scales, which CLIC uses as a positive of that image.
"""

from __future__ import annotations

import random

from PIL import Image
from torchvision import transforms as T


class RandomCropMix:
    """PIL image -> PIL mosaic of side ``out_size``."""

    def __init__(self, out_size: int, crops: int = 3, grid: int = 2, aug_p: float = 0.5,
                 rotation_deg: float = 20.0, jitter: float = 0.2) -> None:
        if out_size < grid or crops < 1 or grid < 1:
            raise ValueError(f"RandomCropMix: need out_size >= grid >= 1 and crops >= 1, got "
                             f"out_size={out_size}, grid={grid}, crops={crops}")
        if grid * grid > 7 * crops:
            raise ValueError(f"RandomCropMix: {grid}x{grid} cells need more than the {7 * crops} crops drawn")
        self.out_size, self.crops, self.grid, self.aug_p = out_size, crops, grid, aug_p
        self.light = T.Compose([
            T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
            T.RandomRotation(rotation_deg), T.ColorJitter(jitter, jitter, jitter),
        ])

    def crop_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """All multi-scale square crop boxes (left, top, right, bottom) for one image."""
        s = min(width, height)
        boxes = []
        for k in (self.crops, 2 * self.crops, 4 * self.crops):
            side = max(1, s // k)
            for _ in range(k):
                x = random.randint(0, width - side)
                y = random.randint(0, height - side)
                boxes.append((x, y, x + side, y + side))
        return boxes

    def __call__(self, img: Image.Image) -> Image.Image:
        boxes = self.crop_boxes(*img.size)
        random.shuffle(boxes)
        cell = self.out_size // self.grid
        mosaic = Image.new("RGB", (cell * self.grid, cell * self.grid))
        for i, box in enumerate(boxes[: self.grid * self.grid]):
            crop = img.crop(box)
            if random.random() < self.aug_p:
                crop = self.light(crop)
            crop = crop.resize((cell, cell), Image.Resampling.BICUBIC)
            mosaic.paste(crop, ((i % self.grid) * cell, (i // self.grid) * cell))
        if mosaic.size[0] != self.out_size:
            mosaic = mosaic.resize((self.out_size, self.out_size), Image.Resampling.BICUBIC)
        return mosaic
