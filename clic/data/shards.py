"""A pretraining corpus as MosaicML streaming (MDS) shards, for corpora beyond one disk
(``clic data shard``; read in training by :mod:`clic.data.shard_stream`).

Format: a folder that MosaicML's ``StreamingDataset`` reads as it is (locally, or copied to any
remote it knows: ``s3://``, ``gs://``, ``oci://``, ``azure://``, ``hf://``, ``sftp://``, ``dbfs:``):
``index.json`` lists the ``.mds`` shards of every ``part-NNNNNN/`` folder, each part holding
``per_shard`` images (fewer in the last one, or where a source image was unreadable) in the
columns of :data:`COLUMNS` (the image as JPEG; ``sha256`` of the decoded source pixels as in the
prepared table; ``width``, ``height`` of the source). ``clic.json`` keeps the plan that wrote the
folder and the unreadable sources.

Writing is parallel over all cores (decode, hash, optional resize and encode in worker processes,
in bounded chunks, so memory stays flat: only the listing is held, about 0.4 KB per image), shows
a progress bar, and survives a kill: each part is written by MosaicML's ``MDSWriter`` into a
temporary folder renamed when complete, so a re-run keeps the complete parts and writes the rest
as an uninterrupted run would have (the images are dealt into parts in a seeded permutation of
the sorted listing, so a part mixes every source folder). The index is written last, atomically.

An index may come from anyone: only the columns of :data:`COLUMNS` are read (MosaicML refuses
pickled columns on its own), and a shard must be a relative path inside the corpus's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from clic import atomic
from clic.cores import die_with_parent, usable_cores
from clic.data.imageio import DEFAULT_MAX_PIXELS, ImageError, content_hash, load_rgb, resize_short
from clic.data.table import Record

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"  # MosaicML's
PLAN_NAME = "clic.json"
COLUMNS = {"jpg": "bytes", "name": "str", "source": "str", "sha256": "str", "width": "int", "height": "int"}
CHUNK = 32  # images per worker task
MAX_INDEX_BYTES = 64 * 2**20
# MosaicML holds ~75 bytes per sample of the corpus in every process (the spanner, the epoch's
# order, its shared arrays): 10**8 samples took 7.5 GB. 2 * 10**7 (ImageNet-21k is 1.4 * 10**7)
# bounds it at ~1.5 GB, checked before MosaicML allocates anything.
MAX_SAMPLES = 2 * 10**7
SHARD_BYTES = 1 << 26  # MDSWriter's default size limit of one .mds file
MAX_SAMPLE_BYTES = 1 << 26  # one stored image; a larger one is skipped as unreadable by the writer
MAX_SHARD_BYTES = SHARD_BYTES + MAX_SAMPLE_BYTES  # a shard the writer can write: what a reader accepts
# one sample of COLUMNS holds at least its offset, four variable-size lengths, two ints and a sha256
MIN_SAMPLE_BYTES = 4 + 4 * 4 + 2 * 8 + 64
SHARD_KEYS = {"column_encodings", "column_names", "column_sizes", "compression", "format", "hashes", "raw_data",
              "samples", "size_limit", "version", "zip_data"}


class CorpusError(ValueError):
    """A sharded corpus that cannot be read as planned, naming the corpus, the shard and the
    sample. Raised in a DataLoader worker, it reaches the caller with its own one-line message
    (torch re-raises a worker's exception with the worker's traceback as its text)."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            tail = message.rstrip().rsplit("\n", 1)[-1]  # "clic.data.shards.CorpusError: <the message>"
            message = tail.partition(f"{type(self).__name__}: ")[2] or message
        super().__init__(message)


def is_url(entry: str) -> bool:
    return "://" in entry or entry.startswith("dbfs:")


def is_shard_index(entry: str | Path) -> bool:
    """``entry`` names a sharded corpus: a URL, or a folder holding a MosaicML ``index.json`` (a
    JSON object of version 2 with a ``shards`` list). Another file of that name in an image folder
    is said, and the folder read as images."""
    if is_url(str(entry)):
        return True
    index = Path(entry) / INDEX_NAME
    if not index.is_file():
        return False
    try:
        with index.open("rb") as fh:
            raw = json.loads(fh.read(MAX_INDEX_BYTES + 1))
        mosaic = isinstance(raw, dict) and raw.get("version") == 2 and isinstance(raw.get("shards"), list)
    except (OSError, ValueError, RecursionError):
        mosaic = False
    if not mosaic:
        log.warning("%s is no MosaicML shard index: %s read as an image folder", index, entry)
    return mosaic


