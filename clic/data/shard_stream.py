"""Streaming a sharded corpus (:mod:`clic.data.shards`) into training with MosaicML streaming.

MosaicML's ``StreamingDataset`` splits each epoch over DDP ranks and loader workers (every rank
the same number of batches; in the ``total // (batch x ranks)`` steps an epoch takes, each sample
at most once, and the samples left over change every epoch), shuffles by ``(seed, epoch)``,
downloads remote shards into a local cache ahead of use (evicting beyond ``cache_limit``), and
starts an epoch at any sample. :class:`ShardStream` adds what pretraining needs on top: the
epoch and step to start from are the checkpoint's (:meth:`ShardStream.set_epoch`: the remainder
of a resumed epoch equals the uninterrupted one's), and every sample's augmentation is seeded by
``(seed, epoch, sample id)`` as in :class:`clic.data.dataset.ViewDataset`. The order does not
depend on the number of loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from clic.data.dataset import _seeded, sample_seed
from clic.data.imageio import Encoded, ImageError, decode_bytes, read_encoded
from clic.data.shards import _needs_streaming, remote_and_local

log = logging.getLogger(__name__)
_needs_streaming()
from streaming import Stream, StreamingDataset  # noqa: E402 (after the friendly import check)


class ShardStream(StreamingDataset):
    """The corpora ``entries`` (folders or URLs of :mod:`clic.data.shards`) -> ``transform(image)``
    dicts (plus ``index`` and ``image_id``: the sample id), for a DataLoader with
    ``batch_size=B``, ``drop_last=True`` and any ``num_workers``, of which an epoch takes
    :attr:`steps_per_epoch` batches (MosaicML pads every rank to the same count with a few repeats
    at the end). Remote corpora are cached under ``cache_root``, evicting shards beyond
    ``cache_limit`` (e.g. ``"200gb"``; None: the whole corpus stays). Call :meth:`set_epoch`
    before iterating. ``encoded``: the transform gets :class:`clic.data.imageio.Encoded` images
    (for ``decode_on: device``)."""

    def __init__(self, entries: Sequence[str | Path], cache_root: str | Path, transform: Callable[[Any], dict],
                 batch_size: int, seed: int = 0, decode_side: int | None = None, encoded: bool = False,
                 cache_limit: str | None = None) -> None:
        places = [remote_and_local(entry, cache_root) for entry in entries]
        streams = [Stream(remote=remote, local=str(local)) for remote, local in places]
        # one canonical node: the order is the same on any number of nodes, ranks and workers
        super().__init__(streams=streams, shuffle=True, shuffle_seed=seed, batch_size=batch_size,
                         num_canonical_nodes=1, allow_unsafe_types=False, cache_limit=cache_limit)
        world = self._unique_rank_world.num_ranks
        if self.num_samples < batch_size * world:
            raise ValueError(f"{self.num_samples} images in the shards cannot fill one batch of {batch_size} x "
                             f"{world} process(es); lower batch_size or add images")
        self.transform, self.seed, self.batch, self.world, self.epoch = transform, seed, batch_size, world, 0
        self.decode_side, self.encoded = decode_side, encoded
        self._last: Image.Image | Encoded | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch * self.world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate ``epoch`` from step ``skip`` (the steps already taken when resuming)."""
        if not 0 <= skip <= self.steps_per_epoch:
            raise ValueError(f"skip must be in [0, {self.steps_per_epoch}], got {skip}")
        self.epoch, self.next_epoch = epoch, epoch
        self._forget_iteration()
        self.load_state_dict({"epoch": epoch, "sample_in_epoch": skip * self.batch * self.world,
                              "num_canonical_nodes": 1, "shuffle_seed": self.seed})

    def _forget_iteration(self) -> None:
        """Drop what iterating in this process left (MosaicML 0.10 keeps its download threads and
        file lock on the dataset): forked loader workers would inherit a thread pool without
        threads and hang, and filelock refuses a lock inherited across fork."""
        if hasattr(self, "_iterator"):
            self._iterator.exit()
        if hasattr(self, "_executor"):
            self._executor.shutdown(wait=False)
        for name in ("_iterator", "_executor", "_event"):
            self.__dict__.pop(name, None)
        self._shared_barrier.__dict__.pop("lock", None)

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        sample_id = int(sample_id)  # MosaicML passes numpy integers
        sample = super().get_item(sample_id, retry)
        name = sample["name"]
        try:
            img = read_encoded(sample["jpg"], name) if self.encoded else decode_bytes(sample["jpg"], name,
                                                                                     min_size=self.decode_side)
            self._last = img
        except ImageError as exc:
            if self._last is None:
                raise
            log.warning("unreadable shard sample %s replaced by the previous image: %s", name, exc)
            img = self._last
        with _seeded(sample_seed(self.seed, self.epoch, sample_id)):
            out = self.transform(img)
        out["index"] = out["image_id"] = sample_id
        return out
