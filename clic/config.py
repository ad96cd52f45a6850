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
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml

METHODS = ("moco", "clic", "clicv2")
Method = Literal["moco", "clic", "clicv2"]
T = TypeVar("T")


class ParamError(ValueError):
    """A bad parameter. ``key`` is its dotted path (``pretrain.clicv2.epochs``); ``template`` the
    message with ``{key}`` where the path goes, so that a section built inside another (``rcm`` in
    ``pretrain.clic``) is reported at its full path."""

    def __init__(self, key: str, template: str) -> None:
        self.key, self.template = key, template
        super().__init__(template.replace("{key}", key))


# --------------------------------------------------------------------------------------- views
@dataclasses.dataclass(frozen=True)
class MocoViewConfig:
    """MoCo v2 / CLIC augmentations, every part switchable. Defaults are MoCo v2's (``--aug-plus``);
    CLIC's public code adds the key-view extras (vertical flip, rotation, noise) and drops
    grayscale (docs/recipes.md lists both recipes and their sources)."""

    SECTION: ClassVar[str] = "views"  # where its keys live in params.yaml

    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_p: float = 0.5
    # key-view extras of the public CLIC code
    key_vflip_p: float = 0.0
    key_rotation_deg: float = 0.0
    key_rotation_p: float = 0.5
    key_noise_p: float = 0.0
    key_noise_std: float = 0.05

    def __post_init__(self) -> None:
        _check_range("views.crop_scale", self.crop_scale, 0.0, 1.0)
        for name in ("jitter_p", "grayscale_p", "blur_p", "hflip_p", "key_vflip_p", "key_rotation_p",
                     "key_noise_p"):
            _check_prob(f"views.{name}", getattr(self, name))


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

    SECTION: ClassVar[str] = "rcm"  # where its keys live in params.yaml

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
            raise ParamError("rcm.crops" if self.crops < 1 else "rcm.grid", "{key} must be >= 1, got "
                             f"{min(self.crops, self.grid)}")
        if self.mode == "pool" and self.grid * self.grid > 7 * self.crops:
            raise ParamError("rcm.grid", f"{{key}}={self.grid} needs {self.grid ** 2} cells but only "
                             f"{7 * self.crops} crops are drawn (crops + 2*crops + 4*crops)")
        if self.mode == "authors" and self.grid < 2:
            raise ParamError("rcm.grid", "{key} must be >= 2 with rcm.mode authors (two crops and their "
                             f"copies), got {self.grid}")
        if not self.max_upscale >= 1.0:
            raise ParamError("rcm.max_upscale", f"{{key}} must be >= 1 (.inf: no cap), got {self.max_upscale}")
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

    SECTION: ClassVar[str] = "shift"  # where its keys live in params.yaml

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
            raise ParamError("shift.max_shift", "{key}: need 0 <= min_shift <= max_shift < 0.5 (fractions of a "
                             "patch; at half a patch or more a neighbouring negative overlaps the anchor as much as "
                             f"the positive), got min_shift={self.min_shift}, max_shift={self.max_shift}")
        if not self.directions:
            raise ParamError("shift.directions", "{key} must name at least one direction")
        for i, d in enumerate(self.directions):
            _choice(f"shift.directions[{i}]", d, ("horizontal", "vertical", "diagonal"))
        _check_range("shift.crop_scale", self.crop_scale, 0.0, 1.0)
        _check_prob("shift.jitter_p", self.jitter_p)