def _needs_streaming() -> Any:
    try:
        import streaming
    except ImportError as exc:  # the core runs without it; only sharded corpora need it
        raise ImportError("sharded corpora need MosaicML streaming: pip install -e '.[shards]'") from exc
    return streaming


# ------------------------------------------------------------------------------------ reading
def check_index(path: Path, where: str, local: bool = True) -> dict[str, Any]:
    """The MDS index at ``path`` (``where``: its name for messages), refused unless every shard
    is an uncompressed MDS file of exactly :data:`COLUMNS` at a relative path inside the index's
    folder, holding at most ``MAX_SAMPLES`` samples in all that its byte size can hold (MosaicML
    allocates per sample); ``local``: and there, of the size the index lists."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"over {MAX_INDEX_BYTES:,} bytes")
        raw = json.loads(path.read_bytes())
        shards = raw["shards"] if isinstance(raw, dict) and raw.get("version") == 2 else None
        if not isinstance(shards, list):
            raise ValueError("expected a MosaicML index: a JSON object with version 2 and a 'shards' list")
    except (OSError, ValueError, KeyError, RecursionError) as exc:
        raise ValueError(f"{where}: not a readable shard index ({str(exc)[:200]}); write one with clic data "
                         "shard") from None
    total, seen = 0, set()
    for i, shard in enumerate(shards):
        try:
            columns = dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
            sizes = dict(zip(shard["column_names"], shard["column_sizes"], strict=True))
            name, size, n = shard["raw_data"]["basename"], shard["raw_data"]["bytes"], shard["samples"]
            ok = (shard.keys() >= SHARD_KEYS and shard["format"] == "mds" and shard["version"] == 2
                  and columns == COLUMNS and not shard["zip_data"] and not shard["compression"]
                  and isinstance(shard["hashes"], list) and isinstance(shard["raw_data"].get("hashes", {}), dict)
                  and sizes == {k: 8 if v == "int" else None for k, v in COLUMNS.items()} and isinstance(name, str)
                  and type(size) is int and type(n) is int and n >= 0 and 4 * (n + 2) + (MIN_SAMPLE_BYTES - 4) * n
                  <= size <= MAX_SHARD_BYTES)
        except (KeyError, TypeError, ValueError, AttributeError):
            ok, name, size, n = False, "", 0, 0
        if not ok:
            raise CorpusError(f"{where}: shards[{i}] must be an uncompressed MDS shard with the columns {COLUMNS} "
                              f"and the keys {', '.join(sorted(SHARD_KEYS))}, an int 'samples' its 'raw_data' 'bytes' "
                              f"(at most {MAX_SHARD_BYTES:,}) can hold (as clic data shard writes)")
        if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
            raise CorpusError(f"{where}: shards[{i}]: {name[:80]!r} must be a path inside the index's folder "
                              "(no absolute paths, no '..')")
        if name in seen:  # its samples would be trained twice
            raise CorpusError(f"{where}: shards[{i}]: {name[:80]!r} is listed twice")
        seen.add(name)
        if local:
            check_shard_file(path.parent / name, n, size, where)
        total += n
    if not total:
        raise CorpusError(f"{where}: lists no samples; write the corpus with clic data shard")
    if total > MAX_SAMPLES:
        raise CorpusError(f"{where}: lists {total:,} samples, over the {MAX_SAMPLES:,} a corpus may hold here "
                          f"(MosaicML keeps ~75 bytes per sample in every process: {total * 75 / 1e9:.1f} GB each)")
    return raw


def check_shard_file(file: Path, samples: int, size: int, where: str) -> None:
    """Refuse an MDS shard file whose size or sample table differs from what its index (``where``)
    lists: ``samples``, then ``samples + 1`` increasing offsets from past that table (MDSWriter puts
    its column settings between) to the file's end, ``size`` bytes in all. Reads the table only."""
    try:
        with file.open("rb") as fh:
            found = os.fstat(fh.fileno()).st_size
            head = fh.read(4 * (samples + 2)) if found == size else b""
    except FileNotFoundError:
        raise CorpusError(f"{file}: missing, its index ({where}) lists it; write the corpus again (clic data shard)"
                          ) from None
    except OSError as exc:
        raise CorpusError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if found != size:
        raise CorpusError(f"{file}: {found:,} bytes, its index ({where}) lists {size:,} bytes; write the corpus "
                          "again (clic data shard)")
    table = np.frombuffer(head, np.uint32) if len(head) == 4 * (samples + 2) else np.zeros(0, np.uint32)
    if (len(table) != samples + 2 or int(table[0]) != samples or int(table[1]) < 4 * (samples + 2)
            or int(table[-1]) != size or bool(np.any(np.diff(table[1:].astype(np.int64)) <= 0))):
        held = int(table[0]) if len(table) else -1
        raise CorpusError(f"{file}: holds {held if held >= 0 else 'an unreadable number of'} samples with offsets "
                          f"that do not match its index ({where}: {samples} samples in {size:,} bytes); write the "
                          "corpus again (clic data shard)")


