"""The pretraining corpus: unlabelled images kept apart from the evaluation data.

The papers pretrain on large unlabelled collections (CLIC: ~1M ImageNet + Flickr images) and
evaluate on IC9600. :func:`corpus_records` lists ``pretrain.data`` (image folders, archives,
prepared datasets, sharded corpora) as paths the loader decodes one per sample, so a corpus may be
any size; :func:`corpus_hashes` and :func:`leaks` name the evaluation images whose pixels, or a
resized or re-encoded copy of them, are also in the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clic import atomic
from clic.cores import die_with_parent, usable_cores
from clic.data.archive import ARCHIVE_SUFFIXES, MAX_RATIO, archive_suffix, extracted, is_archive
from clic.data.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageError,
    content_hash,
    decode_bytes,
    hamming,
    is_image_file,
    load_rgb,
    perceptual_hash,
)
from clic.data.shards import is_shard_index, is_shard_member, iter_samples, shard_jobs, shard_records
from clic.data.table import Record, read_table, resolve

log = logging.getLogger(__name__)

CORPUS_DIR = "data/corpus"  # extracted archives and the hash index (outside DVC's outputs)
INDEX_NAME = "hashes.jsonl"


def corpus_records(paths: Sequence[str | Path], work_dir: str | Path = CORPUS_DIR,
                   max_archive_bytes: int = 64 * 2**30, max_member_bytes: int = 2**30,
                   max_archive_ratio: float = MAX_RATIO) -> list[Record]:
    """The images of every ``pretrain.data`` entry as unlabelled records (absolute paths).

    Names are ``<entry>/<path inside the entry>`` with ``<entry>`` the entry's folder or archive
    name (``~i`` appended when two entries share one), so they are unique across entries.
    A sharded corpus (:mod:`clic.data.shards`) lists its images as ``shards<i>/<name>``, their pixel hashes known.
    ``category`` is the first folder inside the entry (the source, for per-source counts).
    Relative entries are relative to the working directory; a missing entry is a ``ValueError``
    naming ``pretrain.data[i]``. Archives are extracted under the ``data.max_*`` limits.
    """
    labels: set[str] = set()
    out: list[Record] = []
    for i, entry in enumerate(paths):
        if is_shard_index(entry):  # written by clic data shard (remote ones are cached under work_dir)
            out.extend(shard_records(entry, f"shards{i}", work_dir))
            continue
        path = Path(entry)
        if not path.exists():
            raise ValueError(f"pretrain.data[{i}]: {entry} does not exist (relative to {Path.cwd()})")
        name = path.resolve().name
        label = name[:len(name) - len(archive_suffix(name))] or f"entry{i}"
        if label in labels:
            label = f"{label}~{i}"
        labels.add(label)
        if path.is_dir() and (path / "table.csv").is_file():
            records = _prepared(path, label)
        elif path.is_dir():
            records = _folder(path, label)
        elif is_archive(path):
            records = _folder(extracted(path, Path(work_dir) / label, max_member_bytes, max_archive_bytes,
                                        max_archive_ratio), label)
        elif is_image_file(path):
            records = [Record(f"{label}", str(path.resolve()), None, "unlabeled")]
        else:
            raise ValueError(f"pretrain.data[{i}]: {entry} is not a folder, a prepared dataset, an image or "
                             f"an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        if not records:
            raise ValueError(f"pretrain.data[{i}]: {entry} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        log.info("pretrain.data[%d]: %d images in %s", i, len(records), entry)
        out.extend(records)
    return out


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in a deterministic order (each folder's files by name, then its
    sub-folders by name). Hidden files and folders are skipped; symbolic links to folders are not
    followed, links to files only when they point inside ``root``."""
    root = root.resolve()
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                subfolders.append(Path(e.path))
            elif is_image_file(e.name):
                try:
                    if not e.is_file() or e.is_symlink() and not Path(e.path).resolve(strict=True).is_relative_to(root):
                        log.debug("skipping %s: not a file, or a link out of %s", e.path, root)
                        continue
                except (OSError, RuntimeError) as exc:  # a link loop, a dangling link
                    log.warning("skipping %s: a link that cannot be followed (%s)", e.path,
                                getattr(exc, "strerror", None) or exc)
                    continue
                yield Path(e.path)
        stack.extend(reversed(subfolders))


def _folder(root: Path, label: str) -> list[Record]:
    root = root.resolve()
    out = []
    for path in walk_images(root):
        rel = path.relative_to(root)
        out.append(Record(f"{label}/{rel.as_posix()}", str(path), None, "unlabeled",
                          rel.parts[0] if len(rel.parts) > 1 else ""))
    return out


def _prepared(root: Path, label: str) -> list[Record]:
    """A prepared dataset: every row, labels dropped, its cache used, its pixel hashes kept."""
    root = root.resolve()
    return [Record(f"{label}/{r.name}", str(resolve(root, r.path).resolve()), None, "unlabeled", r.category,
                   r.width, r.height, r.sha256, str(root / r.cache) if r.cache else "")
            for r in read_table(root)]


