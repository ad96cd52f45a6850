"""``clic data prepare``: any source -> the prepared format (table + resized cache).

Every image is decoded once (in a process pool) to check it, measure it, hash its pixels and
write the short-side cache. One prepare of an output at a time: it is built aside and swapped in
when complete, so a failed or killed prepare leaves the previous one (:mod:`clic.atomic`). An
archive is extracted once per content (:func:`clic.data.archive.extracted`), and every listed image
lies inside the dataset (:mod:`clic.data.sources`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from clic import atomic
from clic.config import DataConfig, to_dict
from clic.cores import die_with_parent, usable_cores
from clic.data.archive import extracted, find_root, is_archive
from clic.data.imageio import ImageError, content_hash, load_rgb, resize_short
from clic.data.sources import Entry, read_folder, read_ic9600, read_savoias
from clic.data.synthetic import generate_classification, generate_ic9600
from clic.data.table import Record, relative_to, write_table

log = logging.getLogger(__name__)


def source_entries(cfg: DataConfig, seed: int, force: bool = False) -> tuple[list[Entry], dict[str, str]]:
    """Locate (generate or extract if needed) the source and list its entries; ``force``
    extracts an archive again even when its content is unchanged."""
    raw = Path(cfg.raw_dir)
    if cfg.source == "synthetic":
        s = cfg.synthetic
        root = raw / f"synthetic-{seed}-{s.n_train}-{s.n_test}-{s.size}-{'-'.join(s.categories)}"
        with atomic.lock(root, "generating"):
            atomic.recover_dir(root)
            if not (root / "train.txt").is_file():
                tmp = atomic.staging_dir(root)
                generate_ic9600(tmp, seed, s.n_train, s.n_test, s.size, s.categories)
                atomic.replace_dir(tmp, root, "clic data prepare (synthetic source)", SYNTHETIC_NAMES)
        return read_ic9600(root), {"source": "synthetic", "root": str(root)}
    path = Path(cfg.path)
    if not path.exists():
        raise ValueError(f"data.path: {path} does not exist")
    if cfg.source == "ic9600" and path.is_file():
        if not is_archive(path):
            raise ValueError(f"data.path: {path} is neither a folder nor a .zip/.tar/.tar.gz archive")
        path = find_root(extracted(path, raw / f"ic9600-{path.stem}", cfg.max_member_bytes, cfg.max_archive_bytes,
                                   cfg.max_archive_ratio, force), "images")
    if cfg.source == "ic9600":
        entries = read_ic9600(path)
    elif cfg.source == "savoias":
        entries = read_savoias(path, cfg.categories, seed, cfg.test_fraction)
    else:
        entries = read_folder(path, Path(cfg.csv), seed, cfg.test_fraction)
    return entries, {"source": cfg.source, "root": str(path)}


def _process(job: tuple[Entry, str, int, int, int]) -> tuple[Record | None, str | None]:
    entry, out_dir, cache_size, min_size, max_pixels = job
    try:
        img = load_rgb(entry.path, max_pixels, strict=True)
    except ImageError as exc:
        return None, str(exc)
    w, h = img.size
    if min(w, h) < min_size:
        return None, f"{entry.path}: {w}x{h} is smaller than the minimum side of {min_size} pixels"
    sha = content_hash(img)
    cache = f"cache/{sha[:2]}/{sha}.png" if cache_size else ""
    target = Path(out_dir) / cache
    if cache and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        resize_short(img, cache_size).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, target)
    return Record(entry.name, str(entry.path), entry.score, entry.split, entry.category, w, h, sha, cache), None


PREPARED_NAMES = ("table.csv", "meta.json", "cache")  # what a prepared folder holds
PREPARED_PROOF = ("meta.json", "inputs")  # and the signature only prepare writes (an unmarked one is ours)
SYNTHETIC_NAMES = ("images", "train.txt", "test.txt")


def _named(out: Path) -> Path:
    """``out`` with a name (``.`` and ``..`` made absolute): its lock and leftovers go beside it."""
    return Path(os.path.abspath(out)) if out.name in ("", "..") else out


# settings that never change a prepared folder's content (where it goes, what is refused)
NOT_SHAPING = ("out_dir", "raw_dir", "max_archive_bytes", "max_member_bytes", "max_archive_ratio")


def inputs_signature(cfg: DataConfig, seed: int, entries: list[Entry]) -> str:
    """Hash of everything a prepared folder depends on: the settings that shape it, the seed and
    each entry (name, label, split, category, file size and modification time)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in NOT_SHAPING}
    h = hashlib.sha256(json.dumps({"settings": settings, "seed": seed}, sort_keys=True).encode())
    for e in entries:
        st = e.path.stat()
        h.update(f"{e.name}|{e.path}|{e.score}|{e.split}|{e.category}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, signature: str) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("inputs") == signature and (out / "table.csv").is_file()


def prepare(cfg: DataConfig, seed: int = 0, workers: int | None = None, force: bool = False) -> Path:
    """Prepare the configured source into ``cfg.out_dir``; returns that folder.

    A folder already prepared from the same inputs (:func:`inputs_signature`) is kept as it is
    unless ``force``: re-running is cheap and never pulls files from under a concurrent reader.
    Concurrent prepares of one folder run one after the other (the second one usually finds the
    folder up to date); see the module docstring for what survives a failure or a kill. An
    ``out_dir`` that is not a prepared folder (or empty), or that is, holds or lies inside the
    source or ``raw_dir``, is refused before anything is read (:func:`clic.atomic.check_output`).
    """
    out = _named(Path(cfg.out_dir))
    atomic.check_output(out, (cfg.path, cfg.csv, cfg.raw_dir), PREPARED_NAMES, proof=PREPARED_PROOF)  # before its lock
    with atomic.lock(out, "preparing"):
        atomic.recover_dir(out)
        atomic.check_output(out, (), PREPARED_NAMES, proof=PREPARED_PROOF)  # as it is now that this process holds it
        return _prepare_locked(cfg, out, seed, workers, force)


def _prepare_locked(cfg: DataConfig, out: Path, seed: int, workers: int | None, force: bool) -> Path:
    entries, meta = source_entries(cfg, seed, force)
    if not entries:
        raise ValueError(f"{meta.get('root')}: the source lists no images")
    signature = inputs_signature(cfg, seed, entries)
    if not force and _up_to_date(out, signature):
        log.info("%s is up to date with %s (%d images)", out, meta.get("root"), len(entries))
        return out
    tmp = atomic.staging_dir(out)
    tmp.mkdir(parents=True)
    jobs = [(e, str(tmp), cfg.cache_size, cfg.min_size, cfg.max_pixels) for e in entries]
    workers = workers or min(usable_cores(), 8)
    records: list[Record] = []
    errors: list[str] = []
    try:
        with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool:
            for rec, err in tqdm(pool.map(_process, jobs, chunksize=16), total=len(jobs),
                                 desc="prepare", unit="img", disable=None):
                if err:
                    errors.append(err)
                elif rec is not None:
                    records.append(rec)
        if errors:
            shown = "\n  ".join(errors[:10])
            more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise ValueError(f"{len(errors)} of {len(entries)} images are unusable:\n  {shown}{more}")
        records = [dataclasses.replace(r, path=relative_to(out, Path(r.path))) for r in records]
        write_table(tmp, records, {**meta, "seed": seed, "cache_size": cfg.cache_size, "inputs": signature})
        atomic.replace_dir(tmp, out, "clic data prepare", PREPARED_NAMES, PREPARED_PROOF)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %d images from %s into %s", len(records), meta.get("root"), out)
    return out


def prepare_transfer(cfg: DataConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """The synthetic labelled classification set (``train/``, ``val/`` class folders); refuses an
    ``out_dir`` it did not write, as :func:`prepare` does."""
    out = _named(Path(out_dir))
    s = cfg.synthetic
    atomic.check_output(out, (cfg.out_dir, cfg.raw_dir))
    with atomic.lock(out, "generating"):
        atomic.recover_dir(out)
        tmp = atomic.staging_dir(out)
        try:
            generate_classification(tmp, seed, s.n_classes, s.n_class_train, s.n_class_val, s.size)
            atomic.replace_dir(tmp, out, "clic data prepare --transfer")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