def cache_dir(entry: str, cache_root: str | Path) -> Path:
    """Where a remote corpus is cached locally (one folder per URL)."""
    return Path(cache_root) / "mds" / hashlib.sha256(entry.encode()).hexdigest()[:16]


def remote_and_local(entry: str | Path, cache_root: str | Path) -> tuple[str | None, Path]:
    """MosaicML's ``(remote, local)`` of a ``pretrain.data`` entry. A remote corpus's index is
    downloaded on every start and checked here, before MosaicML reads it; one that changed since
    it was cached empties the cache (its shards' names stay, their contents do not). ``file://``
    is a remote on a mounted file system (copied to the cache like any other)."""
    entry = str(entry)
    if not is_url(entry):
        check_index(Path(entry) / INDEX_NAME, f"{entry}/{INDEX_NAME}")
        return None, Path(entry)
    streaming = _needs_streaming()
    remote = entry.removeprefix("file://").rstrip("/")
    local = cache_dir(entry, cache_root)
    local.mkdir(parents=True, exist_ok=True)
    with atomic.lock(local, "refreshing the cached index of"):  # <local>.lock: one process per node at a time
        tmp = local / f".{INDEX_NAME}.{os.getpid()}.tmp"
        try:
            streaming.base.storage.CloudDownloader.direct_download(f"{remote}/{INDEX_NAME}", str(tmp), timeout=120)
        except Exception as exc:  # noqa: BLE001 - any client's failure (botocore, gcs, ...) is a bad remote
            tmp.unlink(missing_ok=True)
            raise CorpusError(f"{entry}: cannot read {INDEX_NAME} ({type(exc).__name__}: {str(exc)[:200]}); the "
                             "URL must be a folder written by clic data shard on a remote MosaicML streaming reads "
                             "(s3, gs, oci, azure, hf, sftp, dbfs) or file://") from None
        try:
            checked = check_index(tmp, f"{entry}/{INDEX_NAME}", local=False)
        except ValueError:
            tmp.unlink()
            raise
        index = local / INDEX_NAME
        if index.is_file() and index.read_bytes() != tmp.read_bytes():  # rewritten since: cached shards are stale
            log.warning("%s changed since it was cached in %s; emptying the cache", entry, local)
            for p in local.iterdir():
                if p != tmp:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        os.replace(tmp, index)
        for shard in checked["shards"]:  # a cached copy cut short or damaged: fetched again
            raw = shard["raw_data"]
            cached = local / raw["basename"]
            try:
                if cached.is_file():
                    check_shard_file(cached, shard["samples"], raw["bytes"], f"{entry}/{INDEX_NAME}")
            except CorpusError as exc:
                log.warning("%s; deleting the cached copy, to be fetched again", exc)
                cached.unlink()
    return remote, local


def local_corpus(entry: str | Path, cache_root: str | Path) -> Any:
    """A checked, fully local MosaicML ``LocalDataset`` of ``entry`` (a remote corpus is
    downloaded into its cache first): what the leak check reads."""
    streaming = _needs_streaming()
    remote, local = remote_and_local(entry, cache_root)
    if remote is not None:
        for shard in json.loads((local / INDEX_NAME).read_text())["shards"]:
            fetch_shard(remote, local, shard["raw_data"]["basename"], str(entry))
        check_index(local / INDEX_NAME, f"{entry}/{INDEX_NAME}")
    dataset = streaming.LocalDataset(str(local))
    for shard in dataset.shards:
        shard.validate(allow_unsafe_types=False)
    return dataset


