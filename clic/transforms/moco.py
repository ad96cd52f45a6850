"""MoCo v2 / CLIC two-view recipe (MoCo ``TwoCropsTransform`` with CLIC's key-view extras)."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

from clic.config import MocoViewConfig, RCMConfig
from clic.transforms.batch import BatchPhotometric, DeviceViews
from clic.transforms.common import MEAN, STD, GaussianNoise, photometric
from clic.transforms.rcm import RandomCropMix


class MocoViews:
    """PIL image -> ``(query, key)`` normalised tensors of shape (3, size, size).

    query: RandomResizedCrop + colour jitter + grayscale + blur + horizontal flip.
    key: the same recipe plus CLIC's vertical flip, rotation and Gaussian noise, or, with
    ``rcm`` given (CLIC, ``rcm.pairing`` key/both), a Random-Crop-and-Mix mosaic of the image
    followed by the photometric part of the recipe.
    """

    def __init__(self, size: int, cfg: MocoViewConfig, rcm: RCMConfig | None = None,
                 photometric_ops: bool = True) -> None:
        """``photometric_ops=False``: geometry only, uint8 tensors out; the photometric ops, key
        noise and normalisation then run on the device (:func:`device_views`)."""
        self.size = size
        photo = photometric(cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.blur_sigma,
                            kernel=max(3, size // 10)) if photometric_ops else []
        crop = T.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True)
        flip = T.RandomHorizontalFlip(cfg.hflip_p)
        finish = [T.ToTensor()] if photometric_ops else [T.PILToTensor()]
        norm = [T.Normalize(MEAN, STD)] if photometric_ops else []
        self.query = T.Compose([crop, *photo, flip, *finish, *norm])
        key_geom: list = []
        if cfg.key_vflip_p > 0:
            key_geom.append(T.RandomVerticalFlip(cfg.key_vflip_p))
        if cfg.key_rotation_deg > 0:
            key_geom.append(T.RandomApply([T.RandomRotation(cfg.key_rotation_deg)], p=cfg.key_rotation_p))
        key_tail = [*finish]
        if cfg.key_noise_p > 0 and photometric_ops:
            key_tail.append(GaussianNoise(cfg.key_noise_std, cfg.key_noise_p))
        key_tail.extend(norm)
        if rcm is not None:
            mix = RandomCropMix.from_config(rcm, size)  # authors mode: the native mosaic resized to size
            self.key = T.Compose([mix, *photo, flip, *key_geom, *key_tail])
        else:
            self.key = T.Compose([crop, *photo, flip, *key_geom, *key_tail])

    def __call__(self, img: Image.Image) -> dict:
        return {"query": self.query(img), "key": self.key(img)}


def device_views(size: int, cfg: MocoViewConfig) -> DeviceViews:
    """The device-side half of :class:`MocoViews` built with ``photometric_ops=False``."""
    photo = BatchPhotometric(cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.blur_sigma,
                             kernel=max(3, size // 10))
    noise = {"key": (cfg.key_noise_std, cfg.key_noise_p)} if cfg.key_noise_p > 0 else {}
    return DeviceViews({"query": photo, "key": photo}, noise)
