"""Typed configuration built from the sections of ``params.yaml`` (pydantic models).

Frozen, strictly typed sections: bounds as field constraints, cross-field rules as validators,
every failure a :class:`ParamError` naming the dotted key; derived values (the absolute learning
rate) are computed here. ``pretrain.common`` deep-merged with ``pretrain.<method>`` (plus ``seed``
and the corpus ``pretrain.data``) is a :class:`PretrainConfig`; ``data``, ``probe``, ``transfer``,
``validate`` and ``mlflow`` are one section each. :mod:`clic.params` reads and merges the files.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo
from pydantic import model_validator as _after

# each registered method's cross-field rules, by name (:mod:`clic.methods` registers them on import)
METHOD_RULES: dict[str, Callable[[Any], None]] = {}


class ParamError(ValueError):
    """A bad parameter. ``key`` is its dotted path (``pretrain.clicv2.epochs``); ``template`` the
    message with ``{key}`` where the path goes, so that it can be re-rooted at another path."""

    def __init__(self, key: str, template: str) -> None:
        self.key, self.template = key, template
        super().__init__(template.replace("{key}", key))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe types (tuples become lists)."""
    return cfg.model_dump(mode="json")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check(test: Any, message: str) -> Any:
    """A field validator: ``message`` (``must be ..., got {v}``) when ``test(v)`` is false."""
    def run(v: Any) -> Any:
        if not test(v):
            raise ValueError(message.format(v=list(v) if isinstance(v, tuple) else v))
        return v
    return AfterValidator(run)


def _length(n: int) -> BeforeValidator:
    def run(v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) != n:
            raise ValueError(f": expected a list of {n} values, got {len(v)}: {_short(list(v))}")
        return v
    return BeforeValidator(run)


Pos = Annotated[int, Field(gt=0)]
NonNeg = Annotated[int, Field(ge=0)]
PosF = Annotated[float, Field(gt=0)]
NonNegF = Annotated[float, Field(ge=0)]
Prob = Annotated[float, _check(lambda v: 0 <= v <= 1, "must be a probability in [0, 1], got {v}")]
Tuple = Field(strict=False)  # a YAML list becomes the tuple; its items stay strictly typed
Range = Annotated[tuple[float, float], Tuple, _length(2),
                  _check(lambda v: 0 <= v[0] <= v[1] <= 1, "must satisfy 0.0 <= low <= high <= 1.0, got {v}")]
Pair = Annotated[tuple[float, float], Tuple, _length(2)]
Jitter = Annotated[tuple[float, float, float, float], Tuple, _length(4)]
Strs = Annotated[tuple[str, ...], Tuple]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _rule(key: str, ok: bool, template: str) -> None:
    """A cross-field rule of a section: ``template`` (with ``{key}``) at ``key`` unless ``ok``."""
    if not ok:
        raise ParamError(key, template)


# --------------------------------------------------------------------------------------- views
class MocoViewConfig(Section):
    """MoCo v2 / CLIC augmentations, every part switchable. Defaults are MoCo v2's (``--aug-plus``);
    CLIC's public code adds the key-view extras and drops grayscale (docs/recipes.md)."""

    crop_scale: Range = (0.2, 1.0)
    jitter: Jitter = (0.4, 0.4, 0.4, 0.1)
    jitter_p: Prob = 0.8
    grayscale_p: Prob = 0.2
    blur_p: Prob = 0.5
    blur_sigma: Pair = (0.1, 2.0)
    hflip_p: Prob = 0.5
    key_vflip_p: Prob = 0.0  # key-view extras of the public CLIC code
    key_rotation_deg: float = 0.0
    key_rotation_p: Prob = 0.5
    key_noise_p: Prob = 0.0
    key_noise_std: float = 0.05


