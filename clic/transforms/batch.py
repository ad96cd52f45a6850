"""The photometric half of the view recipes, applied to a whole batch on the training device.

With ``pretrain.augment_on: device`` the loader only decodes and crops (uint8 views); colour
jitter, grayscale, blur, CLIC's key noise and the normalisation run here, batched (at 224 px they
are ~85% of a loader core's time per image: bench/bench_decode.py, docs/operations.md). Same
distributions as the PIL recipe (torchvision ``ColorJitter``, ``RandomGrayscale``,
``GaussianBlur``), drawn per sample from a generator the engine seeds from (seed, epoch, step), so
a resumed run draws the same; the four jitter operations run in a fixed order (brightness,
contrast, saturation, hue) instead of torchvision's random order.

Shapes: B batch, 3 channels, H x W pixels; images in [0, 1] unless said otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clic.transforms.common import MEAN, STD

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> HSV, hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV -> RGB."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6  # (B, H, W) sector of the hue circle
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack((torch.stack((v, q, p, p, t, v), 1),   # R per sector
                         torch.stack((t, v, v, q, p, p), 1),   # G
                         torch.stack((p, p, t, v, v, q), 1)), 1)  # B: (B, 3, 6, H, W)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (B,), reflect padding, odd ``kernel``."""
    b, c, h, w = x.shape
    half = kernel // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(pos[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))  # (B, k)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*3, k): one kernel per channel
    y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


class BatchPhotometric:
    """Colour jitter (probability ``jitter_p``), grayscale and blur on a (B, 3, H, W) batch in
    [0, 1], each drawn per sample; the arguments mean what they mean for the PIL recipe
    (:func:`clic.transforms.common.photometric`)."""

    def __init__(self, jitter: tuple[float, float, float, float], jitter_p: float, grayscale_p: float = 0.0,
                 blur_p: float = 0.0, blur_sigma: tuple[float, float] = (0.1, 2.0), kernel: int = 9) -> None:
        if not all(j >= 0 for j in jitter) or jitter[3] > 0.5:
            raise ValueError(f"BatchPhotometric: jitter must be >= 0 with hue <= 0.5, got {jitter}")
        for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"BatchPhotometric: {name} must be in [0, 1], got {p}")
        self.jitter, self.jitter_p, self.grayscale_p = jitter, jitter_p, grayscale_p
        self.blur_p, self.blur_sigma, self.kernel = blur_p, blur_sigma, kernel | 1

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = x.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:  # (B,)
            return lo + (hi - lo) * torch.rand(b, generator=g, device=x.device, dtype=x.dtype)

        def chance(p: float) -> torch.Tensor:  # (B,) bool
            return torch.rand(b, generator=g, device=x.device) < p

        if self.jitter_p > 0 and any(self.jitter):
            on = chance(self.jitter_p)
            br, co, sa, hu = self.jitter
            f_b, f_c, f_s = (torch.where(on, uniform(max(0.0, 1 - j), 1 + j), 1.0) for j in (br, co, sa))
            f_h = torch.where(on, uniform(-hu, hu), 0.0)
            x = (x * _per_sample(f_b)).clamp(0, 1)
            m = gray(x).mean((2, 3), keepdim=True)  # (B, 1, 1, 1) mean luma
            x = (_per_sample(f_c) * x + (1 - _per_sample(f_c)) * m).clamp(0, 1)
            x = (_per_sample(f_s) * x + (1 - _per_sample(f_s)) * gray(x)).clamp(0, 1)
            if hu > 0:
                hsv = rgb_to_hsv(x)
                hsv = torch.cat(((hsv[:, :1] + _per_sample(f_h)) % 1.0, hsv[:, 1:]), 1)
                x = hsv_to_rgb(hsv)
        if self.grayscale_p > 0:
            x = torch.where(_per_sample(chance(self.grayscale_p)), gray(x).expand_as(x), x)
        if self.blur_p > 0:
            on = chance(self.blur_p)
            x = torch.where(_per_sample(on), blur(x, uniform(*self.blur_sigma), self.kernel), x)
        return x


class DeviceViews:
    """Finishes the loader's uint8 views on the device: photometric ops, CLIC's key noise,
    normalisation. ``views`` maps a batch key to its :class:`BatchPhotometric`; ``noise`` maps a
    key to (std, p) of additive Gaussian noise applied after the photometric ops."""

    def __init__(self, views: dict[str, BatchPhotometric], noise: dict[str, tuple[float, float]] | None = None) -> None:
        self.views, self.noise = views, noise or {}

    def __call__(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        out = dict(batch)
        for key, photo in self.views.items():
            x = batch[key]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            x = photo(x, g)
            if key in self.noise:
                std, p = self.noise[key]
                on = torch.rand(x.shape[0], generator=g, device=x.device) < p
                noise = torch.randn(x.shape, generator=g, device=x.device) * std
                x = torch.where(_per_sample(on), (x + noise).clamp(0, 1), x)
            mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
            std_ = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
            out[key] = ((x - mean) / std_).contiguous(memory_format=torch.preserve_format)
        return out
