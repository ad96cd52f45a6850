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

A read that fails never shortens an epoch silently: a shard that cannot be fetched (MosaicML tries
it ``1 + DOWNLOAD_RETRY`` times) or whose file does not match its index ends the iteration with a
:class:`clic.data.shards.CorpusError` naming the corpus and the shard, in every worker that needs
it (none waits for another's failed download); an unreadable sample is replaced by the next
readable one, by name, as unreadable files are in folders.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from clic.data.dataset import _seeded, sample_seed
from clic.data.imageio import Encoded, ImageError, decode_bytes, read_encoded
from clic.data.shards import CorpusError, _needs_streaming, check_shard_file, is_url, remote_and_local

log = logging.getLogger(__name__)
_needs_streaming()
from streaming import Stream, StreamingDataset  # noqa: E402 (after the friendly import check)
from streaming.base.dataset import _ShardState  # noqa: E402

DOWNLOAD_RETRY = 2  # MosaicML's default, stated: a shard is fetched at most three times
SUBSTITUTE_TRIES = 32  # unreadable samples in a row before the corpus is refused


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
        folders = [remote if remote and is_url(remote) else str(Path(remote or local).resolve())
                   for remote, local in places]
        if len(set(folders)) < len(folders):  # one corpus named twice (a folder and its file:// URL, a slash)
            twice = [str(e) for e, f in zip(entries, folders, strict=True) if folders.count(f) > 1]
            raise CorpusError(f"pretrain.data names one corpus twice ({', '.join(twice)}): its images would be "
                              "trained twice as often; name it once")
        streams = [Stream(remote=remote, local=str(local), download_retry=DOWNLOAD_RETRY) for remote, local in places]
        self.names = [str(entry) for entry in entries]
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
        self._failure = ""  # why a shard could not be prepared in this process
        self._checked: set[int] = set()  # fetched shards whose file was checked against the index

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

    def _where(self, shard_id: int) -> str:
        """``<corpus entry>: shard <basename>`` for messages."""
        stream = self.stream_per_shard[shard_id]
        return f"{self.names[stream]}: shard {self.shards[shard_id].file_pairs[0][0].basename}"

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """MosaicML's fetch of a shard, then a fetched (remote) shard's file checked against the index
        once per process (local corpora were checked whole at the start: :func:`check_index`).
        A failure marks the shard as not being fetched (so no other worker waits on it forever), stops
        this worker's download threads; the sample loop (main thread) raises it, a download thread
        leaves it for :meth:`__iter__`, which raises it when the samples run out."""
        try:
            super().prepare_shard(shard_id, blocking)
            stream = self.streams[self.stream_per_shard[shard_id]]
            if stream.remote and shard_id not in self._checked and self._shard_states[shard_id] == _ShardState.LOCAL:
                shard = self.shards[shard_id]
                raw = shard.file_pairs[0][0]
                check_shard_file(Path(stream.local) / (stream.split or "") / raw.basename, shard.samples, raw.bytes,
                                 f"{self.names[self.stream_per_shard[shard_id]]} index.json")
                self._checked.add(shard_id)
        except Exception as exc:  # noqa: BLE001 - any client's failure names the shard
            lock = getattr(self, "_cache_filelock", None)
            with lock if lock is not None else contextlib.nullcontext():
                # "local" with its file missing: every worker waiting for it stops waiting, and the next
                # access of any worker fetches it again (and fails there in turn, naming it)
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.LOCAL
            detail = str(exc) if isinstance(exc, CorpusError) else f"{type(exc).__name__}: {str(exc)[:300]}"
            self._failure = f"{self._where(shard_id)} cannot be read ({detail})"
            if hasattr(self, "_event"):
                self._event.set()  # MosaicML's threads stop; the epoch ends short
            if threading.current_thread() is threading.main_thread():
                raise CorpusError(self._failure) from None

    def __iter__(self) -> Iterator[dict]:
        yield from super().__iter__()
        if self._failure:
            raise CorpusError(self._failure)

    def _read(self, sample_id: int, retry: int) -> tuple[str, Image.Image | Encoded]:
        """Sample ``sample_id`` decoded (``name`` for messages); ImageError when it cannot be."""
        shard_id = int(self.spanner[sample_id][0])
        where = f"{self._where(shard_id)}, sample {sample_id}"
        try:
            sample = super().get_item(sample_id, retry)
        except CorpusError:
            raise
        except RuntimeError as exc:  # MosaicML's "Background thread failed", or a shard still missing
            raise CorpusError(self._failure or f"{where}: {str(exc)[:300]}") from None
        except Exception as exc:  # noqa: BLE001 - lengths or text in the sample that lie
            raise ImageError(f"{where}: cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})") from None
        name = f"{where} ({str(sample.get('name', ''))[:200]})"
        data = sample["jpg"]
        if self.encoded:
            return name, read_encoded(data, name)
        return name, decode_bytes(data, name, min_size=self.decode_side)

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        sample_id = int(sample_id)  # MosaicML passes numpy integers
        try:
            _, img = self._read(sample_id, retry)
        except ImageError as first:
            img = self._last  # type: ignore[assignment]
            for k in range(1, SUBSTITUTE_TRIES + 1):
                if img is not None:
                    break
                try:
                    _, img = self._read((sample_id + k) % self.num_samples, retry)
                except ImageError:
                    continue
            if img is None:
                raise CorpusError(f"{first}; and the {SUBSTITUTE_TRIES} samples after it cannot be read either: "
                                  "write the corpus again (clic data shard)") from None
            log.warning("unreadable shard sample replaced by another image: %s", first)
        self._last = img
        with _seeded(sample_seed(self.seed, self.epoch, sample_id)):
            out = self.transform(img)
        out["index"] = out["image_id"] = sample_id
        return out