class RCMConfig(Section):
    """Random Crop and Mix (CLIC; :mod:`clic.transforms.rcm`); defaults are the authors' script.
    ``mode``: ``pool`` draws cells from crops at three scales, resized; ``authors`` (their
    script) two crops of one scale plus augmented copies at native size. ``pairing``: ``key``
    (the mosaic is its image's key view), ``extra`` (``extra_per_image`` fixed mosaics per image
    as extra training images) or ``both``. ``max_upscale`` caps a tile's enlargement (``.inf``:
    none); ``source_resolution`` cuts extra mosaics from the source file rather than the
    resized cache."""

    mode: Literal["pool", "authors"] = "authors"
    crops: Annotated[int, Field(ge=1)] = 3
    grid: Annotated[int, Field(ge=1)] = 2
    aug_p: Prob = 0.5
    rotation_deg: NonNegF = 20.0
    jitter: NonNegF = 0.2
    max_upscale: Annotated[float, Field(allow_inf_nan=True),
                           _check(lambda v: v >= 1, "must be >= 1 (.inf: no cap), got {v}")] = float("inf")
    pairing: Literal["key", "extra", "both"] = "extra"
    extra_per_image: NonNeg = 3
    source_resolution: bool = True

    @_after(mode="after")
    def _grid(self) -> RCMConfig:
        _rule("grid", self.mode != "pool" or self.grid ** 2 <= 7 * self.crops,
              f"{{key}}={self.grid} needs {self.grid ** 2} cells but only {7 * self.crops} crops are drawn")
        _rule("grid", self.mode != "authors" or self.grid >= 2,
              f"{{key}} must be >= 2 with rcm.mode authors (two crops and their copies), got {self.grid}")
        return self


class ShiftConfig(Section):
    """CLICv2 shifted patchify: view 2's patch grid is offset by ``[min_shift, max_shift]`` of a
    patch (below 1/2, so the positive overlaps the anchor more than any negative) in one of
    ``directions``; both views share one crop."""

    enabled: bool = True
    min_shift: float = 0.125
    max_shift: float = 0.375
    directions: Annotated[tuple[Literal["horizontal", "vertical", "diagonal"], ...], Tuple,
                          Field(min_length=1)] = ("horizontal", "vertical", "diagonal")
    crop_scale: Range = (0.35, 1.0)
    hflip_p: Prob = 0.5
    jitter: Jitter = (0.4, 0.4, 0.2, 0.05)
    jitter_p: Prob = 0.8

    @_after(mode="after")
    def _shift(self) -> ShiftConfig:
        _rule("max_shift", 0 <= self.min_shift <= self.max_shift < 0.5,
              "{key}: need 0 <= min_shift <= max_shift < 0.5 (fractions of a patch; at half a patch or more a "
              "neighbouring negative overlaps the anchor as much as the positive), got "
              f"min_shift={self.min_shift}, max_shift={self.max_shift}")
        return self


# ---------------------------------------------------------------------------------- the method
class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    base_lr: PosF = 0.03
    lr_batch_ref: Pos = 256  # lr = base_lr * global_batch / lr_batch_ref
    weight_decay: NonNegF = 1e-4
    decay_all: bool = True  # decay every parameter (MoCo v2, CLIC); false: timm's param_groups_weight_decay
    momentum: float = 0.9
    betas: Pair = (0.9, 0.999)
    warmup_epochs: NonNegF = 0.0
    min_lr_ratio: float = 0.0
    clip_grad: NonNegF = 0.0  # 0 disables


class MocoConfig(Section):
    """MoCo v2 queue, momentum encoder and projection head. Shuffling BN (ResNets): keys on a
    shuffled batch; in one process both encoders normalise ``bn_splits`` sub-batches, and a key's
    sub-batch holds on average 1/``bn_splits`` of its query's images (MoCo on 8 GPUs: 1/8)."""

    queue_size: Pos = 65536
    momentum: Annotated[float, _check(lambda v: 0 <= v < 1, "must be in [0, 1), got {v}")] = 0.999
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: rising to 1 (MoCo v3)
    temperature: PosF = 0.2
    dim: Pos = 128
    head: Literal["linear", "mlp"] = "mlp"
    mlp_hidden: NonNeg = 0  # 0: the backbone's feature width (2048-2048-128 for ResNet-50)
    complexity_weight: NonNegF = 0.0  # CLIC's complexity-aware loss (its later variant: 0.25)
    shuffle_bn: bool = True
    bn_splits: Pos = 2
    # a queue longer than this fraction of the pretraining images holds mostly stale keys: refused
    max_queue_fraction: Annotated[float, _check(lambda v: 0 < v <= 1, "must be in (0, 1], got {v}")] = 0.5


