"""Backbones behind one interface, built by composition (no copied model code, no hub downloads).

- ResNet-18/34/50 from torchvision with random init; features = global average pool.
- ViT tiny/small/base/large from timm with configurable image size, patch size and depth;
  features = mean of patch tokens (or the CLS token).

Every backbone exposes ``forward(x) -> (B, D)``, ``forward_spatial(x) -> (B, D, h, w)``,
``forward_pooled_stages(x) -> (B, stages_dim)`` (pools of several depths) and ``feature_dim``;
ViTs also ``forward_tokens(x, mask, mask_token) -> (B, L, D)`` and ResNets
``forward_stages(x) -> list of (B, C, H, W)``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision import models as tvm

from clic.config import PretrainConfig

RESNETS = {"resnet18": tvm.resnet18, "resnet34": tvm.resnet34, "resnet50": tvm.resnet50}
VITS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
        "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}
BACKBONES = (*RESNETS, *VITS)


class ResNetBackbone(nn.Module):
    is_vit = False
    feature_dim: int
    net: Any

    def __init__(self, name: str) -> None:
        super().__init__()
        net = RESNETS[name](weights=None)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        out = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]  # (B, D, H/32, W/32)

    @property
    def stages_dim(self) -> int:
        return self.feature_dim * 15 // 8  # the four stages have D/8, D/4, D/2 and D channels

    def forward_pooled_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pools of the four stages, concatenated: (B, C1 + C2 + C3 + C4). Early
        stages keep the texture density that the last stage's pool averages away."""
        return torch.cat([s.mean(dim=(2, 3)) for s in self.forward_stages(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, D)


class ViTBackbone(nn.Module):
    is_vit = True
    feature_dim: int
    vit: Any

    def __init__(self, name: str, image_size: int, patch_size: int, depth: int = 0, pool: str = "mean") -> None:
        super().__init__()
        depth_kw: dict[str, Any] = {"depth": depth} if depth else {}  # 0: the model's own depth
        self.vit = timm.create_model(VITS[name], pretrained=False, img_size=image_size, patch_size=patch_size,
                                     num_classes=0, **depth_kw)
        self.feature_dim = self.vit.embed_dim
        self.patch_size, self.grid, self.pool = patch_size, image_size // patch_size, pool

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward_all(x, mask, mask_token)[:, self.vit.num_prefix_tokens:]

    def _forward_all(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: (B, 3, H, W) -> (B, prefix + L, D).

        mask: (B, L) bool, True = hidden; hidden patches are replaced by ``mask_token`` (D,)
        before position embedding (SimMIM/iBOT style), so every position still has an output.
        """
        v = self.vit
        t = v.patch_embed(x)  # (B, L, D)
        if mask is not None:
            if mask_token is None:
                raise ValueError("forward_tokens: a mask needs a mask_token")
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)
        t = v.norm_pre(v.patch_drop(v._pos_embed(t)))  # (B, prefix + L, D)
        return v.norm(v.blocks(t))  # (B, prefix + L, D)

    @property
    def stages_dim(self) -> int:
        return len(self.stage_taps) * self.feature_dim

    @property
    def stage_taps(self) -> list[int]:
        """The blocks whose outputs :meth:`forward_pooled_stages` pools: the last of each quarter."""
        depth = len(self.vit.blocks)
        return sorted({max(0, round(depth * k / 4) - 1) for k in range(1, 5)})

    def forward_pooled_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Mean patch token after each quarter of the blocks (final norm applied to each),
        concatenated: (B, taps x D)."""
        taps = self.vit.forward_intermediates(x, self.stage_taps, norm=True, output_fmt="NLC",
                                              intermediates_only=True)  # each (B, L, D), prefix tokens removed
        return torch.cat([t.mean(dim=1) for t in taps], dim=1)

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_tokens(x)  # (B, L, D)
        b, l, d = t.shape
        return t.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # (B, D, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._forward_all(x)  # (B, prefix + L, D)
        if self.pool == "cls" and self.vit.num_prefix_tokens:
            return t[:, 0]
        return t[:, self.vit.num_prefix_tokens:].mean(dim=1)  # (B, D)


def at_resolution(backbone: nn.Module, cfg: PretrainConfig, size: int) -> tuple[nn.Module, PretrainConfig]:
    """The same encoder fed ``size`` px inputs, and its config saying so. ResNets pool globally and
    take any size; a ViT is rebuilt on the new patch grid with its position embedding resampled
    bicubically (timm's ``resample_abs_pos_embed``). Testing above the training resolution
    compensates RandomResizedCrop's magnification (Touvron et al. 2019, FixRes)."""
    if not size or size == cfg.image_size:
        return backbone, cfg
    new_cfg = cfg.model_copy(update={"image_size": size})
    if not isinstance(backbone, ViTBackbone):
        return backbone, new_cfg
    new = build_backbone(cfg.backbone, size, cfg.patch_size, cfg.depth, cfg.pool)
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    state["vit.pos_embed"] = resample_abs_pos_embed(
        state["vit.pos_embed"], [new.grid, new.grid], [backbone.grid, backbone.grid],
        num_prefix_tokens=0 if backbone.vit.no_embed_class else backbone.vit.num_prefix_tokens)
    new.load_state_dict(state)
    param = next(backbone.parameters())
    return new.to(param.device).train(backbone.training), new_cfg


def build_backbone(name: str, image_size: int = 224, patch_size: int = 16, depth: int = 0,
                   pool: str = "mean") -> ResNetBackbone | ViTBackbone:
    if name in RESNETS:
        return ResNetBackbone(name)
    if name in VITS:  # patch_size divides image_size: PretrainConfig's rule
        return ViTBackbone(name, image_size, patch_size, depth, pool)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