# ---------------------------------------------------------------------------------- the method
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    SECTION: ClassVar[str] = "optim"  # where its keys live in params.yaml

    name: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.03
    lr_batch_ref: int = 256  # lr = base_lr * global_batch / lr_batch_ref
    weight_decay: float = 1e-4
    # weight decay on every parameter (MoCo v2, the CLIC code); false: none on biases, norms and
    # tokens (1-D parameters; MAE, MoCo v3)
    decay_all: bool = True
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
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

    SECTION: ClassVar[str] = "moco"  # where its keys live in params.yaml

    queue_size: int = 65536
    momentum: float = 0.999
    # constant (MoCo v2, CLIC) | cosine: rising from ``momentum`` to 1 (MoCo v3, BYOL)
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    temperature: float = 0.2
    dim: int = 128
    head: Literal["linear", "mlp"] = "mlp"
    mlp_hidden: int = 0  # 0: the backbone's feature width (2048-2048-128 for ResNet-50)
    # CLIC's complexity-aware loss: MSE(stage activation energy, grey-level entropy / 8)
    complexity_weight: float = 0.0
    # shuffling BN (ResNets): keys on a shuffled batch. In one process both encoders normalise
    # bn_splits sub-batches separately and a key's sub-batch holds on average 1/bn_splits of its
    # query's images (MoCo on 8 GPUs: 1/8, 32 images each); under DDP the shuffle is across ranks
    shuffle_bn: bool = True
    bn_splits: int = 2
    # a queue longer than this fraction of the pretraining images is refused: it would hold
    # several stale keys of most images (their own are excluded from a query's negatives anyway)
    max_queue_fraction: float = 0.5

    def __post_init__(self) -> None:
        _positive("moco.queue_size", self.queue_size)
        _positive("moco.bn_splits", self.bn_splits)
        if not 0.0 < self.max_queue_fraction <= 1.0:
            raise ParamError("moco.max_queue_fraction", f"{{key}} must be in (0, 1], got {self.max_queue_fraction}")
        if not 0.0 <= self.momentum < 1.0:
            raise ParamError("moco.momentum", f"{{key}} must be in [0, 1), got {self.momentum}")
        _positive("moco.temperature", self.temperature)
        _positive("moco.dim", self.dim)
        _choice("moco.head", self.head, ("linear", "mlp"))
        _non_negative("moco.complexity_weight", self.complexity_weight)


