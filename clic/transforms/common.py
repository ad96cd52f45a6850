"""Small building blocks shared by the view recipes."""

from __future__ import annotations

import torch
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_tensor_normalized() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`to_tensor_normalized`: (B, 3, H, W) back to [0, 1]."""
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


class GaussianNoise:
    """Additive Gaussian noise on a [0, 1] tensor with probability ``p`` (CLIC's key view)."""

    def __init__(self, std: float, p: float) -> None:
        if std < 0 or not 0 <= p <= 1:
            raise ValueError(f"GaussianNoise: need std >= 0 and p in [0, 1], got std={std}, p={p}")
        self.std, self.p = std, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p and torch.rand(()) < self.p:
            x = (x + torch.randn_like(x) * self.std).clamp(0, 1)
        return x


def photometric(jitter: tuple[float, float, float, float], jitter_p: float, grayscale_p: float = 0.0,
                blur_p: float = 0.0, blur_sigma: tuple[float, float] = (0.1, 2.0), kernel: int = 9) -> list:
    """Colour jitter, grayscale and blur, each applied with its probability."""
    ops: list = []
    if jitter_p > 0 and any(jitter):
        ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p))
    if grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(kernel | 1, blur_sigma)], p=blur_p))
    return ops
