"""A pretraining corpus as tar shards, for corpora beyond one disk (``clic data shard``).

Format (webdataset-compatible): ``shard-NNNNNN.tar`` files whose members come in pairs
``<key>.jpg`` (the image, JPEG) and ``<key>.json`` (``name``, ``source``, ``sha256`` of the decoded
source pixels as in the prepared table, ``width``, ``height`` of the source), ``per_shard`` pairs per
shard (fewer in the last one, or where a source image was unreadable); keys are the image's position
in the written order, zero-padded. Next to each shard, ``shard-NNNNNN.json`` summarises it (count,
members' metadata, unreadable sources), so a corpus can be listed and leak-checked without reading
the shards. ``index.shards.json`` lists the shards with their counts:

    {"format": "clic-shards", "version": 1, "total": N, "shards": [{"url": "shard-000000.tar", "count": n}, ...]}

Shard URLs are relative to the index (or absolute: paths, ``http(s)://``, any ``fsspec`` URL such as
``s3://`` with its package installed, or ``pipe:COMMAND`` whose standard output is the tar stream).

Writing is parallel over all cores (decode, hash, optional resize and encode in worker processes,
in bounded chunks, so memory stays flat in the number of decoded images: only the listing is
held, about 0.4 KB per image), shows a progress bar with ETA, and survives a kill: each shard is written to a
temporary file and renamed when complete, so a re-run skips the complete shards and rewrites
the rest byte for byte as an uninterrupted run would have (the images are dealt into shards in
a seeded permutation of the sorted listing, so a shard mixes every source folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

from PIL import Image
from tqdm import tqdm

from clic import atomic
from clic.cores import die_with_parent, usable_cores
from clic.data.imageio import DEFAULT_MAX_PIXELS, ImageError, content_hash, load_rgb, resize_short
from clic.data.table import Record

log = logging.getLogger(__name__)

INDEX_NAME = "index.shards.json"
INDEX_SUFFIX = ".shards.json"
PLAN_NAME = "plan.json"
FORMAT, VERSION = "clic-shards", 1
CHUNK = 32  # images per worker task
MAX_MEMBER_BYTES = 64 * 2**20  # a shard member (one JPEG or its metadata) larger than this is refused
MAX_SUMMARY_BYTES = 64 * 2**20
RETRIES = 3  # attempts at a remote shard before its fault is reported


# ------------------------------------------------------------------------------------ reading
def is_url(entry: str) -> bool:
    return entry.startswith("pipe:") or "://" in entry


def _read_json(fh: IO[bytes]) -> Any:
    """An index or summary as JSON, read up to ``MAX_SUMMARY_BYTES``: a larger one fails to parse
    (refused by the caller with its name), and is never read whole."""
    return json.loads(fh.read(MAX_SUMMARY_BYTES + 1)[:MAX_SUMMARY_BYTES])


def is_shard_member(path: str) -> bool:
    """``path`` is a record of :func:`shard_records` (``<shard URL>#<key>``)."""
    head, sep, key = path.rpartition("#")
    return bool(sep) and head.endswith(".tar") and key.isdigit()


def is_shard_index(entry: str | Path) -> bool:
    """``entry`` names a shard index: a ``*.shards.json`` file or URL, or a folder holding one."""
    text = str(entry)
    if text.endswith(INDEX_SUFFIX):
        return True
    return not is_url(text) and (Path(text) / INDEX_NAME).is_file()


def index_location(entry: str | Path) -> str:
    text = str(entry)
    return text if text.endswith(INDEX_SUFFIX) else str(Path(text) / INDEX_NAME)


@contextlib.contextmanager
def open_url(url: str) -> Iterator[IO[bytes]]:
    """A readable binary stream of a local path, ``file://``, ``http(s)://``, ``pipe:COMMAND``
    (webdataset's convention, e.g. ``pipe:aws s3 cp s3://bucket/shard-000000.tar -``) or any other
    ``scheme://`` URL through fsspec (``s3://`` needs ``s3fs``, ``gs://`` needs ``gcsfs``)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (the user's command)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            if proc.wait() not in (0, -13):  # -13: SIGPIPE when we stopped reading early
                raise OSError(f"{url}: command exited with status {proc.returncode}")
    elif url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=120) as fh:  # noqa: S310 (http(s) only)
            yield fh
    elif url.startswith("file://"):
        with open(urllib.parse.urlparse(url).path, "rb") as fh:
            yield fh
    elif "://" in url:
        try:
            import fsspec  # a torch dependency; the protocol's own package (s3fs, gcsfs) is the user's
        except ImportError as exc:
            raise OSError(f"{url}: reading this URL needs fsspec (pip install fsspec and its protocol package)") \
                from exc
        with fsspec.open(url, "rb") as fh:
            yield fh
    else:
        with open(url, "rb") as fh:
            yield fh


def _safe_shard_url(url: str, where: str) -> str:
    """A shard URL as an index may list it: a relative path inside the index's folder, or an
    ``http(s)://`` or storage (``s3://``, ``gs://``) URL. Never a command (``pipe:``), a local
    file outside the index's folder (absolute, ``..``, ``file://``): an index may come from anyone."""
    if url.startswith("pipe:"):
        raise ValueError(f"{where}: {url[:80]!r} is a shell command; an index never runs one (a pipe may only be "
                         "the index location in your own params: pretrain.data)")
    if "://" in url:
        if url.startswith("file://"):
            raise ValueError(f"{where}: {url[:80]!r}: a file:// URL in an index is refused; list shards relative "
                             "to the index")
        return url
    if os.path.isabs(url) or ".." in Path(url).parts or not url.endswith(".tar"):
        raise ValueError(f"{where}: {url[:80]!r} must be a .tar path relative to the index's folder (no absolute "
                         "paths, no '..') or an http(s)/storage URL")
    return url


def join_url(base: str, rel: str) -> str:
    """``rel`` (a shard URL from an index) relative to the index at ``base``."""
    if is_url(rel) or os.path.isabs(rel):
        return rel
    if is_url(base):
        return base.rsplit("/", 1)[0] + "/" + rel
    return str(Path(base).parent / rel)


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """Shards (absolute URLs) and their sample counts, in index order (one or several indexes
    concatenated); ``offsets[i]``: the id of shard i's first sample (ids run 0..total-1)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sources: tuple[str, ...] = ()  # the index that lists each shard (for messages)

    def where(self, k: int) -> str:
        """Shard ``k`` and the index that lists it, for an error message."""
        return f"{self.urls[k]} (listed in {self.sources[k]})" if self.sources else self.urls[k]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for c in self.counts:
            out.append(at)
            at += c
        return tuple(out)

    @classmethod
    def load(cls, entries: Sequence[str | Path]) -> ShardIndex:
        """Read and validate the indexes ``entries`` (files, folders or URLs), concatenated."""
        urls: list[str] = []
        counts: list[int] = []
        sources: list[str] = []
        for entry in entries:
            where = index_location(entry)
            try:
                with open_url(where) as fh:
                    raw = _read_json(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{where}: cannot read the shard index ({exc})") from exc
            if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("shards"), list):
                raise ValueError(f"{where}: not a shard index (expected a JSON object with format {FORMAT!r} "
                                 "and a 'shards' list, as written by clic data shard)")
            for i, shard in enumerate(raw["shards"]):
                if (not isinstance(shard, dict) or not isinstance(shard.get("url"), str)
                        or not isinstance(shard.get("count"), int) or shard["count"] < 0):
                    raise ValueError(f"{where}: shards[{i}] must be {{'url': str, 'count': int >= 0}}, "
                                     f"got {str(shard)[:200]}")
                url = _safe_shard_url(shard["url"], f"{where}: shards[{i}]")
                full = join_url(where, url)
                if full in urls:
                    raise ValueError(f"{where}: shards[{i}] lists {url} a second time (each sample would be "
                                     "trained on twice an epoch)")
                urls.append(full)
                counts.append(shard["count"])
                sources.append(where)
        index = cls(tuple(urls), tuple(counts), tuple(sources))
        if index.total == 0:
            raise ValueError(f"{', '.join(map(str, entries))}: the shard index lists no images")
        return index


def check_summaries(index: ShardIndex) -> None:
    """Each shard's summary (written beside it) against the index's count, before any training: a
    count that disagrees would drop samples or end an epoch early. The shards' contents are
    checked as they stream (:func:`iter_shard` with ``expected``)."""
    for k, url in enumerate(index.urls):
        where = summary_url(url)
        try:
            with open_url(where) as fh:
                count = _read_json(fh)["count"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index.where(k)}: cannot read its summary {where} ({exc}); rewrite the shards "
                             "with clic data shard") from None
        if count != index.counts[k]:
            raise ValueError(f"{index.where(k)}: its summary counts {count} samples, the index {index.counts[k]}; "
                             "rewrite the shards (clic data shard) or fix the index")


def summary_url(shard_url: str) -> str:
    """The per-shard summary (``shard-NNNNNN.json``) next to a shard (``.tar``), also in a pipe command."""
    head, sep, tail = shard_url.rpartition(".tar")
    if not sep:
        raise ValueError(f"{shard_url}: a shard URL must name a .tar file")
    return f"{head}.json{tail}"


def shard_records(entry: str | Path, label: str) -> list[Record]:
    """The images of a shard index as unlabelled records, with their source pixel hashes, read
    from the small per-shard summaries (the shards themselves are not read): the leak check of
    :mod:`clic.data.corpus` works on a sharded corpus. ``path`` is ``<shard URL>#<key>``."""
    index = ShardIndex.load([entry])
    out = []
    for url in index.urls:
        where = summary_url(url)
        try:
            with open_url(where) as fh:
                samples = _read_json(fh)["samples"]
            out += [Record(f"{label}/{name}", f"{url}#{key}", None, "unlabeled", source, int(w), int(h), digest)
                    for key, name, source, digest, w, h in samples]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: cannot read the shard summary ({exc}); rewrite the shards with "
                             "clic data shard") from exc
    return out


