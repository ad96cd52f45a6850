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
MAX_SAMPLES = 10**9  # MosaicML holds a few int64 arrays of the corpus's sample count per process
SHARD_BYTES = 1 << 26  # MDSWriter's default size limit of one .mds file


def is_url(entry: str) -> bool:
    return "://" in entry or entry.startswith("dbfs:")


def is_shard_index(entry: str | Path) -> bool:
    """``entry`` names a sharded corpus: a URL, or a folder holding an ``index.json``."""
    return is_url(str(entry)) or (Path(entry) / INDEX_NAME).is_file()


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
    total = 0
    for i, shard in enumerate(shards):
        try:
            columns = dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
            sizes = dict(zip(shard["column_names"], shard["column_sizes"], strict=True))
            name, size, n = shard["raw_data"]["basename"], shard["raw_data"]["bytes"], shard["samples"]
            ok = (shard["format"] == "mds" and columns == COLUMNS and not shard["zip_data"]
                  and sizes == {k: 8 if v == "int" else None for k, v in COLUMNS.items()} and isinstance(name, str)
                  and type(size) is int and type(n) is int and 0 <= 4 * (n + 2) <= size)
        except (KeyError, TypeError, ValueError):
            ok, name, size, n = False, "", 0, 0
        if not ok:
            raise ValueError(f"{where}: shards[{i}] must be an uncompressed MDS shard with the columns {COLUMNS}, "
                             "an int 'samples' its 'raw_data' 'bytes' can hold (as clic data shard writes)")
        if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
            raise ValueError(f"{where}: shards[{i}]: {name[:80]!r} must be a path inside the index's folder "
                             "(no absolute paths, no '..')")
        file = path.parent / name
        if local and (not file.is_file() or file.stat().st_size != size):
            found = f"{file.stat().st_size:,} bytes" if file.is_file() else "missing"
            raise ValueError(f"{file}: {found}, its index ({where}) lists {size:,} bytes; write the corpus "
                             "again (clic data shard)")
        total += n
    if total > MAX_SAMPLES:
        raise ValueError(f"{where}: lists {total:,} samples, over the {MAX_SAMPLES:,} a corpus may hold here")
    return raw


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
        except (OSError, ValueError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{entry}: cannot read {INDEX_NAME} ({type(exc).__name__}: {str(exc)[:200]}); the "
                             "URL must be a folder written by clic data shard on a remote MosaicML streaming reads "
                             "(s3, gs, oci, azure, hf, sftp, dbfs) or file://") from None
        try:
            check_index(tmp, f"{entry}/{INDEX_NAME}", local=False)
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
    return remote, local


def local_corpus(entry: str | Path, cache_root: str | Path) -> Any:
    """A checked, fully local MosaicML ``LocalDataset`` of ``entry`` (a remote corpus is
    downloaded into its cache first): what the leak check reads."""
    streaming = _needs_streaming()
    remote, local = remote_and_local(entry, cache_root)
    if remote is not None:
        for shard in json.loads((local / INDEX_NAME).read_text())["shards"]:
            name = shard["raw_data"]["basename"]
            streaming.base.storage.CloudDownloader.direct_download(f"{remote}/{name}", str(local / name), 600)
        check_index(local / INDEX_NAME, f"{entry}/{INDEX_NAME}")
    dataset = streaming.LocalDataset(str(local))
    for shard in dataset.shards:
        shard.validate(allow_unsafe_types=False)
    return dataset


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
        yield first + j, reader[j]["jpg"]


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
            if side and min(w, h) > side:
                img = resize_short(img, side)
            elif _is_plain_jpeg(path):  # stored as is: no second lossy encoding
                out.append((name, source, Path(path).read_bytes(), digest, w, h))
                continue
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            out.append((name, source, buf.getvalue(), digest, w, h))
        except (ImageError, OSError) as exc:
            out.append((name, source, b"", str(exc), 0, 0))
    return out


def _is_plain_jpeg(path: str) -> bool:
    """A baseline-decodable RGB JPEG without an EXIF rotation (its bytes decode to what load_rgb gives)."""
    with Image.open(path) as img:
        return img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1


def shard_plan(records: Sequence[Record], seed: int) -> list[tuple[str, str, str]]:
    """``(name, path, source)`` in the written order: a seeded permutation of the listing."""
    items = [(r.name, r.path, r.category) for r in records]
    random.Random(seed).shuffle(items)
    return items


def write_shards(records: Sequence[Record], out: str | Path, per_shard: int = 1000, side: int = 0,
                 quality: int = 90, seed: int = 0, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, force: bool = False, progress: bool = True) -> ShardSummary:
    """Write ``records`` (from :func:`clic.data.corpus.corpus_records`) as MDS shards into ``out``.

    ``side``: images with a longer short side are downsized to it (0: keep; JPEGs are then stored
    byte for byte, other formats encoded at ``quality``). A folder holding shards of a different
    listing or settings is refused unless ``force`` (which deletes its shards first).
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    streaming = _needs_streaming()
    out = Path(out)
    items = shard_plan(records, seed)
    out.mkdir(parents=True, exist_ok=True)
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
    part; what ``streaming.base.util.merge_index`` writes, but atomically)."""
    shards, skipped = [], []
    for i in range(n_parts):
        for shard in json.loads((out / _part(i) / INDEX_NAME).read_text())["shards"]:
            shard["raw_data"]["basename"] = f"{_part(i)}/{shard['raw_data']['basename']}"
            shards.append(shard)
        skipped += json.loads((out / _part(i) / "unreadable.json").read_text())
    atomic.write_text(out / INDEX_NAME, json.dumps({"version": 2, "shards": shards}, indent=1) + "\n")
    total = sum(s["samples"] for s in shards)
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


def _part(i: int) -> str:
    return f"part-{i:06d}"


def _plan_signature(items: Sequence[tuple[str, str, str]], per_shard: int, side: int, quality: int,
                    seed: int) -> str:
    digest = hashlib.sha256(f"mds:1:{per_shard}:{side}:{quality}:{seed}\n".encode())
    for name, path, source in items:
        digest.update(f"{name}\t{path}\t{source}\n".encode())
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
