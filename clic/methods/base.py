"""What the generic pretraining loop asks of a method, and the registry of methods by name.

A method is one module of :mod:`clic.methods` holding one :class:`Method` subclass decorated with
:func:`register`: its views (the loader's half, the plan of its crops for ``decode_on: device``,
the batched photometric half for ``augment_on: device``), its model, the config section its
momentum is read from, its extra training images, its checks of the config and of the images,
and where its online backbone sits in a training checkpoint. :mod:`clic.pretrain`,
:mod:`clic.embed` and the stages name no method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from clic.config import METHOD_RULES, PretrainConfig
from clic.data.dataset import ExtraImages
from clic.data.table import Record


class Method:
    """A self-supervised method (subclass it, set the class attributes, register it)."""

    name: ClassVar[str]
    # the config sections the method reads (``clic params --method``, the recipe card)
    sections: ClassVar[tuple[str, ...]] = ("optim",)
    # the online backbone's prefix in the model's state dict (training checkpoint -> encoder)
    weights_prefix: ClassVar[str] = "backbone."

    def check(self, cfg: PretrainConfig) -> None:
        """Cross-field rules of the config (raise :class:`clic.config.ParamError`)."""

    def views(self, cfg: PretrainConfig, photometric: bool) -> Callable[[Any], dict]:
        """The loader's views of one image (geometry only when not ``photometric``)."""
        raise NotImplementedError

    def plan(self, cfg: PretrainConfig) -> Any:
        """The plan of the views' crops, cut from the decoded batch (``decode_on: device``)."""
        raise NotImplementedError(f"method {self.name} has no crop plan: use decode_on: loader")

    def device_views(self, cfg: PretrainConfig) -> Any:
        """The batched photometric half of the views (``augment_on: device``)."""
        raise NotImplementedError(f"method {self.name} has no batched views: use augment_on: loader")

    def model(self, cfg: PretrainConfig, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError

    def momentum(self, cfg: PretrainConfig) -> Any:
        """The section holding the key encoder's ``momentum`` and ``momentum_schedule``."""
        raise NotImplementedError

    def extra_images(self, cfg: PretrainConfig, records: Sequence[Record],
                     data_dir: str | Path) -> tuple[ExtraImages | None, int]:
        """The maker of extra training images cut from each image (CLIC's mosaics), and how many per image."""
        return None, 0

    def check_images(self, cfg: PretrainConfig, n_images: int | None, sharded: bool) -> None:
        """Refuse a corpus the method cannot train on (``ValueError``); ``n_images`` None: before
        the corpus is opened (what needs no count)."""


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method ``cls.name`` (its config rules included)."""
    method = cls()
    REGISTRY[cls.name] = method
    METHOD_RULES[cls.name] = method.check
    return cls


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)