class CLICv2Config(Section):
    """CLICv2 losses and ablation switches (``mem_weight: 0`` keeps the masking, drops the target)."""

    loss: Literal["patch", "image"] = "patch"
    temperature: PosF = 0.2
    dim: Pos = 128
    max_tokens: Pos = 1024  # anchors sampled per step for the patch-wise InfoNCE (bounds memory)
    momentum: Annotated[float, _check(lambda v: 0 <= v < 1, "must be in [0, 1), got {v}")] = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "cosine"
    mem: bool = True
    mask_ratio: Annotated[float, _check(lambda v: 0 < v < 1, "must be in (0, 1), got {v}")] = 0.4
    mem_weight: NonNegF = 1.0
    decoder_depth: Pos = 1


class PretrainConfig(Section):
    """Everything one pretraining run needs; built from ``pretrain.common`` + ``pretrain.<method>``."""

    method: str = "moco"  # a name registered in clic.methods
    backbone: str = "resnet18"
    image_size: Pos = 64
    patch_size: Pos = 16
    depth: NonNeg = 0  # ViT depth override (0: the architecture's own)
    pool: Literal["mean", "cls"] = "mean"  # ViT feature: mean of patch tokens or the CLS token
    epochs: Pos = 10
    batch_size: Pos = 64
    num_workers: NonNeg = 2
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: Pos = 50  # optimiser steps; the end of every epoch is always saved
    sync_every: Pos = 20  # read losses from the device every N steps (no per-step host sync)
    compile: bool = False
    threads: NonNeg = 0  # intra-op threads per training process; 0: the cores / processes per node
    augment_on: Literal["loader", "device"] = "loader"  # where the photometric half of the views runs
    decode_on: Literal["loader", "device"] = "loader"  # where JPEGs are decoded and cropped
    nprocs: Pos = 1  # processes per node when the pipeline launches torchrun
    max_images: NonNeg = 0  # 0: all images of the pretraining split(s) or corpus
    splits: Strs = ("train",)
    data: Annotated[Strs, _check(lambda v: all(e.strip() for e in v), "names an empty entry: {v}")] = ()
    shard_cache: str = ""  # local cache limit of remote sharded corpora (MosaicML's cache_limit, e.g. 200gb)
    optim: OptimConfig = OptimConfig()
    moco: MocoConfig = MocoConfig()
    clicv2: CLICv2Config = CLICv2Config()
    views: MocoViewConfig = MocoViewConfig()
    rcm: RCMConfig = RCMConfig()
    shift: ShiftConfig = ShiftConfig()

    @_after(mode="after")
    def _rules(self, info: ValidationInfo) -> PretrainConfig:
        _rule("method", self.method in METHOD_RULES, f"{{key}}: expected one of {', '.join(METHOD_RULES)}, got "
              f"{self.method!r}" + ("" if METHOD_RULES else " (no method is registered: import clic.methods)"))
        vit = self.backbone.startswith("vit")
        _rule("decode_on", self.decode_on == "loader" or self.augment_on == "device",
              "{key}=device needs augment_on: device (the loader then hands on undecoded images)")
        _rule("patch_size", not vit or self.image_size % self.patch_size == 0,
              f"{{key}}={self.patch_size} must divide image_size={self.image_size}")
        if (info.context or {}).get("method_rules", True):  # clic.params checks them when a method is taken
            METHOD_RULES[self.method](self)
        return self

    def lr(self, world_size: int = 1) -> float:
        """Absolute learning rate from the base rate and the global batch (linear scaling rule)."""
        return self.optim.base_lr * self.batch_size * world_size / self.optim.lr_batch_ref