def fetch_shard(remote: str, local: Path, name: str, entry: str, tries: int = 3) -> None:
    """Copy the shard ``name`` of the remote corpus ``entry`` into ``local`` (the whole file, renamed
    when complete), trying ``tries`` times; then a :class:`CorpusError` naming it."""
    streaming = _needs_streaming()
    target = local / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    for attempt in range(1, tries + 1):
        try:
            streaming.base.storage.CloudDownloader.direct_download(f"{remote}/{name}", str(tmp), 600)
            os.replace(tmp, target)
            return
        except Exception as exc:  # noqa: BLE001 - any client's failure (botocore, gcs, ...) names the shard
            tmp.unlink(missing_ok=True)
            if attempt == tries:
                raise CorpusError(f"{entry}: shard {name} cannot be fetched after {tries} tries "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from None
            log.warning("%s: fetching shard %s failed (%s), trying again", entry, name, type(exc).__name__)


def shard_records(entry: str | Path, label: str, cache_root: str | Path) -> list[Record]:
    """The images of a sharded corpus as unlabelled records (``path``: ``<entry>#<sample id>``)
    with the pixel hashes the writer recorded (the leak check hashes the content again)."""
    dataset = local_corpus(entry, cache_root)
    samples = (dataset[i] for i in range(len(dataset)))
    return [Record(f"{label}/{s['name']}", f"{dataset.local}#{i}", None, "unlabeled", s["source"], s["width"],
                   s["height"], s["sha256"]) for i, s in enumerate(samples)]


def is_shard_member(path: str) -> bool:
    """``path`` is a record of :func:`shard_records` (``<local folder>#<sample id>``)."""
    head, sep, key = path.rpartition("#")
    return bool(sep) and key.isdigit() and (Path(head) / INDEX_NAME).is_file()


def shard_jobs(folder: str) -> list[tuple[str, dict[str, Any], int]]:
    """One job per MDS shard of the local corpus ``folder`` (its index read once):
    ``(folder, the shard's index entry, the id of its first sample)``, for :func:`iter_samples`."""
    jobs, first = [], 0
    for info in json.loads((Path(folder) / INDEX_NAME).read_text())["shards"]:
        jobs.append((folder, info, first))
        first += info["samples"]
    return jobs


def iter_samples(job: tuple[str, dict[str, Any], int]) -> Iterator[tuple[int, bytes]]:
    """``(sample id, JPEG bytes)`` of every sample of one shard (a :func:`shard_jobs` job)."""
    _needs_streaming()
    from streaming.base.format import reader_from_json

    folder, info, first = job
    reader = reader_from_json(folder, None, info)
    for j in range(reader.samples):
        try:
            data = reader[j]["jpg"]
        except Exception as exc:  # noqa: BLE001 - lengths in the sample that lie
            raise CorpusError(f"{folder}: shard {info['raw_data']['basename']}, sample {first + j}: cannot be read "
                              f"({type(exc).__name__}: {str(exc)[:200]}); write the corpus again") from None
        yield first + j, data


# ------------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class ShardSummary:
    """What :func:`write_shards` did: ``images`` in ``parts``; ``written`` parts now (the others
    were complete already); ``unreadable`` source images skipped."""

    index: Path
    images: int
    parts: int
    written: int
    unreadable: int


def _encode(job: tuple[list[tuple[str, str, str]], int, int, int]) -> list[tuple[str, str, bytes, str, int, int]]:
    """Worker: ``(name, source, jpeg bytes, sha256 or error, width, height)`` per image."""
    items, side, quality, max_pixels = job
    out = []
    for name, path, source in items:
        try:
            img = load_rgb(path, max_pixels)
            digest, (w, h) = content_hash(img), img.size
            shrink = bool(side) and min(w, h) > side
            if shrink:
                img = resize_short(img, side)
            buf = io.BytesIO()
            if shrink or not _is_plain_jpeg(path):  # else stored as is: no second lossy encoding
                img.save(buf, format="JPEG", quality=quality)
            data = buf.getvalue() or Path(path).read_bytes()
            if len(data) > MAX_SAMPLE_BYTES:
                raise ImageError(f"{path}: {len(data):,} bytes as JPEG, over the {MAX_SAMPLE_BYTES:,} a sample "
                                 "may hold (--side downsizes it)")
            out.append((name, source, data, digest, w, h))
        except (ImageError, OSError) as exc:
            out.append((name, source, b"", str(exc), 0, 0))
    return out


def _is_plain_jpeg(path: str) -> bool:
    """A baseline-decodable RGB JPEG without an EXIF rotation (its bytes decode to what load_rgb gives)."""
    with Image.open(path) as img:
        return img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1


def shard_plan(records: Sequence[Record], seed: int) -> list[tuple[str, str, str]]:
    """``(name, path, source)`` in the written order: a seeded permutation of the listing. Names
    that are not UTF-8 (a latin-1 file name) are stored with backslash escapes (``caf\\xe9.jpg``)."""
    items = [(_utf8(r.name), r.path, _utf8(r.category)) for r in records]
    random.Random(seed).shuffle(items)
    return items


def write_shards(records: Sequence[Record], out: str | Path, per_shard: int = 1000, side: int = 0,
                 quality: int = 90, seed: int = 0, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, force: bool = False, progress: bool = True,
                 inputs: Sequence[str | Path] = (), min_side: int = 1) -> ShardSummary:
    """Write ``records`` (from :func:`clic.data.corpus.corpus_records`) as MDS shards into ``out``.

    ``side``: images with a longer short side are downsized to it (0: keep; JPEGs are then stored
    byte for byte, other formats encoded at ``quality``; else at least ``min_side``). ``out`` must
    be new, empty or a corpus folder this command wrote, and not be, hold or lie inside one of
    ``inputs`` (:func:`clic.atomic.check_output`). A corpus folder holding shards of a different
    listing or settings is refused unless ``force`` (which deletes its shards first). A listing in
    which no image is readable writes no index and fails.
    """
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in [1, 100], got {quality}")
    if side < 0 or 0 < side < min_side:
        raise ValueError(f"--side must be 0 (keep the size) or at least {min_side} pixels (data.min_size), got {side}")
    if not records:
        raise ValueError(f"{out}: nothing to shard: the entries list no images")
    streaming = _needs_streaming()
    out = Path(out)
    items = shard_plan(records, seed)
    # a corpus folder written before folders were marked holds clic.json: all of it is ours
    legacy = [e.name for e in out.iterdir()] if (out / PLAN_NAME).is_file() else ()
    atomic.check_output(out, inputs, legacy)
    atomic.mark(out, "clic data shard")
    with atomic.lock(out / ".writer", "writing shards into"):  # one writer per folder (out/.writer.lock)
        n_parts = -(-len(items) // per_shard)
        _claim(out, _plan_signature(items, per_shard, side, quality, seed), force)
        todo = [i for i in range(n_parts) if not (out / _part(i)).is_dir()]
        log.info("sharding %d images into %d parts of %d in %s (%d complete already)", len(items), n_parts,
                 per_shard, out, n_parts - len(todo))
        workers = workers or usable_cores()
        remaining = sum(len(items[i * per_shard:(i + 1) * per_shard]) for i in todo)
        with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool, \
                tqdm(total=len(items), initial=len(items) - remaining, desc="shard", unit="img",
                     disable=None if progress else True, smoothing=0.05) as bar:
            writer, unreadable = None, []  # type: Any, list[list[str]]
            for part, last, future in _encoded_chunks(items, todo, per_shard, pool, (side, quality, max_pixels),
                                                      4 * workers):
                if writer is None:
                    tmp = out / f".{_part(part)}.{os.getpid()}.tmp"
                    writer, unreadable = streaming.MDSWriter(out=str(tmp), columns=COLUMNS, size_limit=SHARD_BYTES,
                                                             progress_bar=False), []
                for name, source, data, digest, w, h in future.result():
                    if data:
                        writer.write({"jpg": data, "name": name, "source": source, "sha256": digest, "width": w,
                                      "height": h})
                    else:
                        unreadable.append([name, digest])
                    bar.update()
                if last:
                    writer.finish()
                    atomic.write_text(tmp / "unreadable.json", json.dumps(unreadable) + "\n")
                    os.replace(tmp, out / _part(part))
                    writer = None
        return _write_index(out, n_parts, per_shard, side, seed, len(todo))


def _write_index(out: Path, n_parts: int, per_shard: int, side: int, seed: int, written: int) -> ShardSummary:
    """The parts' MosaicML indexes merged into ``out/index.json`` (shard paths prefixed by their
    part), atomically. Not MosaicML's ``merge_index`` (0.10.0), which writes the same index for a
    plain path, but parses a local path as a URL (under a folder ``run#2/`` every shard is named
    after the wrong folder), cannot replace an index (a re-run), and moves its result in from the
    system's temporary folder (a copy, not atomic, across file systems)."""
    shards, skipped = [], []
    for i in range(n_parts):
        for shard in json.loads((out / _part(i) / INDEX_NAME).read_text())["shards"]:
            shard["raw_data"]["basename"] = f"{_part(i)}/{shard['raw_data']['basename']}"
            shards.append(shard)
        skipped += json.loads((out / _part(i) / "unreadable.json").read_text())
    total = sum(s["samples"] for s in shards)
    if not total:
        shown = "; ".join(f"{name}: {err}" for name, err in skipped[:3])
        raise ValueError(f"{out}: none of the {len(skipped)} images is readable, no index written ({shown})")
    atomic.write_text(out / INDEX_NAME, json.dumps({"version": 2, "shards": shards}, indent=1) + "\n")
    plan = json.loads((out / PLAN_NAME).read_text())
    plan.update(total=total, per_shard=per_shard, side=side, seed=seed, unreadable=skipped)
    atomic.write_text(out / PLAN_NAME, json.dumps(plan, indent=1) + "\n")
    for name, err in skipped[:20]:
        log.warning("unreadable corpus image %s skipped: %s", name, err)
    return ShardSummary(out / INDEX_NAME, total, n_parts, written, len(skipped))


def _encoded_chunks(items: Sequence[tuple[str, str, str]], parts: Sequence[int], per_shard: int,
                    pool: ProcessPoolExecutor, settings: tuple[int, int, int],
                    limit: int) -> Iterator[tuple[int, bool, Future]]:
    """``(part, last chunk of the part, future of its :func:`_encode`)`` for each chunk of ``CHUNK``
    images of ``parts``, in order, with at most ``limit`` chunks in flight (flat memory)."""
    pending: deque[tuple[int, bool, Future]] = deque()
    for i in parts:
        members = items[i * per_shard:(i + 1) * per_shard]
        for s in range(0, len(members), CHUNK):
            chunk = list(members[s:s + CHUNK])
            pending.append((i, s + CHUNK >= len(members), pool.submit(_encode, (chunk, *settings))))
            if len(pending) >= limit:
                yield pending.popleft()
    while pending:
        yield pending.popleft()


def _utf8(text: str) -> str:
    """``text`` as valid UTF-8: bytes a file name held that are not (surrogate escapes) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _part(i: int) -> str:
    return f"part-{i:06d}"


def _plan_signature(items: Sequence[tuple[str, str, str]], per_shard: int, side: int, quality: int,
                    seed: int) -> str:
    digest = hashlib.sha256(f"mds:1:{per_shard}:{side}:{quality}:{seed}\n".encode())
    for name, path, source in items:
        digest.update(f"{name}\t{path}\t{source}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _claim(out: Path, plan: str, force: bool) -> None:
    """Make ``out`` the home of ``plan``'s shards: refuse another plan's shards (unless ``force``),
    drop temporary folders of killed runs."""
    plan_file = out / PLAN_NAME
    theirs = json.loads(plan_file.read_text()).get("plan") if plan_file.is_file() else None
    if theirs is None and any(out.glob("part-*")) or theirs not in (None, plan):
        if not force:
            raise ValueError(f"{out} holds shards of a different listing or settings ({plan_file}); "
                             "use a new folder, or --force to delete them and start over")
        for p in out.glob("part-*"):
            shutil.rmtree(p)
        (out / INDEX_NAME).unlink(missing_ok=True)
    for tmp in out.glob(".part-*.tmp"):  # a killed run's unfinished part
        shutil.rmtree(tmp)
    if theirs != plan:
        atomic.write_text(plan_file, json.dumps({"plan": plan}) + "\n")