def iter_shard(url: str, where: str = "", expected: int | None = None,
               start: int = 0) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """``(key, jpeg bytes, metadata)`` of each sample of one shard from sample ``start`` on, in
    member order. A remote shard that fails mid-transfer is read again (``RETRIES`` attempts,
    1-2-4 s apart) from the sample it stopped at; a fault that stays, a member over
    ``MAX_MEMBER_BYTES``, or a sample count other than ``expected`` is a ``ValueError`` naming the
    shard (``where``: the shard and its index)."""
    where = where or url
    remote = "://" in url and not url.startswith("file://")
    done, attempt = start, 0
    while True:
        try:
            for m, sample in enumerate(_members(url, where), start=0):
                if m < done:
                    continue
                if expected is not None and m >= expected:
                    raise ValueError(f"{where}: holds more than the {expected} samples its index says; rewrite the "
                                     "shards (clic data shard) or fix the index")
                done = m + 1
                yield sample
            if remote and expected is not None and done < expected:  # a dropped connection can end a tar stream
                raise EOFError(f"the stream ended after {done} of {expected} samples")
            break
        except (OSError, EOFError, tarfile.TarError, json.JSONDecodeError) as exc:
            attempt += 1
            if not remote or attempt >= RETRIES:
                raise ValueError(f"{where}: cannot read the shard ({type(exc).__name__}: {str(exc)[:200]})"
                                 + (f" after {attempt} attempts" if remote else "")) from None
            log.warning("%s: %s; reading it again from sample %d (attempt %d of %d)", where, exc, done, attempt + 1,
                        RETRIES)
            time.sleep(2 ** (attempt - 1))
    if expected is not None and done < expected:
        raise ValueError(f"{where}: holds {done} samples, its index says {expected}; rewrite the shards "
                         "(clic data shard) or fix the index")