# ----------------------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    n_train: Pos = 320
    n_test: NonNeg = 160
    size: Annotated[int, Field(ge=32)] = 96
    categories: Strs = ("shapes", "texture", "mixed", "stripes")
    n_classes: Annotated[int, _check(lambda v: 2 <= v <= 6, "must be in [2, 6], got {v}")] = 4
    n_class_train: int = 40  # per class, for the transfer set
    n_class_val: int = 20


class DataConfig(Section):
    """Which dataset to prepare and how (``clic data prepare``)."""

    source: Literal["synthetic", "ic9600", "savoias", "folder"] = "synthetic"
    # the data's own seed (synthetic images, the train/test split); none: the top-level seed. A
    # study over seeds sets it to compare its seeds on the same images
    seed: int | None = None
    path: str = ""  # ic9600: folder or archive; savoias: clone; folder: image folder
    csv: str = ""  # folder source: CSV of image,score[,split]
    categories: Strs = ()  # savoias: subset of categories (empty: all present)
    test_fraction: Annotated[float, _check(lambda v: 0 < v < 1, "must be in (0, 1), got {v}")] = 0.3
    raw_dir: str = "data/raw"
    out_dir: str = "data/prepared"
    cache_size: NonNeg = 128  # short side of the resized cache; 0 disables the cache
    min_size: int = 32
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb threshold
    max_archive_bytes: int = 64 * 2**30  # an archive's total uncompressed size
    max_member_bytes: int = 2**30  # one archive member's uncompressed size
    max_archive_ratio: float = 200.0  # uncompressed/compressed, per zip member or compressed tar (> 1 MiB)
    synthetic: SyntheticConfig = SyntheticConfig()

    def seed_for(self, run_seed: int) -> int:
        """The seed the data is prepared with: ``seed``, else the run's."""
        return run_seed if self.seed is None else self.seed

    @_after(mode="after")
    def _paths(self) -> DataConfig:
        _rule("path", self.source == "synthetic" or bool(self.path),
              f"{{key}} must name the local {self.source} folder or archive")
        _rule("csv", self.source != "folder" or bool(self.csv),
              "{key} must name the CSV of image,score[,split] for source 'folder'")
        return self


# ----------------------------------------------------------------------------------- evaluation
ICNET_IMAGE_SIZE = 512  # ICNet's input side (IC9600): probe.image_size 0 means this for protocol icnet


class IcnetProbeConfig(Section):
    """The ICNet-style head of ``probe.protocol: icnet`` (clic/evaluation/icnet.py); defaults are
    ICNet's: SGD 0.05, momentum 0.9, wd 1e-3, batch 64, 30 epochs, 1 warm-up, x0.2 at 10 and 20,
    loss 0.9 MSE(score) + 0.1 MSE(mean map), 512-wide 3x3 branches, flips."""

    epochs: Pos = 30
    lr: PosF = 0.05
    momentum: NonNegF = 0.9
    weight_decay: NonNegF = 1.0e-3
    batch_size: Pos = 64
    warmup_epochs: NonNeg = 1
    milestones: Annotated[tuple[int, ...], Tuple, _check(lambda v: list(v) == sorted(set(v)) and all(
        m >= 1 for m in v), "must be increasing epochs >= 1, got {v}")] = (10, 20)
    gamma: PosF = 0.2
    channels: Pos = 512
    kernel: Annotated[int, _check(lambda v: v >= 1 and v % 2, "must be a positive odd number, got {v}")] = 3
    hidden: Pos = 512
    map_weight: Prob = 0.1
    flip: bool = True  # also extract features of flipped training images


