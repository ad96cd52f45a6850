"""MoCo v2 / CLIC two-view recipe (MoCo ``TwoCropsTransform`` with CLIC's key-view extras)."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

from clic.config import MocoViewConfig, RCMConfig
from clic.transforms.common import MEAN, STD, GaussianNoise, photometric
from clic.transforms.rcm import RandomCropMix


class MocoViews:
    """PIL image -> ``(query, key)`` normalised tensors of shape (3, size, size).

    query: RandomResizedCrop + colour jitter + grayscale + blur + horizontal flip.
    key: the same recipe plus CLIC's vertical flip, rotation and Gaussian noise, or, with
    ``rcm`` given (CLIC, ``rcm.pairing`` key/both), a Random-Crop-and-Mix mosaic of the image
    followed by the photometric part of the recipe.
    """

    def __init__(self, size: int, cfg: MocoViewConfig, rcm: RCMConfig | None = None) -> None:
        self.size = size
        photo = photometric(cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.blur_sigma,
                            kernel=max(3, size // 10))
        crop = T.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True)
        flip = T.RandomHorizontalFlip(cfg.hflip_p)
        finish = [T.ToTensor()]
        self.query = T.Compose([crop, *photo, flip, *finish, T.Normalize(MEAN, STD)])
        key_geom: list = []
        if cfg.key_vflip_p > 0:
            key_geom.append(T.RandomVerticalFlip(cfg.key_vflip_p))
        if cfg.key_rotation_deg > 0:
            key_geom.append(T.RandomApply([T.RandomRotation(cfg.key_rotation_deg)], p=cfg.key_rotation_p))
        key_tail = [*finish]
        if cfg.key_noise_p > 0:
            key_tail.append(GaussianNoise(cfg.key_noise_std, cfg.key_noise_p))
        key_tail.append(T.Normalize(MEAN, STD))
        if rcm is not None:
            mix = RandomCropMix.from_config(rcm, size)  # authors mode: the native mosaic resized to size
            self.key = T.Compose([mix, *photo, flip, *key_geom, *key_tail])
        else:
            self.key = T.Compose([crop, *photo, flip, *key_geom, *key_tail])

    def __call__(self, img: Image.Image) -> dict:
        return {"query": self.query(img), "key": self.key(img)}
