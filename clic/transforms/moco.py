"""MoCo v2 / CLIC two-view recipe (MoCo ``TwoCropsTransform`` with CLIC's key-view extras)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from clic.config import MocoViewConfig, RCMConfig
from clic.transforms.batch import BatchPhotometric, DeviceViews
from clic.transforms.common import MEAN, STD, GaussianNoise, photometric
from clic.transforms.plan import MocoPlan, turn
from clic.transforms.rcm import RandomCropMix


class MocoViews:
    """PIL image -> ``(query, key)`` normalised tensors of shape (3, size, size).

    Each view is its :class:`clic.transforms.plan.MocoPlan` cut (random resized crop), then
    colour jitter + grayscale + blur, then the cut's flips (and the key's rotation, CLIC), as
    MoCo v2 and the CLIC code order them; the key adds CLIC's Gaussian noise. With ``rcm`` given
    (CLIC, ``rcm.pairing`` key/both) the key's crop is a Random-Crop-and-Mix mosaic of the image.
    """

    def __init__(self, size: int, cfg: MocoViewConfig, rcm: RCMConfig | None = None,
                 photometric_ops: bool = True) -> None:
        """``photometric_ops=False``: geometry only, uint8 tensors out; the photometric ops, key
        noise and normalisation then run on the device (:func:`device_views`)."""
        self.size, self.plan = size, MocoPlan(size, cfg)
        self.photo = T.Compose(photometric(cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.blur_sigma,
                                           kernel=max(3, size // 10)) if photometric_ops else [])
        norm = [T.Normalize(MEAN, STD)] if photometric_ops else []
        finish = T.ToTensor() if photometric_ops else T.PILToTensor()
        noise = [GaussianNoise(cfg.key_noise_std, cfg.key_noise_p)] if cfg.key_noise_p > 0 and photometric_ops else []
        self.finish = {"query": T.Compose([finish, *norm]), "key": T.Compose([finish, *noise, *norm])}
        self.mix = RandomCropMix.from_config(rcm, size) if rcm is not None else None  # authors: resized to size

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out = {}
        for view, cut in self.plan.draw(*img.size).items():
            x = self.mix(img) if view == "key" and self.mix is not None else F.resized_crop(
                img, *cut.box, [self.size, self.size], antialias=True)
            out[view] = self.finish[view](turn(self.photo(x), cut))
        return out


def device_views(size: int, cfg: MocoViewConfig) -> DeviceViews:
    """The device-side half of :class:`MocoViews` built with ``photometric_ops=False``."""
    photo = BatchPhotometric(cfg.jitter, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.blur_sigma,
                             kernel=max(3, size // 10))
    noise = {"key": (cfg.key_noise_std, cfg.key_noise_p)} if cfg.key_noise_p > 0 else {}
    return DeviceViews({"query": photo, "key": photo}, noise)
