"""MoCo v2 (Chen et al. 2020) and CLIC (Liu et al. 2024) = MoCo v2 + RCM positives
(+ optional complexity-aware loss).

Stateful parts only: the momentum key encoder and the negative queue. Losses come from
:mod:`clic.losses`; the momentum coefficient is passed in each step by the engine's schedule.
Two guards of MoCo's that a small dataset makes matter: the queue remembers each key's image, and
a query never takes a stale key of its own image as a negative; and shuffling BN (He et al. 2020,
sec. 3.3), so that BatchNorm statistics cannot let a query find its key: under DDP the key batch
is shuffled across ranks (MoCo's ``_batch_shuffle_ddp``), in one process both encoders normalise
``bn_splits`` sub-batches and the key batch is shuffled before it is split (docs/design.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clic import distributed as dist
from clic.config import MocoConfig
from clic.distributed import concat_all_gather
from clic.losses import complexity_aware_loss, global_entropy, info_nce
from clic.models.backbones import ResNetBackbone, ViTBackbone


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
    queue_ids: torch.Tensor  # (K,) image id of each queued key, -1 = none

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
        self.register_buffer("queue_ids", torch.full((cfg.queue_size,), -1, dtype=torch.long))
        self.split_bn = cfg.shuffle_bn and not backbone.is_vit  # ViTs have no BatchNorm

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    @torch.no_grad()
    @torch.compiler.disable
    def _negatives(self, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's negatives: a copy of the queue (K, D) and, given the batch's image ids (B,),
        the (B, K) mask of queued keys from the query's own image. Made outside any compiled graph:
        under ``torch.compile`` (2.14) a copy taken inside the graph is elided, backward then reads
        the queue buffers after ``_enqueue`` has overwritten them, and the gradients are silently
        wrong (tests/test_models.py compares compiled and eager gradients)."""
        exclude = None if ids is None else self.queue_ids.unsqueeze(0) == ids.unsqueeze(1)  # (B, K)
        return self.queue.clone(), exclude

    @torch.no_grad()
    @torch.compiler.disable
    def _enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None) -> None:
        """Write keys (from every rank) and their image ids at the pointer, wrapping around the ring
        (outside any compiled graph: see :meth:`_negatives`)."""
        keys = concat_all_gather(keys)  # (B * world, D)
        ids = concat_all_gather(ids) if ids is not None else torch.full(
            (keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        k = self.queue.shape[0]
        keys, ids = keys[-k:], ids[-k:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ids[idx] = ids.to(self.queue_ids.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % k)
        self.queue_filled.add_(keys.shape[0])

    def _splits(self, b: int) -> int:
        """Sub-batches with their own BN statistics (1 = whole batch)."""
        if not self.split_bn or dist.world_size() > 1:
            return 1
        if b % self.cfg.bn_splits:
            raise ValueError(f"moco.bn_splits={self.cfg.bn_splits} must divide the batch of {b}")
        return self.cfg.bn_splits

    @torch.no_grad()
    def _keys(self, xk: torch.Tensor) -> torch.Tensor:
        """Key embeddings (B, D) in the batch's order, computed on a shuffled batch (shuffling BN)."""
        if not self.split_bn:
            return self.encoder_k(xk)
        if dist.world_size() > 1:
            shuffled, inverse = dist.batch_shuffle(xk)
            return dist.batch_unshuffle(self.encoder_k(shuffled), inverse)
        perm = torch.randperm(xk.shape[0]).to(xk.device)  # (B,)
        k = torch.cat([self.encoder_k(c) for c in xk[perm].chunk(self._splits(xk.shape[0]))])
        return k[torch.argsort(perm)]

    def forward(self, batch: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        xq, xk = batch["query"], batch["key"]
        ids = batch.get("image_id")  # (B,) source image of each sample, for the queue's exclusion
        splits = self._splits(xq.shape[0])
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, momentum)
            k = self._keys(xk)  # (B, D)
        parts: dict[str, torch.Tensor] = {}
        if self.cfg.complexity_weight > 0:
            enc = self.encoder_q
            chunks = [enc.backbone.forward_stages(c) for c in xq.chunk(splits)]  # type: ignore[operator]
            stages = [torch.cat(level) for level in zip(*chunks, strict=True)]
            feat = torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1)  # (B, D)
            q = F.normalize(enc.head(feat), dim=1)
            parts["complexity"] = complexity_aware_loss(stages, global_entropy(xq))
        else:
            q = torch.cat([self.encoder_q(c) for c in xq.chunk(splits)])  # (B, D)
        queue, exclude = self._negatives(ids)  # (K, D), (B, K): own image's stale keys
        parts["contrast"] = info_nce(q.float(), k.float(), queue, self.cfg.temperature, exclude)
        loss = parts["contrast"] + self.cfg.complexity_weight * parts.get("complexity", 0.0)
        self._enqueue(k.float(), ids)
        return {"loss": loss, **parts}
