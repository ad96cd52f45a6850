"""Heads on frozen features that a scorer carries: what a probe fits and a scorer applies.

``LinearHead`` (probe protocols ridge and sgd, and transfer's softmax) on pooled features (N, D):
``pred = ((x - mean) / scale) @ weight + bias``, one format whatever fitted it.
``ICNetHead`` (probe protocol icnet) on spatial maps (B, D, h, w): ICNet's complexity map head
(conv-bn-relu -> SLAM -> 1x1 conv -> sigmoid) and score head (conv-bn-relu -> SLAM -> global
average pool -> MLP -> sigmoid) of Feng et al. (IC9600, TPAMI 2022). SLAM (spatial layout
attention) gates each channel by a sigmoid weight that an MLP (h*w -> 512 -> 1) reads from that
channel's (h, w) layout resized to a fixed grid.

Both have ``predict`` and ``state`` (tensors and numbers only, for ``torch.load(weights_only=True)``)
and ``from_state``. Fitting them is evaluation's (:mod:`clic.evaluation.probe`,
:mod:`clic.evaluation.icnet`); applying them is the scorer's (:mod:`clic.scorer`).

Shapes: N samples, B batch, D feature channels, C classes or branch channels, h x w feature grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class LinearHead:
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (D,) regression or (D, C) classification
    bias: np.ndarray  # () or (C,)
    alpha: float = math.nan

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def state(self) -> dict[str, torch.Tensor | float]:
        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale),
                "weight": torch.from_numpy(np.asarray(self.weight)), "bias": torch.as_tensor(self.bias),
                "alpha": float(self.alpha)}

    @classmethod
    def from_state(cls, s: dict) -> LinearHead:
        return cls(s["mean"].double().numpy(), s["scale"].double().numpy(), s["weight"].double().numpy(),
                   s["bias"].double().numpy(), float(s.get("alpha", math.nan)))


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


Head = LinearHead | ICNetHead