def _members(url: str, where: str) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    with open_url(url) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        key, image, meta = "", b"", None
        for member in tar:
            if not member.isfile():
                continue
            if member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{where}: member {member.name[:80]} holds {member.size:,} bytes, over the "
                                 f"{MAX_MEMBER_BYTES:,}-byte limit of a shard sample")
            stem, _, ext = member.name.rpartition(".")
            data = tar.extractfile(member)
            payload = data.read() if data is not None else b""
            if stem != key:
                key, image, meta = stem, b"", None
            if ext == "jpg":
                image = payload
            elif ext == "json":
                meta = json.loads(payload)
                if not isinstance(meta, dict):
                    raise ValueError(f"{where}: member {member.name[:80]} is not a JSON object")
            if image and meta is not None:
                yield key, image, meta
                key, image, meta = "", b"", None


# ------------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class ShardSummary:
    """What :func:`write_shards` did: ``images`` in ``shards``; ``written`` shards now (the
    others were complete already); ``unreadable`` source images skipped."""

    index: Path
    images: int
    shards: int
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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical bytes on a re-run
    tar.addfile(info, io.BytesIO(data))


def shard_plan(records: Sequence[Record], per_shard: int, seed: int) -> list[tuple[str, str, str]]:
    """``(name, path, source)`` in the written order: a seeded permutation of the listing."""
    items = [(r.name, r.path, r.category) for r in records]
    random.Random(seed).shuffle(items)
    return items


