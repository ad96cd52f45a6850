"""Torch datasets over a prepared table, deterministic per (seed, epoch, index).

Every sample seeds its own augmentation RNG from ``(seed, epoch, index)`` (inside a forked RNG
so the caller's streams are untouched), and :class:`EpochBatches` draws each epoch's order from
``(seed, epoch)`` and hands out ``(epoch, index)`` keys, so loader workers can persist across
epochs without being told the epoch. Together they make a run resumed mid-epoch see exactly the batches it would
have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from clic.data.imageio import load_rgb
from clic.data.table import Record


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x9E3779B9) % (2**63 - 1)


class ViewDataset(Dataset):
    """Prepared records -> ``transform(image)`` dicts (plus ``index``).

    ``extra``: a callable producing an extra training image from a source image (CLIC's RCM
    mosaics with ``rcm.pairing`` extra/both); ``extra_per_image`` of them follow the records.
    Each extra image is fixed (seeded by its index only), as if generated once ahead of training.
    """

    def __init__(self, records: Sequence[Record], root: str | Path, transform: Callable[[Image.Image], dict],
                 seed: int = 0, extra: Callable[[Image.Image], Image.Image] | None = None,
                 extra_per_image: int = 0) -> None:
        self.records, self.root, self.transform = list(records), Path(root), transform
        self.seed = seed
        self.extra, self.extra_per_image = extra, (extra_per_image if extra is not None else 0)

    def __len__(self) -> int:
        return len(self.records) * (1 + self.extra_per_image)

    def load(self, index: int) -> Image.Image:
        rec = self.records[index % len(self.records)]
        img = load_rgb(rec.image_path(self.root))
        if index >= len(self.records) and self.extra is not None:
            with _seeded(sample_seed(self.seed, -1, index)):
                img = self.extra(img)
        return img

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index (epoch 0) or an ``(epoch, index)`` pair from :class:`EpochBatches`."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img = self.load(index)
        with _seeded(sample_seed(self.seed, epoch, index)):
            out = self.transform(img)
        out["index"] = index
        return out


class _seeded:
    """Seed python's and torch's global RNGs for a block, restoring them afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.py_state = random.getstate()
        self.torch_state = torch.random.get_rng_state()
        random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.py_state)
        torch.random.set_rng_state(self.torch_state)


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
        return self.n // (self.batch_size * self.world) - self.skip

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[self.rank::self.world]
        for b in range(self.skip, self.steps_per_epoch):
            yield [(self.epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
