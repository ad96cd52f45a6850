"""Torch datasets over a prepared table, deterministic per (seed, epoch, index).

Every sample seeds its own augmentation RNG from ``(seed, epoch, index)`` (inside a forked RNG
so the caller's streams are untouched), and :class:`EpochBatches` draws each epoch's order from
``(seed, epoch)`` and hands out ``(epoch, index)`` keys, so loader workers can persist across
epochs without being told the epoch. Together they make a run resumed mid-epoch see exactly the batches it would
have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset

from clic.data.imageio import ImageError, load_rgb, read_encoded
from clic.data.table import Record, resolve

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 16  # consecutive unreadable images tolerated before a sample fails


class ExtraImages(Protocol):
    """What makes extra training images from a source image: CLIC's RCM mosaics
    (:class:`clic.transforms.rcm.RandomCropMix`; data/ sits below transforms/ and names no view)."""

    source_resolution: bool  # tiles are cut from the source image, not the prepared copy

    def extra(self, img: Image.Image, k: int) -> Image.Image: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x9E3779B9) % (2**63 - 1)


class ViewDataset(Dataset):
    """Prepared records -> ``transform(image)`` dicts (plus ``index``).

    ``extra``: CLIC's RCM (``rcm.pairing`` extra/both), whose ``extra(image, k)`` makes the
    ``k``-th extra training image of a source image; ``extra_per_image`` blocks of them follow the
    records. Each extra image is fixed (seeded by its index only), as the authors' mosaics are
    generated once ahead of training.
    ``decode_side``: JPEGs are decoded at the smallest DCT scale keeping this short side (a corpus
    of camera photos is decoded 4-30x faster; see :func:`clic.data.imageio.load_rgb`); not when
    ``extra`` cuts its mosaics from the full-size source, so that CLIC's training images and its
    mosaics come from one resolution.
    ``encoded``: the transform gets :class:`clic.data.imageio.Encoded` images (file bytes and
    size) instead, for decoding on the training device (``decode_on: device``).
    An unreadable image (a corpus is not checked image by image) is logged by name and replaced by
    the next readable one, so one bad file never stops a run.
    """

    def __init__(self, records: Sequence[Record], root: str | Path, transform: Callable[[Image.Image], dict],
                 seed: int = 0, extra: ExtraImages | None = None,
                 extra_per_image: int = 0, decode_side: int | None = None, encoded: bool = False) -> None:
        self.records, self.root, self.transform = list(records), Path(root), transform
        self.seed, self.decode_side, self.encoded = seed, decode_side, encoded
        if extra is not None and getattr(extra, "source_resolution", False):
            self.decode_side = None  # mosaics come from the full-size source: so do the images they join
        self._unreadable: set[int] = set()
        self.extra, self.extra_per_image = extra, (extra_per_image if extra is not None else 0)

    def __len__(self) -> int:
        return len(self.records) * (1 + self.extra_per_image)

    def load(self, index: int) -> Image.Image:
        rec = self.records[index % len(self.records)]
        is_extra = index >= len(self.records) and self.extra is not None
        path = rec.image_path(self.root)
        if is_extra and getattr(self.extra, "source_resolution", False):  # RCM tiles at source size
            source = resolve(self.root, rec.path)
            path = source if source.is_file() else path
        if self.encoded:  # decode_on: device: the file's bytes and size only
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageError(f"{path}: cannot read image file ({exc})") from exc
            return read_encoded(data, str(path))  # type: ignore[return-value]
        img = load_rgb(path, min_size=None if is_extra else self.decode_side)
        if is_extra and self.extra is not None:
            with _seeded(sample_seed(self.seed, -1, index)):
                img = self.extra.extra(img, index // len(self.records) - 1)
        return img

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index (epoch 0) or an ``(epoch, index)`` pair from :class:`EpochBatches`."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, used = self.load_readable(index)
        with _seeded(sample_seed(self.seed, epoch, index)):
            out = self.transform(img)
        out["index"] = index
        out["image_id"] = used % len(self.records)  # the source image (extra RCM mosaics share it)
        return out

    def load_readable(self, index: int) -> tuple[Image.Image, int]:
        """(:meth:`load` of ``index``, ``index``), or of the first readable index after it (within
        the same block of source or extra images) when its file cannot be decoded."""
        n = len(self.records)
        for step in range(MAX_SUBSTITUTES):
            i = (index // n) * n + (index % n + step) % n
            try:
                return self.load(i), i
            except ImageError as exc:
                if i % n not in self._unreadable:  # once per file and loader worker
                    self._unreadable.add(i % n)
                    log.warning("skipping unreadable image %s: %s", self.records[i % n].name, exc)
        raise ImageError(f"{MAX_SUBSTITUTES} consecutive images from {self.records[index % n].name} on are "
                         "unreadable; check the pretraining data")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python's and torch's global (CPU) RNGs for a block, restoring them afterwards.

    Only the CPU generator: the views draw from it alone, and ``torch.manual_seed`` would also
    queue a seeding of every accelerator, recording a stack trace each time (a fifth of a 64 px
    MoCo sample's loader time)."""
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)


class EpochBatches:
    """Batch sampler: each epoch a permutation drawn from (seed, epoch), split across ranks,
    cut into full batches (drop last), starting after ``skip`` batches (for resuming)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < batch_size * world:
            raise ValueError(f"{n} training images cannot fill one batch of {batch_size} x {world} process(es); "
                             "lower batch_size or add images")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[self.rank::self.world]
        for b in range(self.skip, self.steps_per_epoch):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
