"""Streaming a sharded corpus (:mod:`clic.data.shards`) into training: deterministic, resumable,
split across DDP ranks and loader workers without duplicates.

The order of an epoch is a pure function of ``(seed, epoch, world, workers)``:

1. the shards are permuted by ``(seed, epoch)`` and their samples concatenated, in member order,
   into the epoch's sequence of ``total`` samples;
2. rank ``r`` takes the contiguous slice ``[r S B, (r+1) S B)`` of it, ``S = total // (B world)``
   steps of ``B`` samples each (drop last: every rank runs the same number of steps, the few
   samples left over change every epoch);
3. the rank's ``S`` batches are cut into ``workers`` contiguous runs, one per loader worker (so a
   worker reads only its own shards, plus at most two it shares at the edges), and each worker
   shuffles its run through a buffer of ``shuffle_buffer`` samples seeded by
   ``(seed, epoch, rank, worker)``;
4. the DataLoader hands out the workers' batches round-robin.

Every sample's augmentation is seeded by ``(seed, epoch, sample id)`` as in
:class:`clic.data.dataset.ViewDataset`. Resuming at step ``s`` (:meth:`ShardStream.set_epoch`)
skips, in each worker, the batches it had delivered in the first ``s`` steps (reading but not
decoding them) and rotates the workers so that the round-robin continues where it stopped: the
remainder equals the uninterrupted epoch's. The split depends on the worker count, so a run
resumes mid-epoch only with the same ``num_workers`` (pretraining checks it).

Reading uses the standard library's ``tarfile`` over :func:`clic.data.shards.open_url` streams
(:func:`clic.data.shards.iter_shard`: bounded members, remote faults retried, counts checked):
webdataset (or litdata) splits by whole shards, which cannot give every rank the same number of
steps with each sample exactly once, and cannot skip to a step; what they add beyond that (URL
pipes, buffer shuffling) is a few lines here, and the core stays torch-only. The shards remain
readable by webdataset.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from clic.data.dataset import _seeded, sample_seed
from clic.data.imageio import Encoded, ImageError, decode_bytes, read_encoded
from clic.data.shards import ShardIndex, iter_shard

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Shards -> ``transform(image)`` dicts (plus ``index`` and ``image_id``: the sample id), for a
    DataLoader with ``batch_size=B`` and any ``num_workers``; see the module docstring for the order.

    Call :meth:`set_epoch` before iterating (workers are started per epoch and copy it).
    ``encoded``: the transform gets :class:`clic.data.imageio.Encoded` images (bytes and size, for
    ``decode_on: device``) instead of decoded ones.
    """

    def __init__(self, index: ShardIndex, transform: Callable[[Any], dict], batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle_buffer: int = 1000,
                 decode_side: int | None = None, encoded: bool = False) -> None:
        if index.total < batch_size * world:
            raise ValueError(f"{index.total} images in the shards cannot fill one batch of {batch_size} x {world} "
                             "process(es); lower batch_size or add images")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.index, self.transform, self.batch_size = index, transform, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer, self.decode_side, self.encoded = shuffle_buffer, decode_side, encoded
        self.epoch, self.skip = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.index.total // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate ``epoch`` from step ``skip`` (the steps already taken when resuming)."""
        if not 0 <= skip <= self.steps_per_epoch:
            raise ValueError(f"skip must be in [0, {self.steps_per_epoch}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def shard_order(self) -> list[int]:
        order = list(range(len(self.index.urls)))
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)
        return order

    def worker_run(self, worker: int, workers: int) -> tuple[int, int, int, int]:
        """``(logical worker, first batch, batches, batches already delivered)`` of loader worker
        ``worker``: after a skip of ``s`` steps, physical worker ``p`` plays logical worker
        ``(p + s) % workers``, so the DataLoader's round-robin, restarting at worker 0, continues
        the uninterrupted sequence."""
        steps = self.steps_per_epoch
        j = (worker + self.skip) % workers
        base, extra = divmod(steps, workers)
        first, count = j * base + min(j, extra), base + (j < extra)
        done = self.skip // workers + (j < self.skip % workers)
        return j, first, count, min(done, count)

    def samples(self, worker: int = 0, workers: int = 1) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """``(sample id, image bytes, metadata)`` that ``worker`` of ``workers`` delivers this
        epoch (undecoded; the order the batches are cut from)."""
        j, first, count, done = self.worker_run(worker, workers)
        b = self.batch_size
        lo = (self.rank * self.steps_per_epoch + first) * b
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}:{self.world}:{j}:{workers}")
        stream = _buffer_shuffle(self._range(lo, lo + count * b), self.shuffle_buffer, rng)
        for i, sample in enumerate(stream):
            if i >= done * b:
                yield sample

    def _range(self, lo: int, hi: int) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """Samples at positions ``[lo, hi)`` of the epoch's sequence, reading only the shards
        that hold them."""
        pos = 0
        offsets = self.index.offsets
        for k in self.shard_order():
            count, url = self.index.counts[k], self.index.urls[k]
            if pos + count <= lo:
                pos += count
                continue
            if pos >= hi:
                return
            start = max(0, lo - pos)  # samples of this shard before the range are read, not yielded
            for m, (_, data, meta) in enumerate(iter_shard(url, self.index.where(k), count, start), start=start):
                if pos + m >= hi:
                    break
                yield offsets[k] + m, data, meta
            pos += count

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        last: Image.Image | Encoded | None = None
        for sample_id, data, meta in self.samples(worker, workers):
            name = str(meta.get("name", sample_id))
            try:
                img = last = read_encoded(data, name) if self.encoded else decode_bytes(data, name,
                                                                                       min_size=self.decode_side)
            except ImageError as exc:
                if last is None:
                    raise
                log.warning("unreadable shard sample %s replaced by the previous image: %s", name, exc)
                img = last
            with _seeded(sample_seed(self.seed, self.epoch, sample_id)):
                out = self.transform(img)
            out["index"] = out["image_id"] = sample_id
            yield out


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
