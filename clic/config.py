"""Typed configuration built from the sections of ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml``; this module turns its sections into frozen
dataclasses, validates them on construction (``ValueError`` naming the dotted key) and computes
derived values (the absolute learning rate) in one place.

Layout of ``params.yaml`` used here::

    seed: 0
    data: {...}                     -> DataConfig
    pretrain:
      data: [...]                   the pretraining corpus (every method)
      common: {...}                 shared by every method
      moco|clic|clicv2: {...}       deep-merged over ``common`` -> PretrainConfig
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

METHODS = ("moco", "clic", "clicv2")
Method = Literal["moco", "clic", "clicv2"]
T = TypeVar("T")


# --------------------------------------------------------------------------------------- views
@dataclasses.dataclass(frozen=True)
class MocoViewConfig:
    """MoCo v2 / CLIC augmentations (the public CLIC code's recipe, every part switchable).

    Blur and noise change an image's complexity, so they default to off here: a complexity
    representation should not be trained to be invariant to them (see docs/design.md).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_p: float = 0.5
    # key-view extras of the public CLIC code
    key_vflip_p: float = 0.0
    key_rotation_deg: float = 0.0
    key_rotation_p: float = 0.5
    key_noise_p: float = 0.0
    key_noise_std: float = 0.05

    def __post_init__(self) -> None:
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        for name in ("jitter_p", "grayscale_p", "blur_p", "hflip_p", "key_vflip_p", "key_rotation_p",
                     "key_noise_p"):
            _check_prob(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class RCMConfig:
    """Random Crop and Mix (CLIC): square crops of one image stitched into a ``grid x grid`` mosaic
    (see :mod:`clic.transforms.rcm`).

    ``mode``: ``pool`` draws the cells from a pool of crops at three scales, each resized to a cell;
    ``authors`` (the authors' script) uses two crops of one scale plus augmented copies, at native
    size. ``max_upscale`` caps how much a tile may be enlarged (``.inf``: no cap).
    ``pairing``: ``key`` uses the mosaic as the positive (key) view of its source image;
    ``extra`` pre-generates ``extra_per_image`` mosaics per image as additional training images;
    ``both`` does both. ``source_resolution``: extra mosaics are cut from the source file rather
    than the resized cache, when the file is there.
    """

    mode: Literal["pool", "authors"] = "pool"
    crops: int = 3
    grid: int = 2
    aug_p: float = 0.5
    rotation_deg: float = 20.0
    jitter: float = 0.2
    max_upscale: float = 2.0
    pairing: Literal["key", "extra", "both"] = "key"
    extra_per_image: int = 1
    source_resolution: bool = True

    def __post_init__(self) -> None:
        _choice("rcm.mode", self.mode, ("pool", "authors"))
        if self.crops < 1 or self.grid < 1:
            raise ValueError("rcm.crops and rcm.grid must be >= 1")
        if self.mode == "pool" and self.grid * self.grid > 7 * self.crops:
            raise ValueError(f"rcm.grid={self.grid} needs {self.grid ** 2} cells but only "
                             f"{7 * self.crops} crops are drawn (crops + 2*crops + 4*crops)")
        if self.mode == "authors" and self.grid < 2:
            raise ValueError(f"rcm.grid must be >= 2 with rcm.mode authors (two crops and their copies), "
                             f"got {self.grid}")
        if not self.max_upscale >= 1.0:
            raise ValueError(f"rcm.max_upscale must be >= 1 (.inf: no cap), got {self.max_upscale}")
        _check_prob("rcm.aug_p", self.aug_p)
        _non_negative("rcm.rotation_deg", self.rotation_deg)
        _non_negative("rcm.jitter", self.jitter)
        _non_negative("rcm.extra_per_image", self.extra_per_image)
        _choice("rcm.pairing", self.pairing, ("key", "extra", "both"))


@dataclasses.dataclass(frozen=True)
class ShiftConfig:
    """CLICv2 shifted patchify: the second view's patch grid is offset by a random shift.

    ``max_shift`` is a fraction of the patch side, strictly below 1/2 so that the positive always
    overlaps the anchor more than a neighbouring (negative) patch does; the drawn shift magnitude
    is uniform in ``[min_shift, max_shift] * patch`` pixels (rounded, and always below half a
    patch in pixels), the direction one of ``directions``.
    """

    enabled: bool = True
    min_shift: float = 0.125
    max_shift: float = 0.375
    directions: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.05)
    jitter_p: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_shift <= self.max_shift < 0.5:
            raise ValueError("shift: need 0 <= min_shift <= max_shift < 0.5 (fractions of a patch; at half a "
                             "patch or more a neighbouring negative overlaps the anchor as much as the "
                             f"positive), got min_shift={self.min_shift}, max_shift={self.max_shift}")
        if not self.directions:
            raise ValueError("shift.directions must name at least one direction")
        for d in self.directions:
            _choice("shift.directions[]", d, ("horizontal", "vertical", "diagonal"))
        _check_range("shift.crop_scale", self.crop_scale, 0.0, 1.0)
        _check_prob("shift.jitter_p", self.jitter_p)


# ---------------------------------------------------------------------------------- the method
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.03
    lr_batch_ref: int = 256  # lr = base_lr * global_batch / lr_batch_ref
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "adamw"))
        _positive("optim.base_lr", self.base_lr)
        _positive("optim.lr_batch_ref", self.lr_batch_ref)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_epochs", self.warmup_epochs)
        _non_negative("optim.clip_grad", self.clip_grad)