@dataclasses.dataclass(frozen=True)
class CLICv2Config:
    """CLICv2 losses and ablation switches."""

    SECTION: ClassVar[str] = "clicv2"  # where its keys live in params.yaml

    loss: Literal["patch", "image"] = "patch"
    temperature: float = 0.2
    dim: int = 128
    max_tokens: int = 1024  # anchors sampled per step for the patch-wise InfoNCE (bounds memory)
    momentum: float = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "cosine"  # not published: MoCo v3's, as for ViTs
    mem: bool = True
    mask_ratio: float = 0.4
    mem_weight: float = 1.0
    decoder_depth: int = 1

    def __post_init__(self) -> None:
        _choice("clicv2.loss", self.loss, ("patch", "image"))
        _positive("clicv2.temperature", self.temperature)
        _positive("clicv2.max_tokens", self.max_tokens)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ParamError("clicv2.mask_ratio", f"{{key}} must be in (0, 1), got {self.mask_ratio}")
        _non_negative("clicv2.mem_weight", self.mem_weight)
        if not 0.0 <= self.momentum < 1.0:
            raise ParamError("clicv2.momentum", f"{{key}} must be in [0, 1), got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs; built from ``pretrain.common`` + ``pretrain.<method>``."""

    SECTION: ClassVar[str] = ""  # where its keys live in params.yaml

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
    sync_every: int = 20  # read losses from the device every N steps (no per-step host sync)
    compile: bool = False  # torch.compile the training model (CUDA: worth it for long runs)
    threads: int = 0  # intra-op threads per training process; 0: the cores / processes per node
    # where the photometric half of the views runs: the loader workers (PIL) or the training
    # device, batched (clic/transforms/batch.py), for nodes with few cores per GPU
    augment_on: Literal["loader", "device"] = "loader"
    # where JPEGs are decoded: the loader workers, or the training device (nvJPEG on CUDA) with
    # the crops cut there too (clic/transforms/decode.py); needs augment_on: device, MoCo/CLICv2
    decode_on: Literal["loader", "device"] = "loader"
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
        _choice("augment_on", self.augment_on, ("loader", "device"))
        _choice("decode_on", self.decode_on, ("loader", "device"))
        if self.decode_on == "device":
            if self.augment_on != "device":
                raise ParamError("decode_on", "{key}=device needs augment_on: device (the loader then hands on "
                                 "undecoded images)")
            if self.method == "clic":
                raise ParamError("decode_on", "{key}=device cuts crops and flips only; CLIC's Random-Crop-and-Mix "
                                 "mosaics are built in the loader: use decode_on: loader for clic")
            if self.method == "moco" and self.views.key_rotation_deg > 0 and self.views.key_rotation_p > 0:
                raise ParamError("decode_on", "{key}=device cuts crops and flips only; set views.key_rotation_deg "
                                 "to 0 or use decode_on: loader")
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("image_size", self.image_size)
        _positive("checkpoint_every", self.checkpoint_every)
        _positive("sync_every", self.sync_every)
        _non_negative("threads", self.threads)
        _positive("nprocs", self.nprocs)
        _non_negative("num_workers", self.num_workers)
        _non_negative("max_images", self.max_images)
        for i, entry in enumerate(self.data):  # existence is checked when the corpus is listed
            if not entry.strip():
                raise ParamError(f"data[{i}]", "{key} is empty; name an image folder, archive or prepared dataset")
        _choice("amp", self.amp, ("auto", "bf16", "off"))
        _choice("channels_last", self.channels_last, ("auto", "on", "off"))
        is_vit = self.backbone.startswith("vit")
        if is_vit and self.image_size % self.patch_size:
            raise ParamError("patch_size", f"{{key}}={self.patch_size} must divide image_size={self.image_size}")
        if self.method != "clicv2" and not is_vit and self.moco.shuffle_bn and (
                self.batch_size % self.moco.bn_splits or self.batch_size // self.moco.bn_splits < 2):
            raise ParamError("moco.bn_splits", f"{{key}}={self.moco.bn_splits} must divide batch_size="
                             f"{self.batch_size} into sub-batches of at least 2 images (or set moco.shuffle_bn: false)")
        if self.method == "clicv2" and not is_vit:
            raise ParamError("backbone", "method clicv2 needs a ViT backbone: {key} must be one of vit_tiny, "
                             f"vit_small, vit_base, vit_large, got {self.backbone!r}")

    def lr(self, world_size: int = 1) -> float:
        """Absolute learning rate from the base rate and the global batch (linear scaling rule)."""
        return self.optim.base_lr * self.batch_size * world_size / self.optim.lr_batch_ref


# ----------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    SECTION: ClassVar[str] = "data.synthetic"  # where its keys live in params.yaml

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
            raise ParamError("data.synthetic.size", f"{{key}} must be >= 32, got {self.size}")
        if not 2 <= self.n_classes <= 6:
            raise ParamError("data.synthetic.n_classes", f"{{key}} must be in [2, 6], got {self.n_classes}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to prepare and how (``clic data prepare``)."""

    SECTION: ClassVar[str] = "data"  # where its keys live in params.yaml

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
            raise ParamError("data.path", f"{{key}} must name the local {self.source} folder or archive")
        if self.source == "folder" and not self.csv:
            raise ParamError("data.csv", "{key} must name the CSV of image,score[,split] for source 'folder'")
        if not 0.0 < self.test_fraction < 1.0:
            raise ParamError("data.test_fraction", f"{{key}} must be in (0, 1), got {self.test_fraction}")
        _non_negative("data.cache_size", self.cache_size)


# ----------------------------------------------------------------------------------- evaluation
ICNET_IMAGE_SIZE = 512  # ICNet's input side (IC9600): probe.image_size 0 means this for protocol icnet


@dataclasses.dataclass(frozen=True)
class IcnetProbeConfig:
    """The ICNet-style head of ``probe.protocol: icnet`` (clic/evaluation/icnet.py). Defaults are
    ICNet's (IC9600 code): SGD lr 0.05, momentum 0.9, wd 1e-3, batch 64, 30 epochs, 1 warm-up
    epoch, lr x0.2 at epochs 10 and 20, loss 0.9 MSE(score) + 0.1 MSE(mean map), 512-wide 3x3
    branches, horizontal flips."""

    SECTION: ClassVar[str] = "probe.icnet"  # where its keys live in params.yaml

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
            raise ParamError("probe.icnet.kernel", f"{{key}} must be a positive odd number, got {self.kernel}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ParamError("probe.icnet.milestones", f"{{key}} must be increasing epochs >= 1, got {self.milestones}")
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

    SECTION: ClassVar[str] = "probe"  # where its keys live in params.yaml

    protocol: Literal["ridge", "sgd", "icnet"] = "ridge"
    mode: Literal["split", "cv"] = "split"
    folds: int = 5
    input: Literal["auto", "crop", "whole"] = "auto"
    image_size: int = 0  # input side for features and the scorer; 0 = pretraining size (icnet: 512)
    # last: the last stage's pooled features (the papers' probe); stages: pools of four depths
    # concatenated (ResNet stages, ViT quarters), keeping early layers' texture statistics
    features: Literal["last", "stages"] = "last"
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    sgd_epochs: int = 100
    sgd_lr: float = 0.01
    bootstrap: int = 1000
    # the registry's champion is chosen on this fraction of the training images (drawn with the
    # seed), predicted by a head fitted on the rest; never on the reported (test) images
    validation_fraction: float = 0.2
    batch_size: int = 64
    workers: int = 2
    baselines: tuple[str, ...] = ("random", "handcrafted")
    icnet: IcnetProbeConfig = dataclasses.field(default_factory=IcnetProbeConfig)

    def __post_init__(self) -> None:
        _choice("probe.protocol", self.protocol, ("ridge", "sgd", "icnet"))
        _choice("probe.mode", self.mode, ("split", "cv"))
        _choice("probe.input", self.input, ("auto", "crop", "whole"))
        _choice("probe.features", self.features, ("last", "stages"))
        if self.features == "stages" and self.protocol == "icnet":
            raise ParamError("probe.features", "{key}=stages pools vectors; protocol icnet needs the last stage's map")
        if self.folds < 2:
            raise ParamError("probe.folds", f"{{key}} must be >= 2, got {self.folds}")
        if not 0 <= self.validation_fraction < 1:
            raise ParamError("probe.validation_fraction", f"{{key}} must be in [0, 1), got {self.validation_fraction}")
        if self.image_size < 0:
            raise ParamError("probe.image_size", "{key} must be >= 0 (0 = the pretraining size), "
                             f"got {self.image_size}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ParamError("probe.alphas", f"{{key}} must be positive numbers, got {self.alphas}")
        for i, b in enumerate(self.baselines):
            _choice(f"probe.baselines[{i}]", b, ("random", "handcrafted"))

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

    SECTION: ClassVar[str] = "transfer"  # where its keys live in params.yaml

    name: str = "synthetic"  # metrics are <name>_top1 / <name>_top5 (imagenet_top1 on ImageNet)
    path: str = "data/transfer"
    epochs: int = 50
    lr: float = 0.1
    batch_size: int = 128
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ParamError("transfer.name", f"{{key}} must be an identifier (it names metrics), got {self.name!r}")
        _positive("transfer.epochs", self.epochs)


# ------------------------------------------------------------------------- the pipeline's own
@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Bounds of the ``validate`` stage (stages/validate.py)."""

    SECTION: ClassVar[str] = "validate"

    min_rows: int = 1
    max_rows: int = 10_000_000
    # an evaluation image whose perceptual hash is this close to a pretraining image's is a leak
    # (resized / re-encoded copies: <= 4 of 64 bits; distinct photos: >= 6; -1: identical pixels only)
    near_duplicate_bits: int = 4

    def __post_init__(self) -> None:
        _positive("validate.min_rows", self.min_rows)
        if not -1 <= self.near_duplicate_bits <= 32:
            raise ParamError("validate.near_duplicate_bits",
                             f"{{key}} must be in [-1, 32], got {self.near_duplicate_bits}")
        if self.max_rows < self.min_rows:
            raise ParamError("validate.max_rows", f"{{key}} must be >= validate.min_rows ({self.min_rows}), "
                             f"got {self.max_rows}")


@dataclasses.dataclass(frozen=True)
class MlflowConfig:
    """Tracking (stages/tracking.py): experiment, store and whether scorers are registered."""

    SECTION: ClassVar[str] = "mlflow"

    experiment: str = "clic"
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    register: bool = True


@dataclasses.dataclass(frozen=True)
class PretrainSection:
    """``pretrain``: the corpus and the per-method sections, each a partial :class:`PretrainConfig`
    (``common`` deep-merged with the method's own; see :func:`pretrain_config`)."""

    data: str | tuple[str, ...] = ()
    common: PretrainConfig | None = None
    moco: PretrainConfig | None = None
    clic: PretrainConfig | None = None
    clicv2: PretrainConfig | None = None


@dataclasses.dataclass(frozen=True)
class ParamsFile:
    """Every top-level key of a params file (``extends`` names a base file and is resolved on
    reading). Used as the schema that :func:`check_params` walks; sections are built from it by
    :func:`pretrain_config`, :func:`data_config` and the like."""

    seed: int = 0
    data: DataConfig | None = None
    pretrain: PretrainSection | None = None
    validate: ValidateConfig | None = None
    probe: ProbeConfig | None = None
    transfer: TransferConfig | None = None
    mlflow: MlflowConfig | None = None


TOP_LEVEL = frozenset(f.name for f in dataclasses.fields(ParamsFile))  # every top-level key of a params file


# ------------------------------------------------------------------------------- construction
_TYPE_NAMES = {int: "int", float: "float", bool: "bool (true/false)", str: "str"}


def _join(where: str, name: object) -> str:
    return f"{where}.{name}" if where else str(name)


def _fields(cls: Any) -> dict[str, Any]:
    """Field name -> resolved type of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(cls: Any, name: object, where: str) -> ParamError:
    """An unknown key, with the nearest valid one (``pretrian`` -> ``pretrain``)."""
    valid = sorted(_fields(cls))
    near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean {_join(where, near[0])!r}? " if near else ""
    if not near and cls is ParamsFile and str(name) in _fields(PretrainConfig):
        hint = f"did you mean 'pretrain.<method>.{name}' (or 'pretrain.common.{name}')? "
    return ParamError(_join(where, name), "{key}: unknown key; " + hint + f"valid keys here: {', '.join(valid)}")


def from_dict(cls: type[T], raw: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Unknown keys, wrongly typed and out-of-range values raise :class:`ParamError` naming the
    dotted key under ``where`` (``pretrain.clicv2.epochs must be > 0, got 0``).
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ParamError(where or cls.__name__, f"{{key}}: expected a mapping, got {raw!r}")
    fields = _fields(cls)
    kwargs = {}
    for name, value in (raw or {}).items():
        if name not in fields:
            raise _unknown(cls, name, where)
        kwargs[name] = _coerce(fields[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except ParamError as exc:  # raised at the section's own path: re-root it at ``where``
        section = getattr(cls, "SECTION", "")
        rel = exc.key
        if section and (rel == section or rel.startswith(section + ".")):
            rel = rel[len(section) + 1:]
        raise ParamError(_join(where, rel) if rel else where, exc.template) from None


def check_tree(cls: Any, raw: Any, where: str) -> None:
    """Check the keys and value types of ``raw`` against dataclass ``cls`` without building it
    (value bounds are checked when a section is built, by the command that uses it)."""
    if not isinstance(raw, Mapping):
        raise ParamError(where, f"{{key}}: expected a mapping, got {raw!r}")
    fields = _fields(cls)
    for name, value in raw.items():
        if name not in fields:
            raise _unknown(cls, name, where)
        tp, key = fields[name], _join(where, name)
        if get_origin(tp) in (types.UnionType, typing.Union) and value is None:
            continue
        sub = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if dataclasses.is_dataclass(sub):
            if value is not None:
                check_tree(sub, value, key)
        else:
            _coerce(tp, value, key)


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse unknown keys (top-level and in every section) and wrongly typed values anywhere in
    a params tree, naming the dotted key and the nearest valid one."""
    check_tree(ParamsFile, params, "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(tp):
            raise ParamError(key, f"{{key}}: expected one of {', '.join(map(str, get_args(tp)))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ParamError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ParamError(key, f"{{key}}: expected {names}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamError(key, f"{{key}}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamError(key, f"{{key}}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every user read it as a number
            return float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp)
    if ok is not None and not ok(value):
        raise ParamError(key, f"{{key}}: expected {_TYPE_NAMES[tp]}, got {value!r}")
    return float(value) if tp is float else value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _TYPE_NAMES.get(tp, str(tp))


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


def check_override(key: str, value: Any) -> None:
    """Refuse an override of dotted ``key`` that the schema does not know or whose ``value`` has
    the wrong type (:class:`ParamError` naming the key and the nearest valid one)."""
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    check_params(tree)


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a params mapping; an unknown
    key or a wrongly typed value is refused (:class:`ParamError` naming the override)."""
    params = dict(params)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
        parts = key.strip().split(".")
        try:
            check_override(key.strip(), value)
        except ParamError as exc:
            raise ParamError(exc.key, f"--set {item!r}: {exc.template}") from None
        node: dict[str, Any] = params
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return params


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a params file; a top-level ``extends: OTHER.yaml`` (relative to the file) names a base
    that this file is deep-merged over (profiles such as ``params/real-photos.yaml``). Each file
    and each override is checked for unknown keys and value types (:func:`check_params`)."""
    return apply_overrides(_read_params(Path(path), ()), overrides or [])


def _read_params(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: params file not found")
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' forms a cycle")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not params:
        raise ValueError(f"{path}: params file is empty; expected sections such as seed, data, pretrain, probe "
                         "(see params.yaml), or 'extends: params.yaml' for a profile")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    base = params.pop("extends", None)
    try:
        check_params(params)
    except ParamError as exc:
        raise ParamError(exc.key, f"{path}: {exc.template}") from None
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
        for key, why in (("data", "the pretraining corpus is set once, as pretrain.data (it applies to every "
                                  "method)"), ("method", "the method is the section's name")):
            if key in (section.get(part) or {}):
                raise ParamError(f"pretrain.{part}.{key}", "{key}: " + why)
    merged = deep_merge(section.get("common") or {}, section.get(method) or {})
    merged.setdefault("seed", params.get("seed", 0))
    data = section.get("data") or []
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list | tuple) or not all(isinstance(d, str) for d in data):
        raise ParamError("pretrain.data", f"{{key}}: expected a list of folder/archive paths, got {data!r}")
    for i, entry in enumerate(data):  # existence is checked when the corpus is listed
        if not entry.strip():
            raise ParamError(f"pretrain.data[{i}]", "{key} is empty; name an image folder, archive or prepared dataset")
    merged["data"] = data
    merged["method"] = method
    try:
        return from_dict(PretrainConfig, merged, f"pretrain.{method}")
    except ParamError as exc:  # a value inherited from pretrain.common is reported there
        rel = exc.key.removeprefix(f"pretrain.{method}.")
        if _has_path(section.get("common"), rel) and not _has_path(section.get(method), rel):
            raise ParamError(f"pretrain.common.{rel}", exc.template) from None
        raise


# the sections of PretrainConfig each method reads; and the settings that change how fast a run
# goes, not what it learns (docs/recipes.md lists every other one with its source)
METHOD_SECTIONS = {"moco": ("optim", "moco", "views"), "clic": ("optim", "moco", "views", "rcm"),
                   "clicv2": ("optim", "clicv2", "shift")}
ENGINEERING = ("num_workers", "checkpoint_every", "sync_every", "compile", "threads", "augment_on", "decode_on",
               "nprocs", "amp", "channels_last")


def method_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The resolved settings ``cfg.method`` reads, with the names of ``params.yaml``: every
    top-level setting and the method's own sections (a ResNet has no patch size, SGD no betas);
    what ``clic params --method`` prints and docs/recipes.md lists."""
    full = to_dict(cfg)
    out = {k: v for k, v in full.items() if not isinstance(v, dict)}
    if not cfg.backbone.startswith("vit"):
        for k in ("patch_size", "depth", "pool"):
            out.pop(k)
    for section in METHOD_SECTIONS[cfg.method]:
        out[section] = dict(full[section])
    out["optim"].pop("betas" if cfg.optim.name == "sgd" else "momentum")
    return out


def _has_path(tree: Any, dotted: str) -> bool:
    for part in dotted.split("[", 1)[0].split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True


def probe_config(params: Mapping[str, Any]) -> ProbeConfig:
    return from_dict(ProbeConfig, params.get("probe") or {}, "probe")


def transfer_config(params: Mapping[str, Any]) -> TransferConfig:
    return from_dict(TransferConfig, params.get("transfer") or {}, "transfer")


def data_config(params: Mapping[str, Any]) -> DataConfig:
    return from_dict(DataConfig, params.get("data") or {}, "data")


def validate_config(params: Mapping[str, Any]) -> ValidateConfig:
    return from_dict(ValidateConfig, params.get("validate") or {}, "validate")


def mlflow_config(params: Mapping[str, Any]) -> MlflowConfig:
    return from_dict(MlflowConfig, params.get("mlflow") or {}, "mlflow")


# --------------------------------------------------------------------------------- validators
def _positive(name: str, v: float) -> None:
    if not v > 0:
        raise ParamError(name, f"{{key}} must be > 0, got {v}")


def _non_negative(name: str, v: float) -> None:
    if not v >= 0:
        raise ParamError(name, f"{{key}} must be >= 0, got {v}")


def _check_prob(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ParamError(name, f"{{key}} must be a probability in [0, 1], got {v}")


def _check_range(name: str, v: tuple[float, float], lo: float, hi: float) -> None:
    if not lo <= v[0] <= v[1] <= hi:
        raise ParamError(name, f"{{key}} must satisfy {lo} <= low <= high <= {hi}, got {list(v)}")


def _choice(name: str, v: object, allowed: tuple[object, ...]) -> None:
    if v not in allowed:
        raise ParamError(name, f"{{key}}: expected one of {', '.join(map(str, allowed))}, got {v!r}")