def write_shards(records: Sequence[Record], out: str | Path, per_shard: int = 1000, side: int = 0,
                 quality: int = 90, seed: int = 0, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, force: bool = False, progress: bool = True) -> ShardSummary:
    """Write ``records`` (from :func:`clic.data.corpus.corpus_records`) as shards into ``out``.

    ``side``: images with a longer short side are downsized to it (0: keep; JPEGs are then stored
    byte for byte, other formats encoded at ``quality``). A folder holding shards of a different
    listing or settings is refused unless ``force`` (which deletes its shards first).
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    out = Path(out)
    items = shard_plan(records, per_shard, seed)
    out.mkdir(parents=True, exist_ok=True)
    with atomic.lock(out / ".writer", "writing shards into"):  # one writer per folder (out/.writer.lock)
        return _write(items, out, per_shard, side, quality, seed, workers, max_pixels, force, progress)


def _write(items: list[tuple[str, str, str]], out: Path, per_shard: int, side: int, quality: int, seed: int,
           workers: int | None, max_pixels: int, force: bool, progress: bool) -> ShardSummary:
    n_shards = -(-len(items) // per_shard)
    plan = _plan_signature(items, per_shard, side, quality, seed)
    _claim(out, plan, force)
    done = {i for i in range(n_shards) if (out / _shard_name(i)).is_file()}
    todo = [i for i in range(n_shards) if i not in done]
    log.info("sharding %d images into %d shards of %d in %s (%d complete already)", len(items), n_shards,
             per_shard, out, len(done))
    workers = workers or usable_cores()
    remaining = sum(len(items[i * per_shard:(i + 1) * per_shard]) for i in todo)
    with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool, \
            tqdm(total=len(items), initial=len(items) - remaining, desc="shard", unit="img",
                 disable=None if progress else True, smoothing=0.05) as bar:
        pending: deque[tuple[int, bool, Future]] = deque()  # (shard, last chunk of it, result)
        writer: _ShardWriter | None = None
        for shard, last, future in _bounded(_chunks(items, todo, per_shard), pending, pool, side, quality,
                                            max_pixels, 4 * workers):
            if writer is None:
                writer = _ShardWriter(out, shard, per_shard)
            for name, source, data, digest, w, h in future.result():
                writer.add(name, source, data, digest, w, h)
                bar.update()
            if last:
                writer.close()
                writer = None
    shards, skipped = [], []
    for i in range(n_shards):
        summary = json.loads((out / _meta_name(i)).read_text())
        shards.append({"url": _shard_name(i), "count": summary["count"]})
        skipped += summary["unreadable"]
    unreadable = len(skipped)
    index = {"format": FORMAT, "version": VERSION, "total": sum(s["count"] for s in shards), "per_shard": per_shard,
             "side": side, "seed": seed, "unreadable": unreadable, "shards": shards}
    atomic.write_text(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    for name, err in skipped[:20]:
        log.warning("unreadable corpus image %s skipped: %s", name, err)
    return ShardSummary(out / INDEX_NAME, index["total"], n_shards, len(todo), unreadable)


def _chunks(items: Sequence[tuple[str, str, str]], shards: Sequence[int],
            per_shard: int) -> Iterator[tuple[int, bool, list[tuple[str, str, str]]]]:
    """``(shard, last chunk of the shard, items)`` for each chunk of ``CHUNK`` images of ``shards``."""
    for i in shards:
        members = items[i * per_shard:(i + 1) * per_shard]
        for s in range(0, len(members), CHUNK):
            yield i, s + CHUNK >= len(members), list(members[s:s + CHUNK])


def _bounded(jobs: Iterator[tuple[int, bool, list]], pending: deque, pool: ProcessPoolExecutor, side: int,
             quality: int, max_pixels: int, limit: int) -> Iterator[tuple[int, bool, Future]]:
    """Submit ``jobs`` keeping at most ``limit`` in flight; yield them in order as they finish
    (flat memory: the results of at most ``limit`` chunks exist at once)."""
    for shard, last, chunk in jobs:
        pending.append((shard, last, pool.submit(_encode, (chunk, side, quality, max_pixels))))
        if len(pending) >= limit:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class _ShardWriter:
    """One shard being written to a temporary file; :meth:`close` publishes it atomically
    (its ``.json`` summary first, then the ``.tar``: a shard is complete when its tar exists)."""

    def __init__(self, out: Path, shard: int, per_shard: int) -> None:
        self.out, self.shard, self.per_shard = out, shard, per_shard
        self.tmp = out / f".{_shard_name(shard)}.{os.getpid()}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (see close)
        self.seen, self.count = 0, 0
        self.unreadable: list[tuple[str, str]] = []
        self.samples: list[list] = []  # the members' metadata, readable without the shard

    def add(self, name: str, source: str, data: bytes, digest: str, w: int, h: int) -> None:
        key = f"{self.shard * self.per_shard + self.seen:09d}"
        self.seen += 1
        if not data:
            self.unreadable.append((name, digest))
            return
        meta = {"name": name, "source": source, "sha256": digest, "width": w, "height": h}
        _add(self.tar, f"{key}.jpg", data)
        _add(self.tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.samples.append([key, name, source, digest, w, h])
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        summary = {"count": self.count, "unreadable": self.unreadable, "samples": self.samples}
        atomic.write_text(self.out / _meta_name(self.shard), json.dumps(summary) + "\n")
        os.replace(self.tmp, self.out / _shard_name(self.shard))


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _meta_name(i: int) -> str:
    return f"shard-{i:06d}.json"


def _plan_signature(items: Sequence[tuple[str, str, str]], per_shard: int, side: int, quality: int,
                    seed: int) -> str:
    digest = hashlib.sha256(f"{FORMAT}:{VERSION}:{per_shard}:{side}:{quality}:{seed}\n".encode())
    for name, path, source in items:
        digest.update(f"{name}\t{path}\t{source}\n".encode())
    return digest.hexdigest()


def _claim(out: Path, plan: str, force: bool) -> None:
    """Make ``out`` the home of ``plan``'s shards: refuse another plan's shards (unless ``force``),
    drop temporary files of killed runs."""
    plan_file = out / PLAN_NAME
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("plan") != plan:
        if not force:
            raise ValueError(f"{out} holds shards of a different listing or settings ({plan_file}); "
                             "use a new folder, or --force to delete them and start over")
        for p in out.glob("shard-*"):
            p.unlink()
        (out / INDEX_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".shard-*.tmp"):  # a killed run's unfinished shard
        tmp.unlink()
    if not plan_file.is_file() or json.loads(plan_file.read_text()).get("plan") != plan:
        atomic.write_text(plan_file, json.dumps({"plan": plan}) + "\n")
