"""ICNet's complexity head (:class:`clic.models.heads.ICNetHead`) trained on frozen spatial
features: ``probe.protocol: icnet``.

ICNet (Feng et al., IC9600, TPAMI 2022; github tinglyfeng/IC9600) is IC9600's supervised baseline
and the head the CLIC paper trains on its frozen encoders (ResNet-18: PCC 0.890 / SRCC 0.883). On
its feature map sit a complexity map head (conv-bn-relu -> SLAM -> 1x1 conv -> sigmoid) and a score
head (conv-bn-relu -> SLAM -> global average pool -> MLP 512 -> 512 -> 1 -> sigmoid), trained with
``0.9 MSE(score, y) + 0.1 MSE(mean(map), y)`` by SGD (lr 0.05, momentum 0.9, wd 1e-3, batch 64,
30 epochs, 1 warm-up epoch, lr x0.2 at epochs 10 and 20) on whole images at 512 x 512 with
horizontal flips. SLAM (spatial layout attention) gates each channel by a sigmoid weight that an
MLP (h*w -> 512 -> 1) reads from that channel's (h, w) layout resized to a fixed grid.

Here both heads sit on one frozen encoder's last map (B, D, h, w), standardised per channel with
training-set moments, instead of ICNet's two fine-tuned ResNet branches (detail at 512 px, context
at 256 px) at 1/8 resolution; the map has the feature grid's resolution (ResNet: size/32; ViT:
size/patch); flips are features of flipped images extracted once; the output biases start at the
logit of the mean label.

Shapes: B batch, D feature channels, C branch channels, h x w feature grid.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clic.config import IcnetProbeConfig
from clic.models.heads import ICNetHead


def icnet_loss(score: torch.Tensor, cmap: torch.Tensor, target: torch.Tensor, map_weight: float = 0.1) -> torch.Tensor:
    """ICNet's loss ``(1 - w) MSE(score, y) + w MSE(mean(map), y)`` (w = 0.1 in ICNet).

    score (B,), cmap (B, 1, h, w), target (B,): the map's mean is a second estimate of the score.
    """
    return (1 - map_weight) * F.mse_loss(score, target) + map_weight * F.mse_loss(cmap.mean(dim=(1, 2, 3)), target)


def icnet_lr(epoch: float, base_lr: float, warmup_epochs: float = 1, milestones: tuple[int, ...] = (10, 20),
             gamma: float = 0.2) -> float:
    """Learning rate at fractional epoch ``epoch`` (0-based): linear warm-up, then x ``gamma`` at
    each milestone reached (ICNet: WarmUpLR for 1 epoch, MultiStepLR at 10 and 20, gamma 0.2)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def channel_moments(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (D,) of features (N, D) or (N, D, h, w) over every other axis,
    streamed in chunks of N (``x`` may be a memmap larger than memory); std 1 for constant channels."""
    d, axes = x.shape[1], tuple(a for a in range(x.ndim) if a != 1)
    s, sq, count = np.zeros(d), np.zeros(d), 0
    for i in range(0, len(x), chunk):
        c = np.asarray(x[i:i + chunk], np.float64)
        s += c.sum(axis=axes)
        sq += (c ** 2).sum(axis=axes)
        count += c.size // d
    mean = s / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0))
    std[std < 1e-8] = 1.0
    return mean, std


def fit_icnet(x: np.ndarray, y: np.ndarray, cfg: IcnetProbeConfig | None = None, seed: int = 0,
              x_flip: np.ndarray | None = None, device: str | torch.device = "cpu") -> ICNetHead:
    """Train an :class:`ICNetHead` on frozen features ``x`` (N, D, h, w) against scores ``y`` (N,)
    in [0, 1], with ICNet's loss and schedule. ``x_flip`` (N, D, h, w): features of the flipped
    images; each step takes, per sample, the flipped one with probability 0.5 (ICNet's
    RandomHorizontalFlip). Deterministic given ``seed`` (initialisation, order and flips)."""
    cfg = cfg or IcnetProbeConfig()
    y = np.asarray(y, np.float64)
    if x.ndim != 4:
        raise ValueError(f"icnet probe needs spatial features (N, D, h, w), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"icnet probe needs at least 2 training samples, got {len(x)}")
    n, d, h, w = x.shape
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        head = ICNetHead(d, (h, w), cfg.channels, cfg.kernel, cfg.hidden)
    mean, std = channel_moments(x)
    head.mean.copy_(torch.from_numpy(mean))
    head.scale.copy_(torch.from_numpy(std))
    prior = float(np.clip(y.mean(), 0.01, 0.99))
    for out in (head.map_out, head.score_out):  # start both outputs at the mean label, not at sigmoid(~0) = 0.5
        nn.init.constant_(cast(torch.Tensor, out.bias), math.log(prior / (1 - prior)))
    head.to(dev).train()
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    xt = torch.from_numpy(np.asarray(x, np.float32))
    xf = torch.from_numpy(np.asarray(x_flip, np.float32)) if x_flip is not None else None
    if xf is not None and xf.shape != xt.shape:
        raise ValueError(f"flipped features {tuple(xf.shape)} do not match the features {tuple(xt.shape)}")
    yt = torch.from_numpy(y).float()
    g = torch.Generator().manual_seed(seed)
    steps = math.ceil(n / cfg.batch_size)
    for epoch in range(cfg.epochs):
        for i, idx in enumerate(torch.randperm(n, generator=g).split(cfg.batch_size)):
            lr = icnet_lr(epoch + i / steps, cfg.lr, cfg.warmup_epochs, cfg.milestones, cfg.gamma)
            for group in opt.param_groups:
                group["lr"] = lr
            xb = xt[idx]  # (B, D, h, w)
            if xf is not None:
                flipped = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flipped[:, None, None, None], xf[idx], xb)
            if len(idx) < 2 and h * w == 1:
                continue  # batch norm needs two values per channel
            score, cmap = head(xb.to(dev, non_blocking=True))
            loss = icnet_loss(score, cmap, yt[idx].to(dev), cfg.map_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"icnet probe: non-finite loss at epoch {epoch}; lower probe.icnet.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()
