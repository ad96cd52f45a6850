"""Masked entropy modelling inputs (CLICv2): patch masks and per-patch entropy targets.

Mask convention throughout the package: ``mask`` is a bool tensor (B, L), True = hidden.
"""

from __future__ import annotations

import torch


def random_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly ``round(ratio * L)`` hidden patches per sample, chosen uniformly. Returns (B, L) bool."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_hidden = int(round(ratio * num_patches))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, L)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < n_hidden


def patch_entropy(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Shannon entropy of each patch's 256-bin grey-level histogram, in bits / 8 (so in [0, 1]).

    images: (B, 3, H, W) RGB in [0, 1] (float) or [0, 255] (uint8); H, W multiples of ``patch``.
    Returns (B, L) with L = (H / P) * (W / P), patches in row-major order (as ViT patchify).
    Grey level = round(0.299 R + 0.587 G + 0.114 B) on the 0..255 scale (ITU-R BT.601).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"patch_entropy expects (B, 3, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch_entropy: patch={patch} must divide the image size {h}x{w}")
    # (B, H, W) -> (B, L, P*P), row-major over the patch grid
    grey = grey_levels(images).view(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    grey = grey.reshape(b, (h // patch) * (w // patch), patch * patch)
    return histogram_entropy(grey)


def image_entropy(images: torch.Tensor) -> torch.Tensor:
    """Global grey-level entropy of whole images in bits / 8: (B, 3, H, W) -> (B,)."""
    return histogram_entropy(grey_levels(images).flatten(1))


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] (float) or [0, 255] (uint8) -> (B, H, W) long grey levels 0..255."""
    x = images.float() if images.dtype.is_floating_point else images.float() / 255.0
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return ((x * weights).sum(1) * 255.0).round().clamp(0, 255).long()


def histogram_entropy(levels: torch.Tensor) -> torch.Tensor:
    """Entropy in bits / 8 of the 256-bin histogram along the last dim: (..., M) long -> (...)."""
    counts = torch.zeros(*levels.shape[:-1], 256, device=levels.device)  # (..., 256)
    counts.scatter_add_(-1, levels, torch.ones_like(levels, dtype=torch.float32))
    p = counts / levels.shape[-1]
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1) / 8.0  # 0 log 0 = 0
