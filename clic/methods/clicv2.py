"""CLICv2 (Liu et al. 2025): a ViT, shifted patchify (two views whose patch grids are offset by
part of a patch), a patch-wise contrastive loss and masked entropy modelling
(:class:`clic.models.clicv2.CLICv2`, :mod:`clic.transforms.shifted`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from clic.config import CLICv2Config, ParamError, PretrainConfig
from clic.methods.base import Method, register
from clic.models.clicv2 import CLICv2 as CLICv2Model
from clic.transforms.plan import ShiftPlan
from clic.transforms.shifted import ShiftedPatchViews
from clic.transforms.shifted import device_views as shifted_device_views


@register
class CLICv2(Method):
    name = "clicv2"
    sections = ("optim", "clicv2", "shift")
    weights_prefix = "backbone."

    def check(self, cfg: PretrainConfig) -> None:
        if not cfg.backbone.startswith("vit"):
            raise ParamError("backbone", "method clicv2 needs a ViT backbone: {key} must be one of vit_tiny, "
                             f"vit_small, vit_base, vit_large, got {cfg.backbone!r}")

    def views(self, cfg: PretrainConfig, photometric: bool) -> Callable[[Any], dict]:
        return ShiftedPatchViews(cfg.image_size, cfg.patch_size, cfg.shift, photometric_ops=photometric)

    def plan(self, cfg: PretrainConfig) -> ShiftPlan:
        return ShiftPlan(cfg.image_size, cfg.patch_size, cfg.shift)

    def device_views(self, cfg: PretrainConfig) -> Any:
        return shifted_device_views(cfg.shift)

    def model(self, cfg: PretrainConfig, backbone: nn.Module) -> nn.Module:
        return CLICv2Model(backbone, cfg.clicv2)  # type: ignore[arg-type]

    def momentum(self, cfg: PretrainConfig) -> CLICv2Config:
        return cfg.clicv2