@dataclasses.dataclass(frozen=True)
class MocoConfig:
    """MoCo v2 queue, momentum encoder and projection head."""

    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    dim: int = 128
    head: Literal["linear", "mlp"] = "mlp"
    mlp_hidden: int = 0  # 0: the backbone's feature width (2048-2048-128 for ResNet-50)
    # CLIC's complexity-aware loss: MSE(stage activation energy, grey-level entropy / 8)
    complexity_weight: float = 0.0
    # shuffling BN (ResNets): keys on a shuffled batch; in one process both encoders normalise
    # bn_splits sub-batches separately (MoCo's single-GPU SplitBatchNorm); across ranks under DDP
    shuffle_bn: bool = True
    bn_splits: int = 2
    # a queue longer than this fraction of the pretraining images is refused: it would hold
    # several stale keys of most images (their own are excluded from a query's negatives anyway)
    max_queue_fraction: float = 0.5

    def __post_init__(self) -> None:
        _positive("moco.queue_size", self.queue_size)
        _positive("moco.bn_splits", self.bn_splits)
        if not 0.0 < self.max_queue_fraction <= 1.0:
            raise ValueError(f"moco.max_queue_fraction must be in (0, 1], got {self.max_queue_fraction}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"moco.momentum must be in [0, 1), got {self.momentum}")
        _positive("moco.temperature", self.temperature)
        _positive("moco.dim", self.dim)
        _choice("moco.head", self.head, ("linear", "mlp"))
        _non_negative("moco.complexity_weight", self.complexity_weight)


@dataclasses.dataclass(frozen=True)
class CLICv2Config:
    """CLICv2 losses and ablation switches."""

    loss: Literal["patch", "image"] = "patch"
    temperature: float = 0.2
    dim: int = 128
    max_tokens: int = 1024  # anchors sampled per step for the patch-wise InfoNCE (bounds memory)
    momentum: float = 0.99
    mem: bool = True
    mask_ratio: float = 0.4
    mem_weight: float = 1.0
    decoder_depth: int = 1

    def __post_init__(self) -> None:
        _choice("clicv2.loss", self.loss, ("patch", "image"))
        _positive("clicv2.temperature", self.temperature)
        _positive("clicv2.max_tokens", self.max_tokens)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"clicv2.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        _non_negative("clicv2.mem_weight", self.mem_weight)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"clicv2.momentum must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs; built from ``pretrain.common`` + ``pretrain.<method>``."""

    method: Method = "moco"
    backbone: str = "resnet18"
    image_size: int = 64
    patch_size: int = 16
    depth: int = 0  # ViT depth override (0: the architecture's own)
    pool: Literal["mean", "cls"] = "mean"  # ViT feature: mean of patch tokens or the CLS token
    epochs: int = 10
    batch_size: int = 64
    num_workers: int = 2
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: int = 50  # optimiser steps; the end of every epoch is always saved
    nprocs: int = 1  # processes per node when the pipeline launches torchrun
    max_images: int = 0  # 0: all images of the pretraining split(s) or corpus
    splits: tuple[str, ...] = ("train",)
    # the pretraining corpus (``pretrain.data``): image folders, archives or prepared datasets;
    # empty: the prepared dataset's ``splits`` (see clic/data/corpus.py)
    data: tuple[str, ...] = ()
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    moco: MocoConfig = dataclasses.field(default_factory=MocoConfig)
    clicv2: CLICv2Config = dataclasses.field(default_factory=CLICv2Config)
    views: MocoViewConfig = dataclasses.field(default_factory=MocoViewConfig)
    rcm: RCMConfig = dataclasses.field(default_factory=RCMConfig)
    shift: ShiftConfig = dataclasses.field(default_factory=ShiftConfig)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("image_size", self.image_size)
        _positive("checkpoint_every", self.checkpoint_every)
        _positive("nprocs", self.nprocs)
        _non_negative("num_workers", self.num_workers)
        _non_negative("max_images", self.max_images)
        for i, entry in enumerate(self.data):  # existence is checked when the corpus is listed
            if not entry.strip():
                raise ValueError(f"pretrain.data[{i}] is empty; name an image folder, archive or prepared dataset")
        _choice("amp", self.amp, ("auto", "bf16", "off"))
        _choice("channels_last", self.channels_last, ("auto", "on", "off"))
        is_vit = self.backbone.startswith("vit")
        if is_vit and self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.method != "clicv2" and not is_vit and self.moco.shuffle_bn and (
                self.batch_size % self.moco.bn_splits or self.batch_size // self.moco.bn_splits < 2):
            raise ValueError(f"moco.bn_splits={self.moco.bn_splits} must divide batch_size={self.batch_size} "
                             "into sub-batches of at least 2 images (or set moco.shuffle_bn: false)")
        if self.method == "clicv2" and not is_vit:
            raise ValueError(f"method clicv2 needs a ViT backbone (vit_tiny|vit_small|vit_base|vit_large), "
                             f"got backbone={self.backbone!r}")

    def lr(self, world_size: int = 1) -> float:
        """Absolute learning rate from the base rate and the global batch (linear scaling rule)."""
        return self.optim.base_lr * self.batch_size * world_size / self.optim.lr_batch_ref


# ----------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    n_train: int = 320
    n_test: int = 160
    size: int = 96
    categories: tuple[str, ...] = ("shapes", "texture", "mixed", "stripes")
    n_classes: int = 4
    n_class_train: int = 40  # per class, for the transfer set
    n_class_val: int = 20

    def __post_init__(self) -> None:
        _positive("data.synthetic.n_train", self.n_train)
        _non_negative("data.synthetic.n_test", self.n_test)
        if self.size < 32:
            raise ValueError(f"data.synthetic.size must be >= 32, got {self.size}")
        if not 2 <= self.n_classes <= 6:
            raise ValueError(f"data.synthetic.n_classes must be in [2, 6], got {self.n_classes}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to prepare and how (``clic data prepare``)."""

    source: Literal["synthetic", "ic9600", "savoias", "folder"] = "synthetic"
    path: str = ""  # ic9600: folder or archive; savoias: clone; folder: image folder
    csv: str = ""  # folder source: CSV of image,score[,split]
    categories: tuple[str, ...] = ()  # savoias: subset of categories (empty: all present)
    test_fraction: float = 0.3  # for sources that ship no split
    raw_dir: str = "data/raw"
    out_dir: str = "data/prepared"
    cache_size: int = 128  # short side of the resized cache; 0 disables the cache
    min_size: int = 32
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb threshold
    max_archive_bytes: int = 64 * 2**30  # an archive's total uncompressed size
    max_member_bytes: int = 2**30  # one archive member's uncompressed size
    max_archive_ratio: float = 200.0  # uncompressed/compressed, per zip member or compressed tar (> 1 MiB)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _choice("data.source", self.source, ("synthetic", "ic9600", "savoias", "folder"))
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path must name the local {self.source} folder or archive")
        if self.source == "folder" and not self.csv:
            raise ValueError("data.csv must name the CSV of image,score[,split] for source 'folder'")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        _non_negative("data.cache_size", self.cache_size)


# ----------------------------------------------------------------------------------- evaluation
ICNET_IMAGE_SIZE = 512  # ICNet's input side (IC9600): probe.image_size 0 means this for protocol icnet


@dataclasses.dataclass(frozen=True)
class IcnetProbeConfig:
    """The ICNet-style head of ``probe.protocol: icnet`` (clic/evaluation/icnet.py). Defaults are
    ICNet's (IC9600 code): SGD lr 0.05, momentum 0.9, wd 1e-3, batch 64, 30 epochs, 1 warm-up
    epoch, lr x0.2 at epochs 10 and 20, loss 0.9 MSE(score) + 0.1 MSE(mean map), 512-wide 3x3
    branches, horizontal flips."""

    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1.0e-3
    batch_size: int = 64
    warmup_epochs: int = 1
    milestones: tuple[int, ...] = (10, 20)  # epochs where the lr is multiplied by gamma
    gamma: float = 0.2
    channels: int = 512  # width of the map and score branches
    kernel: int = 3  # their conv kernel (1: ~9x cheaper, for CPU runs)
    hidden: int = 512  # hidden width of the attention (SLAM) and score MLPs
    map_weight: float = 0.1  # loss = (1 - w) MSE(score) + w MSE(mean(map), score)
    flip: bool = True  # also extract features of flipped training images (2x extraction of the fit set)

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "batch_size", "channels", "hidden", "gamma"):
            _positive(f"probe.icnet.{name}", getattr(self, name))
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            _non_negative(f"probe.icnet.{name}", getattr(self, name))
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"probe.icnet.kernel must be a positive odd number, got {self.kernel}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError(f"probe.icnet.milestones must be increasing epochs >= 1, got {self.milestones}")
        _check_prob("probe.icnet.map_weight", self.map_weight)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """A head fitted on frozen features against human complexity scores.

    ``protocol``: ``ridge`` / ``sgd`` fit a linear head on pooled features; ``icnet`` trains
    ICNet's map + score head on the frozen spatial feature maps (the CLIC paper's IC9600 protocol).
    ``input``: ``crop`` resizes the short side to ``image_size`` and centre-crops a square;
    ``whole`` resizes the whole image to ``image_size`` x ``image_size`` (aspect not kept, as
    ICNet does); ``auto`` is ``whole`` for icnet and ``crop`` otherwise.
    ``mode``: ``split`` fits on the train split and reports on the test split; ``cv`` reports
    out-of-fold predictions of k-fold cross-validation inside each category over every labelled
    image (for datasets without an official split, e.g. SAVOIAS).
    """

    protocol: Literal["ridge", "sgd", "icnet"] = "ridge"
    mode: Literal["split", "cv"] = "split"
    folds: int = 5
    input: Literal["auto", "crop", "whole"] = "auto"
    image_size: int = 0  # input side for features and the scorer; 0 = pretraining size (icnet: 512)
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    sgd_epochs: int = 100
    sgd_lr: float = 0.01
    bootstrap: int = 1000
    batch_size: int = 64
    workers: int = 2
    baselines: tuple[str, ...] = ("random", "handcrafted")
    icnet: IcnetProbeConfig = dataclasses.field(default_factory=IcnetProbeConfig)

    def __post_init__(self) -> None:
        _choice("probe.protocol", self.protocol, ("ridge", "sgd", "icnet"))
        _choice("probe.mode", self.mode, ("split", "cv"))
        _choice("probe.input", self.input, ("auto", "crop", "whole"))
        if self.folds < 2:
            raise ValueError(f"probe.folds must be >= 2, got {self.folds}")
        if self.image_size < 0:
            raise ValueError(f"probe.image_size must be >= 0 (0 = the pretraining size), got {self.image_size}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError(f"probe.alphas must be positive numbers, got {self.alphas}")
        for b in self.baselines:
            _choice("probe.baselines[]", b, ("random", "handcrafted"))

    @property
    def whole(self) -> bool:
        """Whether the model sees the whole image squashed to a square (else a centre crop)."""
        return self.input == "whole" or (self.input == "auto" and self.protocol == "icnet")

    def input_size(self, pretrain_size: int) -> int:
        """The side images are resized to: ``image_size``, or when 0 the encoder's pretraining
        size (ICNet's 512 for protocol icnet)."""
        return self.image_size or (ICNET_IMAGE_SIZE if self.protocol == "icnet" else pretrain_size)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Linear classification probe on an ImageFolder (``train/``, ``val/``)."""

    name: str = "synthetic"  # metrics are <name>_top1 / <name>_top5 (imagenet_top1 on ImageNet)
    path: str = "data/transfer"
    epochs: int = 50
    lr: float = 0.1
    batch_size: int = 128
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"transfer.name must be an identifier (it names metrics), got {self.name!r}")
        _positive("transfer.epochs", self.epochs)


# ------------------------------------------------------------------------------- construction
def from_dict(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Unknown keys and wrongly-typed values raise ``ValueError`` naming the dotted key.
    """
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where + '.' if where else ''}{unknown[0]}: unknown key; expected one of "
                         f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"{where or cls.__name__}: {exc}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{key}: expected one of {', '.join(map(str, get_args(tp)))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
        return _coerce(next(a for a in get_args(tp) if a is not type(None)), value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe types (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for tracking systems that want flat params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a params mapping."""
    params = dict(params)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text)
        node: dict[str, Any] = params
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return params


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a params file; a top-level ``extends: OTHER.yaml`` (relative to the file) names a base
    that this file is deep-merged over (profiles such as ``params/real-photos.yaml``)."""
    return apply_overrides(_read_params(Path(path), ()), overrides or [])


def _read_params(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: params file not found")
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' forms a cycle")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    base = params.pop("extends", None)
    if base:
        params = deep_merge(_read_params(path.parent / str(base), (*seen, path.resolve())), params)
    return params


def pretrain_config(params: Mapping[str, Any], method: str) -> PretrainConfig:
    """``pretrain.common`` deep-merged with ``pretrain.<method>``, plus the top-level seed and the
    pretraining corpus ``pretrain.data`` (one list for every method: it is what the validate stage
    checks for evaluation images, so a method may not override it)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    section = params.get("pretrain") or {}
    for part in ("common", method):
        if "data" in (section.get(part) or {}):
            raise ValueError(f"pretrain.{part}.data: the pretraining corpus is set once, as pretrain.data "
                             "(it applies to every method)")
    merged = deep_merge(section.get("common") or {}, section.get(method) or {})
    merged.setdefault("seed", params.get("seed", 0))
    data = section.get("data") or []
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list | tuple) or not all(isinstance(d, str) for d in data):
        raise ValueError(f"pretrain.data: expected a list of folder/archive paths, got {data!r}")
    merged["data"] = data
    merged["method"] = method
    return from_dict(PretrainConfig, merged, f"pretrain.{method}")


def probe_config(params: Mapping[str, Any]) -> ProbeConfig:
    return from_dict(ProbeConfig, params.get("probe") or {}, "probe")


def transfer_config(params: Mapping[str, Any]) -> TransferConfig:
    return from_dict(TransferConfig, params.get("transfer") or {}, "transfer")


def data_config(params: Mapping[str, Any]) -> DataConfig:
    return from_dict(DataConfig, params.get("data") or {}, "data")


# --------------------------------------------------------------------------------- validators
def _positive(name: str, v: float) -> None:
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")


def _non_negative(name: str, v: float) -> None:
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def _check_prob(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {v}")


def _check_range(name: str, v: tuple[float, float], lo: float, hi: float) -> None:
    if not lo <= v[0] <= v[1] <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {v}")


def _choice(name: str, v: object, allowed: tuple[object, ...]) -> None:
    if v not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {v!r}")
