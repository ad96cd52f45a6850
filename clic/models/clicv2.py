"""CLICv2 (Chen, Zhao, Liu 2025): shifted patchify + patch-wise contrast + masked entropy modelling.

Online branch: ViT on view 1 with a random fraction of patches replaced by a learned mask token,
a per-token projection head, and a small transformer decoder that predicts each patch's grey-level
entropy. Momentum branch: ViT + head on the unmasked, shifted view 2. Loss =
patch-wise InfoNCE (token l of view 1 vs token l of view 2, other tokens negatives; anchors are
the visible tokens of view 1 only) + ``mem_weight`` x MSE of the entropy predicted at hidden patches.

Ablations: ``shift.enabled`` (in the views), ``loss: patch|image`` (image-wise uses the mean
token, the global batch's other images as negatives), ``mem`` on/off. Under DDP both losses
contrast each rank's queries with every rank's keys (gathered without gradient).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from clic import distributed as dist
from clic.config import CLICv2Config
from clic.distributed import concat_all_gather
from clic.losses import info_nce, masked_entropy_loss, patch_info_nce
from clic.models.backbones import ViTBackbone
from clic.models.moco import momentum_update, projection_head
from clic.transforms.common import denormalize
from clic.transforms.masking import patch_entropy, random_mask


class EntropyDecoder(nn.Module):
    """Tokens (B, L, D) -> predicted entropy in [0, 1] per patch (B, L)."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=2.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.norm(self.blocks(tokens)))).squeeze(-1)


class TokenHead(nn.Module):
    """Projection applied to every token: (B, L, D) -> (B, L, dim), L2-normalised."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = projection_head(in_dim, out_dim, "mlp")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(tokens), dim=-1)


class CLICv2(nn.Module):
    """Batch ``{"view1", "view2"}`` of (B, 3, H, W) -> dict of losses (``loss`` is the total)."""

    def __init__(self, backbone: ViTBackbone, cfg: CLICv2Config) -> None:
        super().__init__()
        if not backbone.is_vit:
            raise ValueError("CLICv2 needs a ViT backbone")
        self.cfg = cfg
        self.backbone = backbone
        self.head = TokenHead(backbone.feature_dim, cfg.dim)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in (*self.key_backbone.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)
        if cfg.mem:
            self.mask_token = nn.Parameter(torch.zeros(backbone.feature_dim))
            nn.init.normal_(self.mask_token, std=0.02)
            heads = max(1, backbone.feature_dim // 64)
            self.decoder = EntropyDecoder(backbone.feature_dim, cfg.decoder_depth, heads)

    def forward(self, batch: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        x1, x2 = batch["view1"], batch["view2"]
        b = x1.shape[0]
        mask = None
        if self.cfg.mem:
            mask = random_mask(b, self.backbone.num_patches, self.cfg.mask_ratio, x1.device)  # (B, L)
        tokens = self.backbone.forward_tokens(x1, mask, self.mask_token if self.cfg.mem else None)  # (B, L, D)
        q = self.head(tokens)  # (B, L, dim)
        with torch.no_grad():
            momentum_update(self.backbone, self.key_backbone, momentum)
            momentum_update(self.head, self.key_head, momentum)
            k = self.key_head(self.key_backbone.forward_tokens(x2))  # (B, L, dim)
        parts: dict[str, torch.Tensor] = {}
        # anchors are visible tokens only: a mask token's output is MEM's business, and contrasting
        # it would make MEM on/off change the contrastive task too (a confounded ablation)
        visible = ~mask if mask is not None else None  # (B, L)
        # every rank's key tokens are negatives (no gradient flows into keys): 8 processes x 32
        # images contrast with the keys of 256, as one process at 256 does
        offset = dist.rank() * b if dist.world_size() > 1 else 0
        if self.cfg.loss == "patch":
            keys = concat_all_gather(k.float()) if dist.world_size() > 1 else k.float()  # (world*B, L, dim)
            parts["contrast"] = patch_info_nce(q.float(), keys, self.cfg.temperature, self.cfg.max_tokens,
                                               anchors=visible, key_offset=offset)
        else:
            if visible is not None:  # mean of the visible tokens
                w = visible.unsqueeze(-1).to(q.dtype)  # (B, L, 1)
                qi = F.normalize((q.float() * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0), dim=1)  # (B, dim)
            else:
                qi = F.normalize(q.float().mean(dim=1), dim=1)  # (B, dim)
            ki = F.normalize(k.float().mean(dim=1), dim=1)
            ki = concat_all_gather(ki) if dist.world_size() > 1 else ki  # (world*B, dim)
            parts["contrast"] = info_nce(qi, ki, None, self.cfg.temperature, key_offset=offset)
        loss = parts["contrast"]
        if self.cfg.mem and mask is not None:
            target = patch_entropy(denormalize(x1.float()), self.backbone.patch_size)  # (B, L)
            pred = self.decoder(tokens).float()  # (B, L)
            parts["mem"] = masked_entropy_loss(pred, target, mask)
            loss = loss + self.cfg.mem_weight * parts["mem"]
        return {"loss": loss, **parts}