class ProbeConfig(Section):
    """A head on frozen features against human scores. ``protocol``: ridge / sgd (linear, pooled
    features) or icnet (ICNet's head on spatial maps). ``input``: ``crop`` (short side, centre
    square), ``whole`` (squashed to a square, as ICNet) or ``auto``. ``mode``: ``split`` (fit
    train, report test) or ``cv`` (out-of-fold k-fold inside each category). ``features``:
    ``last`` (the papers' pooled last stage) or ``stages`` (pools of four depths concatenated).
    The registry's champion is chosen on ``validation_fraction`` of the training images."""

    protocol: Literal["ridge", "sgd", "icnet"] = "ridge"
    mode: Literal["split", "cv"] = "split"
    folds: Annotated[int, Field(ge=2)] = 5
    input: Literal["auto", "crop", "whole"] = "auto"
    image_size: NonNeg = 0  # 0 = the pretraining size (icnet: 512)
    features: Literal["last", "stages"] = "last"
    alphas: Annotated[tuple[PosF, ...], Tuple, Field(min_length=1)] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3,
                                                                       1e4, 1e5)
    sgd_epochs: Pos = 100
    sgd_lr: PosF = 0.01
    bootstrap: NonNeg = 1000
    validation_fraction: Annotated[float, _check(lambda v: 0 <= v < 1, "must be in [0, 1), got {v}")] = 0.2
    batch_size: Pos = 64
    workers: NonNeg = 2
    baselines: Annotated[tuple[Literal["random", "handcrafted"], ...], Tuple] = ("random", "handcrafted")
    icnet: IcnetProbeConfig = IcnetProbeConfig()

    @_after(mode="after")
    def _features(self) -> ProbeConfig:
        _rule("features", self.features == "last" or self.protocol != "icnet",
              "{key}=stages pools vectors; protocol icnet needs the last stage's map")
        return self

    @property
    def whole(self) -> bool:
        """Whether the model sees the whole image squashed to a square (else a centre crop)."""
        return self.input == "whole" or (self.input == "auto" and self.protocol == "icnet")

    def input_size(self, pretrain_size: int) -> int:
        """``image_size``, or when 0 the encoder's pretraining size (ICNet's 512 for icnet)."""
        return self.image_size or (ICNET_IMAGE_SIZE if self.protocol == "icnet" else pretrain_size)


class TransferConfig(Section):
    """Linear classification probe on an ImageFolder (``train/``, ``val/``)."""

    name: Annotated[str, _check(str.isidentifier, "must be an identifier (it names metrics), got {v!r}")] = "synthetic"
    path: str = "data/transfer"
    epochs: Pos = 50
    lr: float = 0.1
    batch_size: int = 128
    workers: int = 2


class ValidateConfig(Section):
    """Bounds of the ``validate`` stage; ``near_duplicate_bits``: an evaluation image whose
    perceptual hash is this close to a corpus image's is a leak (copies <= 4 of 64 bits, distinct
    photos >= 6; -1: identical pixels only)."""

    min_rows: Pos = 1
    max_rows: int = 10_000_000
    near_duplicate_bits: Annotated[int, _check(lambda v: -1 <= v <= 32, "must be in [-1, 32], got {v}")] = 4
    # an evaluation image in the pretraining corpus: refused (the unseen-kinds protocol), or counted
    # and reported when pretraining on the scored images is the point (the final protocol: the encoders
    # a user takes; its probe numbers are then in-sample for pretraining)
    evaluation_in_corpus: Literal["refuse", "in_sample"] = "refuse"

    @_after(mode="after")
    def _rows(self) -> ValidateConfig:
        _rule("max_rows", self.max_rows >= self.min_rows,
              f"{{key}} must be >= validate.min_rows ({self.min_rows}), got {self.max_rows}")
        return self


with warnings.catch_warnings():  # `register` (the params key) also names ABCMeta.register: harmless here
    warnings.simplefilter("ignore", UserWarning)

    class MlflowConfig(Section):
        experiment: str = "clic"
        tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
        register: bool = True
