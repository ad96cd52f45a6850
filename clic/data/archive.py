"""Safe extraction of ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` archives.

Refused: absolute member paths, ``..`` components, symbolic and hard links, device files, FIFOs,
members larger than ``max_member_bytes``, archives whose total uncompressed size exceeds
``max_total_bytes``, and decompression bombs: a zip member, or a compressed tar as a whole (its
members share one stream), of over 1 MiB expanding more than ``max_ratio`` times. Everything is
checked from the headers before a byte is written (a tar's headers are read one by one, so a bomb
is refused at its first oversized member, without inflating it). Extraction goes to a temporary
sibling folder renamed into place at the end, so a refused archive leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from clic import atomic

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_RATIO = 200.0  # uncompressed/compressed, per zip member or per compressed tar, above 1 MiB
CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)  # damaged data, named by member
RATIO_FLOOR = 2**20  # smaller members/archives are never called bombs (tiny files compress well)


class ArchiveError(ValueError):
    """An archive member that may not be extracted; the message names archive and member."""


def archive_suffix(path: str | Path) -> str:
    """The suffix of :data:`ARCHIVE_SUFFIXES` that ``path`` ends with (any case), or ''."""
    name = str(path).lower()
    return next((s for s in ARCHIVE_SUFFIXES if name.endswith(s)), "")


def is_archive(path: str | Path) -> bool:
    return bool(archive_suffix(path))


def _check_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} escapes the extraction folder ('..')")
    return p


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def safe_extract(archive: str | Path, dest: str | Path, max_member_bytes: int = 2**30,
                 max_total_bytes: int = 64 * 2**30, max_ratio: float = MAX_RATIO) -> Path:
    """Extract ``archive`` into ``dest`` (created; must not exist yet). Returns ``dest``."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ArchiveError(f"{dest}: extraction target already exists")
    tmp = atomic.staging_dir(dest)
    tmp.mkdir(parents=True)
    try:
        if str(archive).lower().endswith(".zip"):
            _extract_zip(archive, tmp, max_member_bytes, max_total_bytes, max_ratio)
        elif is_archive(archive):
            _extract_tar(archive, tmp, max_member_bytes, max_total_bytes, max_ratio)
        else:
            raise ArchiveError(f"{archive}: not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def extracted(archive: str | Path, dest: str | Path, max_member_bytes: int = 2**30,
              max_total_bytes: int = 64 * 2**30, max_ratio: float = MAX_RATIO, force: bool = False) -> Path:
    """``archive`` extracted into ``dest`` once (:func:`safe_extract`), reused while its content is
    the same: ``<dest>.source.json`` records the archive's stat key and SHA-256; an unchanged key
    reuses ``dest`` without reading the archive, a changed one hashes it and extracts again unless
    the hash is the same. One writer at a time (a lock beside ``dest``: DDP ranks, parallel
    stages); the new extraction replaces the old one atomically, and a kill leaves the old one."""
    archive, dest = Path(archive), Path(dest)
    marker = dest.with_name(f"{dest.name}.source.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic.lock(dest, "extracting into"):
        atomic.recover_dir(dest)
        st = archive.stat()
        key = {"path": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        try:
            known = json.loads(marker.read_text()) if dest.is_dir() else {}
        except (OSError, ValueError):
            known = {}
        if not force and known.get("stat") == key:
            return dest
        digest = file_sha256(archive)
        if force or known.get("sha256") != digest:
            log.info("extracting %s into %s (%s)", archive, dest,
                     "forced" if force else "new content" if known else "first time")
            # ours: marked, or extracted before folders were marked (the marker beside it says so)
            owned = [p.name for p in dest.iterdir()] if known and dest.is_dir() else ()
            atomic.check_output(dest, (archive,), owned)
            marker.unlink(missing_ok=True)  # a kill from here on leaves no marker: extracted again next time
            tmp = atomic.staging_dir(dest)
            safe_extract(archive, tmp, max_member_bytes, max_total_bytes, max_ratio)
            atomic.replace_dir(tmp, dest, "clic (archive extraction)", owned)
        atomic.write_text(marker, json.dumps({"stat": key, "sha256": digest}, indent=1, sort_keys=True) + "\n")
    return dest


def _check_member(archive: Path, name: str, problem: str, size: int, total: int, max_member: int,
                  max_total: int, bomb: str = "") -> int:
    """Refuse a member that may not be extracted (``problem``: why it is no plain file or folder,
    or ''; ``bomb``: why its compression ratio is refused, or ''); returns the uncompressed total with it."""
    _check_name(archive, name)
    if problem:
        raise ArchiveError(f"{archive}: member {name!r} {problem}")
    if size > max_member:
        raise ArchiveError(f"{archive}: member {name!r} is {size} bytes, over the {max_member}-byte limit")
    if bomb:
        raise ArchiveError(f"{archive}: member {name!r} {bomb}")
    if total + size > max_total:
        raise ArchiveError(f"{archive}: uncompressed size exceeds {max_total} bytes")
    return total + size


def _write_members(archive: Path, dest: Path, members: list[tuple[str, bool, int, Any]],
                   open_member: Callable[[Any], IO[bytes] | None]) -> None:
    """Write the checked ``(name, is folder, declared size, member)`` into ``dest``."""
    for name, is_dir, size, member in members:
        target = dest / _check_name(archive, name)
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = open_member(member)
            if src is None:  # pragma: no cover - regular files always have data
                raise ArchiveError(f"{archive}: member {name!r} has no data")
            with src, target.open("wb") as out:
                written = 0
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > size:  # the header lied
                        raise ArchiveError(f"{archive}: member {name!r} exceeds its declared size")
                    out.write(chunk)
        except CORRUPT as exc:
            raise ArchiveError(f"{archive}: member {name!r} is corrupt ({exc})") from exc


def _extract_zip(archive: Path, dest: Path, max_member: int, max_total: int, max_ratio: float) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        total = 0
        infos = zf.infolist()
        for info in infos:  # check everything before writing anything
            mode = info.external_attr >> 16  # file type 0: none recorded
            problem = ("is a symbolic link" if stat.S_ISLNK(mode) else "is not a regular file"
                       if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) else "")
            bomb = ""
            if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
                bomb = (f"expands {info.file_size} / {info.compress_size} times, over the ratio limit of "
                        f"{max_ratio:g} (zip bomb?)")
            total = _check_member(archive, info.filename, problem, info.file_size, total, max_member, max_total,
                                  bomb)
        _write_members(archive, dest, [(i.filename, i.is_dir(), i.file_size, i) for i in infos], zf.open)


def _extract_tar(archive: Path, dest: Path, max_member: int, max_total: int, max_ratio: float) -> None:
    packed = archive.stat().st_size
    try:
        tf = tarfile.open(archive)  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from exc
    with tf:
        members: list[tarfile.TarInfo] = []
        total = 0
        while True:  # header by header: a refused member is never inflated
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ArchiveError(f"{archive}: unreadable after {len(members)} members ({exc})") from exc
            if m is None:
                break
            members.append(m)
            problem = ("is a link" if m.issym() or m.islnk() else "is not a regular file or folder"
                       if m.isdev() or m.isfifo() or not (m.isfile() or m.isdir()) else "")
            total = _check_member(archive, m.name, problem, m.size, total, max_member, max_total)
            if total > RATIO_FLOOR and total > max_ratio * max(packed, 1):
                raise ArchiveError(f"{archive}: expands to over {total} bytes from {packed} (at member "
                                   f"{m.name!r}), over the ratio limit of {max_ratio:g} (decompression bomb?)")
        _write_members(archive, dest, [(m.name, m.isdir(), m.size, m) for m in members], tf.extractfile)


def find_root(folder: Path, marker: str) -> Path:
    """The folder at or below ``folder`` (up to 3 levels) that contains ``marker``."""
    for depth in range(4):
        for candidate in sorted(folder.glob("*/" * depth + marker)):
            return candidate.parent
    raise ValueError(f"{folder}: no {marker!r} found within 3 folder levels")
