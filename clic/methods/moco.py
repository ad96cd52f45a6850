"""MoCo v2 (He et al. 2020; Chen et al. 2020): two augmented views of an image, a momentum key
encoder, a queue of negatives (:class:`clic.models.moco.MoCo`, :mod:`clic.transforms.moco`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from clic.config import MocoConfig, ParamError, PretrainConfig
from clic.methods.base import Method, register
from clic.models.moco import MoCo
from clic.transforms.moco import MocoViews
from clic.transforms.moco import device_views as moco_device_views
from clic.transforms.plan import MocoPlan


def _rule(key: str, ok: bool, template: str) -> None:
    if not ok:
        raise ParamError(key, template)


@register
class MocoV2(Method):
    name = "moco"
    sections: ClassVar[tuple[str, ...]] = ("optim", "moco", "views")
    weights_prefix = "encoder_q.backbone."

    def check(self, cfg: PretrainConfig) -> None:
        _rule("decode_on", not (cfg.decode_on == "device" and cfg.views.key_rotation_deg > 0
                                and cfg.views.key_rotation_p > 0),
              "{key}=device cuts crops and flips only; set views.key_rotation_deg to 0 or use decode_on: loader")
        splits = cfg.moco.bn_splits
        _rule("moco.bn_splits", cfg.backbone.startswith("vit") or not cfg.moco.shuffle_bn
              or (cfg.batch_size % splits == 0 and cfg.batch_size // splits >= 2),
              f"{{key}}={splits} must divide batch_size={cfg.batch_size} into sub-batches of at least 2 images "
              "(or set moco.shuffle_bn: false)")

    def views(self, cfg: PretrainConfig, photometric: bool) -> Callable[[Any], dict]:
        return MocoViews(cfg.image_size, cfg.views, None, photometric_ops=photometric)

    def plan(self, cfg: PretrainConfig) -> MocoPlan:
        return MocoPlan(cfg.image_size, cfg.views)

    def device_views(self, cfg: PretrainConfig) -> Any:
        return moco_device_views(cfg.image_size, cfg.views)

    def model(self, cfg: PretrainConfig, backbone: nn.Module) -> nn.Module:
        return MoCo(backbone, cfg.moco)  # type: ignore[arg-type]

    def momentum(self, cfg: PretrainConfig) -> MocoConfig:
        return cfg.moco

    def check_images(self, cfg: PretrainConfig, n_images: int | None, sharded: bool) -> None:
        """Refuse a queue longer than ``max_queue_fraction`` of the pretraining images: it would
        hold several stale keys of most images. (A query's own image is excluded from its
        negatives anyway; what remains is a queue of mostly stale keys, which MoCo's K << N
        assumption avoids.)"""
        if n_images is None:
            return
        moco, limit = cfg.moco, int(cfg.moco.max_queue_fraction * n_images)
        if moco.queue_size > limit:
            raise ValueError(f"moco.queue_size={moco.queue_size} exceeds moco.max_queue_fraction="
                             f"{moco.max_queue_fraction} of the {n_images} pretraining images (at most {limit}); "
                             "lower the queue or pretrain on more images (pretrain.data)")
