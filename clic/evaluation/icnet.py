"""ICNet's complexity head trained on frozen spatial features: ``probe.protocol: icnet``.

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
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clic.config import IcnetProbeConfig


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


class SpatialLayoutAttention(nn.Module):
    """ICNet's SLAM: each channel scaled by a sigmoid weight computed from its own spatial layout.

    (B, C, h, w) -> (B, C, h, w); the layout is resized (bilinear) to ``grid`` when it differs.
    """

    def __init__(self, grid: tuple[int, int], hidden: int = 512) -> None:
        super().__init__()
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(grid[0] * grid[1], hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        layout = x if (h, w) == self.grid else F.interpolate(x, size=self.grid, mode="bilinear", align_corners=True)
        gate = self.mlp(layout.reshape(b, c, -1))  # (B, C, 1)
        return x * gate.unsqueeze(-1)  # (B, C, h, w)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU())


class ICNetHead(nn.Module):
    """Map and score heads of ICNet on frozen (B, D, h, w) features; ``forward`` returns the
    score (B,) and the complexity map (B, 1, h, w), both in [0, 1]."""

    alpha = math.nan  # no penalty to report (the linear heads report ridge's)
    mean: torch.Tensor  # (D,) per-channel standardisation of the frozen features
    scale: torch.Tensor  # (D,)

    def __init__(self, dim: int, grid: tuple[int, int], channels: int = 512, kernel: int = 3,
                 hidden: int = 512) -> None:
        super().__init__()
        self.hparams = {"dim": dim, "grid_h": grid[0], "grid_w": grid[1], "channels": channels, "kernel": kernel,
                        "hidden": hidden}
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.to_map = nn.Sequential(_conv_bn_relu(dim, channels, kernel), SpatialLayoutAttention(grid, hidden))
        self.map_out = nn.Conv2d(channels, 1, 1)
        self.to_score = nn.Sequential(_conv_bn_relu(dim, channels, kernel), SpatialLayoutAttention(grid, hidden))
        self.score_mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.score_out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.mean[:, None, None]) / self.scale[:, None, None]  # (B, D, h, w)
        cmap = torch.sigmoid(self.map_out(self.to_map(x)))  # (B, 1, h, w)
        pooled = self.to_score(x).mean(dim=(2, 3))  # (B, C)
        return torch.sigmoid(self.score_out(self.score_mlp(pooled))).squeeze(1), cmap  # (B,), (B, 1, h, w)

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Scores (N,) float64 of frozen features (N, D, h, w) (numpy, possibly a memmap)."""
        self.eval()
        dev = self.mean.device
        out = [self(torch.from_numpy(np.asarray(x[s:s + batch_size], np.float32)).to(dev))[0].double().cpu()
               for s in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def state(self) -> dict[str, Any]:
        """Tensors and numbers only (loadable with ``torch.load(weights_only=True)``)."""
        return {"type": "icnet", **self.hparams,
                "weights": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> ICNetHead:
        head = cls(int(s["dim"]), (int(s["grid_h"]), int(s["grid_w"])), int(s["channels"]), int(s["kernel"]),
                   int(s["hidden"]))
        head.load_state_dict(s["weights"])
        return head.eval()


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
