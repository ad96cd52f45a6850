"""MoCo v2 (Chen et al. 2020) and CLIC (Liu et al. 2024) = MoCo v2 + RCM positives
(+ optional complexity-aware loss).

Stateful parts only: the momentum key encoder and the negative queue. Losses come from
:mod:`clic.losses`; the momentum coefficient is passed in each step by the engine's schedule.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clic.config import MocoConfig
from clic.engine.distributed import concat_all_gather
from clic.losses import complexity_aware_loss, info_nce
from clic.models.backbones import ResNetBackbone, ViTBackbone
from clic.transforms.common import denormalize
from clic.transforms.masking import image_entropy


def projection_head(in_dim: int, out_dim: int, kind: str, hidden: int = 0) -> nn.Module:
    """``linear``: MoCo v1's fc; ``mlp``: MoCo v2's Linear-ReLU-Linear (hidden = in_dim by default)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings (B, dim)."""

    def __init__(self, backbone: ResNetBackbone | ViTBackbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online (parameters; buffers copied)."""
    for p_o, p_t in zip(online.parameters(), target.parameters(), strict=True):
        p_t.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
    for b_o, b_t in zip(online.buffers(), target.buffers(), strict=True):
        b_t.copy_(b_o)


class MoCo(nn.Module):
    """Batch ``{"query", "key"}`` of (B, 3, H, W) -> dict of losses (``loss`` is the total)."""

    queue: torch.Tensor  # (K, D) L2-normalised keys
    queue_ptr: torch.Tensor  # () next write position
    queue_filled: torch.Tensor  # () keys written so far (all ranks)

    def __init__(self, backbone: ResNetBackbone | ViTBackbone, cfg: MocoConfig) -> None:
        super().__init__()
        if cfg.complexity_weight > 0 and backbone.is_vit:
            raise ValueError("moco.complexity_weight > 0 needs a ResNet backbone (stage feature maps)")
        self.cfg = cfg
        head = projection_head(backbone.feature_dim, cfg.dim, cfg.head, cfg.mlp_hidden)
        self.encoder_q = Encoder(backbone, head)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (from every rank) at the pointer, wrapping around the ring buffer."""
        keys = concat_all_gather(keys)  # (B * world, D)
        k = self.queue.shape[0]
        keys = keys[-k:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % k)
        self.queue_filled.add_(keys.shape[0])

    def forward(self, batch: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        xq, xk = batch["query"], batch["key"]
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, momentum)
            k = self.encoder_k(xk)  # (B, D)
        parts: dict[str, torch.Tensor] = {}
        if self.cfg.complexity_weight > 0:
            enc = self.encoder_q
            stages = enc.backbone.forward_stages(xq)  # type: ignore[operator]
            feat = torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1)  # (B, D)
            q = F.normalize(enc.head(feat), dim=1)
            parts["complexity"] = complexity_aware_loss(stages, image_entropy(denormalize(xq.float())))
        else:
            q = self.encoder_q(xq)  # (B, D)
        queue = self.queue.clone().detach()
        parts["contrast"] = info_nce(q.float(), k.float(), queue, self.cfg.temperature)
        loss = parts["contrast"] + self.cfg.complexity_weight * parts.get("complexity", 0.0)
        self._enqueue(k.float())
        return {"loss": loss, **parts}