# ---------------------------------------------------------------------------------- leakage
NEAR_DUPLICATE_BITS = 4  # calibrated: resized / re-encoded copies <= 4 bits, distinct photos >= 6 (docs/results.md)


@dataclasses.dataclass(frozen=True)
class CorpusHashes:
    """Hashes of a corpus: ``sha`` (name -> SHA-256 of the decoded pixels) and ``phash`` (name ->
    64-bit perceptual hash) for every readable image, ``errors`` (name -> reason) for the others,
    ``hashed``: how many were decoded now (the rest came from the index)."""

    sha: dict[str, str]
    phash: dict[str, int]
    errors: dict[str, str]
    hashed: int


@dataclasses.dataclass(frozen=True)
class Leak:
    """An evaluation image found in the corpus: ``bits`` = 0 and ``exact`` for identical pixels,
    else the perceptual hashes' Hamming distance (a resized or re-encoded copy)."""

    corpus: str
    evaluation: str
    bits: int
    exact: bool

    def __str__(self) -> str:
        how = "identical pixels" if self.exact else f"near-duplicate, {self.bits} of 64 hash bits differ"
        return f"{self.evaluation} = {self.corpus} ({how})"


def _hash(job: tuple[str | bytes, str, int]) -> tuple[str, str, str]:
    """Worker: (SHA-256, perceptual hash, '') of an image file (its path or bytes, its name, the
    pixel limit), or ('', '', why not)."""
    source, name, max_pixels = job
    try:
        img = decode_bytes(source, name, max_pixels) if isinstance(source, bytes) else load_rgb(source, max_pixels)
    except ImageError as exc:
        return "", "", str(exc)
    return content_hash(img), f"{perceptual_hash(img):016x}", ""


def _hash_samples(job: tuple[tuple[str, dict, int], int]) -> dict[str, tuple[str, str, str]]:
    """Worker: sample id -> :func:`_hash` of each sample of one shard of a local corpus (a
    :func:`clic.data.shards.shard_jobs` job), under the pixel limit."""
    shard, max_pixels = job
    return {str(i): _hash((data, f"{shard[0]}#{i}", max_pixels)) for i, data in iter_samples(shard)}


def _parallel(fn: Callable, jobs: list, workers: int, chunksize: int, desc: str, unit: str,
              progress: bool) -> Iterator:
    """``map(fn, jobs)`` in worker processes, in order, under a progress bar."""
    with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool:
        yield from tqdm(pool.map(fn, jobs, chunksize=chunksize), total=len(jobs), desc=desc, unit=unit,
                        disable=None if progress else True)


