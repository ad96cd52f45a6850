"""CLIC (Liu et al. 2025): MoCo v2 with Random Crop and Mix, mosaics of an image's crops as its key
view (``rcm.pairing: key``), as extra training images (``extra``, the authors' offline script) or
both (:mod:`clic.transforms.rcm`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from clic import distributed as dist
from clic.config import ParamError, PretrainConfig
from clic.data.dataset import ExtraImages
from clic.data.table import Record, resolve
from clic.methods.base import register
from clic.methods.moco import MocoV2
from clic.transforms.moco import MocoViews
from clic.transforms.rcm import extra_mosaics

log = logging.getLogger(__name__)


@register
class CLIC(MocoV2):
    name = "clic"
    sections: ClassVar[tuple[str, ...]] = ("optim", "moco", "views", "rcm")

    def check(self, cfg: PretrainConfig) -> None:
        if cfg.decode_on == "device":
            raise ParamError("decode_on", "{key}=device cuts crops and flips only; CLIC's Random-Crop-and-Mix "
                             "mosaics are built in the loader: use decode_on: loader for clic")
        super().check(cfg)

    def views(self, cfg: PretrainConfig, photometric: bool) -> Callable[[Any], dict]:
        key_mosaic = cfg.rcm if cfg.rcm.pairing in ("key", "both") else None
        return MocoViews(cfg.image_size, cfg.views, key_mosaic, photometric_ops=photometric)

    def extra_images(self, cfg: PretrainConfig, records: Sequence[Record],
                     data_dir: str | Path) -> tuple[ExtraImages | None, int]:
        if cfg.rcm.pairing not in ("extra", "both"):
            return None, 0
        missing = 0
        if cfg.rcm.source_resolution:
            missing = sum(not resolve(Path(data_dir), r.path).is_file() for r in records)
        if missing and dist.is_main():
            log.warning("rcm.source_resolution: %d of %d source images are not at their table path; their extra "
                        "mosaics are cut from the resized cache", missing, len(records))
        return extra_mosaics(cfg.rcm, cfg.image_size), cfg.rcm.extra_per_image

    def check_images(self, cfg: PretrainConfig, n_images: int | None, sharded: bool) -> None:
        if sharded and cfg.rcm.pairing in ("extra", "both"):
            raise ValueError(f"pretrain.clic.rcm.pairing={cfg.rcm.pairing}: extra mosaics need the image files; "
                             "with shards (pretrain.data) use pairing 'key'")
        super().check_images(cfg, n_images, sharded)