def corpus_hashes(records: Sequence[Record], index: str | Path, workers: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> CorpusHashes:
    """Hash every image's decoded pixels: SHA-256 (as ``clic data prepare`` does for its table)
    and the perceptual hash (:func:`clic.data.imageio.perceptual_hash`).

    ``index``: a JSON-lines file of ``{path, size, mtime_ns, sha256, phash, error}``; files whose
    path, size and modification time are in it are not decoded again. New results are appended as
    they come (an interrupted run keeps them) and the index is rewritten atomically at the end. A
    record with a ``sha256`` of its own (a prepared table's, of the source pixels) keeps it.
    """
    index = Path(index)
    known = read_index(index)
    sha: dict[str, str] = {}
    phash: dict[str, int] = {}
    errors: dict[str, str] = {}
    todo: list[tuple[Record, os.stat_result]] = []

    def take(name: str, digest: str, ph: str, err: str, own: str = "") -> None:
        if digest:
            sha[name], phash[name] = own or digest, int(ph, 16)
        else:
            errors[name] = err

    members: dict[str, dict[str, Record]] = defaultdict(dict)  # corpus folder -> sample id -> record
    for r in records:
        if is_shard_member(r.path):  # hashed from the shard's content below
            url, key = r.path.rsplit("#", 1)
            members[url][key] = r
            continue
        try:
            st = os.stat(r.path)
        except OSError as exc:
            errors[r.name] = f"{r.path}: {exc.strerror or exc}"
            continue
        hit = known.get(r.path)
        if hit is not None and (hit["size"], hit["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and \
                (hit["phash"] or hit["error"]):
            take(r.name, hit["sha256"], hit["phash"], hit["error"], r.sha256)
        else:
            todo.append((r, st))
    workers = workers or min(usable_cores(), 8)
    if todo:
        index.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(r.path, r.path, max_pixels) for r, _ in todo]
        results = _parallel(_hash, jobs, workers, 32, "hash images", "img", progress)
        with index.open("a") as journal:
            for (r, st), (digest, ph, err) in zip(todo, results, strict=True):
                known[r.path] = {"path": r.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                                 "phash": ph, "error": err}
                journal.write(json.dumps(known[r.path]) + "\n")
                take(r.name, digest, ph, err, r.sha256)
        atomic.write_text(index, "".join(json.dumps(known[path]) + "\n" for path in sorted(known)))
    n_samples = sum(len(m) for m in members.values())  # shard samples are decoded every time
    if members:  # never the writer's word: what the shards hold is what training reads
        shards = [job for folder in members for job in shard_jobs(folder)]
        hashed_shards = _parallel(_hash_samples, [(job, max_pixels) for job in shards], workers, 1, "hash shards",
                                  "shard", progress)
        for (folder, _, _), hashed in zip(shards, hashed_shards, strict=True):
            for key, hashes in hashed.items():
                if key in members[folder]:  # the writer's recorded hash is not kept
                    take(members[folder].pop(key).name, *hashes)
        for folder, missing in members.items():
            for key, r in missing.items():
                errors[r.name] = f"{folder}: no sample {key} in the corpus"
    for name, err in sorted(errors.items())[:20]:
        log.warning("unreadable image %s: %s", name, err)
    if len(errors) > 20:
        log.warning("... and %d more unreadable images", len(errors) - 20)
    return CorpusHashes(sha, phash, errors, len(todo) + n_samples)


def read_index(index: Path) -> dict[str, dict]:
    """The hash index as ``path -> entry`` (later lines win; malformed lines are ignored)."""
    known: dict[str, dict] = {}
    if not index.is_file():
        return known
    with index.open() as fh:
        for line in fh:
            try:
                e = json.loads(line)
                path, ph = str(e["path"]), str(e.get("phash", ""))
                int(ph or "0", 16)
                known[path] = {"path": path, "size": int(e["size"]), "mtime_ns": int(e["mtime_ns"]),
                               "sha256": str(e["sha256"]), "phash": ph, "error": str(e.get("error", ""))}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short by a crash: that file is hashed again
    return known


def evaluation_records(table: Iterable[Record], probe_mode: str) -> list[Record]:
    """The images a probe reports on: the test split, or every labelled image in ``cv`` mode."""
    if probe_mode == "cv":
        return [r for r in table if r.score is not None]
    return [r for r in table if r.split == "test"]


def leaks(corpus: CorpusHashes, evaluation: CorpusHashes, max_bits: int = NEAR_DUPLICATE_BITS) -> list[Leak]:
    """Every (corpus image, evaluation image) pair with identical decoded pixels or perceptual
    hashes at most ``max_bits`` apart (-1: identical pixels only), sorted by evaluation name."""
    by_sha: dict[str, list[str]] = defaultdict(list)
    for name, digest in corpus.sha.items():
        by_sha[digest].append(name)
    found = {(c, e): Leak(c, e, 0, True) for e, digest in evaluation.sha.items() for c in by_sha.get(digest, ())}
    if max_bits >= 0 and corpus.phash and evaluation.phash:
        c_names, e_names = list(corpus.phash), list(evaluation.phash)
        c_hash = np.array([corpus.phash[n] for n in c_names], dtype=np.uint64)
        for e in e_names:  # one evaluation image at a time: memory O(corpus)
            bits = hamming(c_hash, np.array([evaluation.phash[e]], dtype=np.uint64))[:, 0]  # (corpus,)
            for i in np.flatnonzero(bits <= max_bits):
                found.setdefault((c_names[i], e), Leak(c_names[i], e, int(bits[i]), False))
    return sorted(found.values(), key=lambda x: (x.evaluation, x.bits, x.corpus))


def find_leaks(records: Sequence[Record], evaluation: Iterable[Record], data_dir: str | Path,
               max_bits: int = NEAR_DUPLICATE_BITS, workers: int | None = None,
               index: str | Path = Path(CORPUS_DIR) / INDEX_NAME, progress: bool = True) -> list[Leak]:
    """Hash the corpus ``records`` and the ``evaluation`` records of the prepared dataset
    ``data_dir`` (their source files where present, else their cache), then :func:`leaks`."""
    return leaks(corpus_hashes(records, index, workers, progress=progress),
                 evaluation_hashes(evaluation, data_dir, index, workers, progress), max_bits)


def evaluation_hashes(evaluation: Iterable[Record], data_dir: str | Path,
                      index: str | Path = Path(CORPUS_DIR) / INDEX_NAME, workers: int | None = None,
                      progress: bool = True) -> CorpusHashes:
    """:func:`corpus_hashes` of a prepared dataset's records: the source image where it is still
    there (the perceptual hash of a full-size photo), else the prepared cache; a record keeps the
    table's SHA-256 of its source pixels."""
    root = Path(data_dir)
    files = []
    for r in evaluation:
        source = resolve(root, r.path)
        path = source if source.is_file() else r.image_path(root)
        files.append(dataclasses.replace(r, path=str(path)))
    return corpus_hashes(files, index, workers, progress=progress)
