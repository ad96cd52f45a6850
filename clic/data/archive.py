"""Safe extraction of ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` archives.

Refused: absolute member paths, ``..`` components, symbolic and hard links, device files, FIFOs,
members larger than ``max_member_bytes``, archives whose total uncompressed size exceeds
``max_total_bytes``, and zip members whose compression ratio betrays a zip bomb. Extraction goes
to a temporary sibling folder renamed into place at the end, so a refused archive leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_RATIO = 200  # uncompressed/compressed, per zip member larger than 1 MiB


class ArchiveError(ValueError):
    """An archive member that may not be extracted; the message names archive and member."""


def is_archive(path: str | Path) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} escapes the extraction folder ('..')")
    return p


def safe_extract(archive: str | Path, dest: str | Path, max_member_bytes: int = 2**30,
                 max_total_bytes: int = 64 * 2**30) -> Path:
    """Extract ``archive`` into ``dest`` (created; must not exist yet). Returns ``dest``."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ArchiveError(f"{dest}: extraction target already exists")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if str(archive).lower().endswith(".zip"):
            _extract_zip(archive, tmp, max_member_bytes, max_total_bytes)
        elif is_archive(archive):
            _extract_tar(archive, tmp, max_member_bytes, max_total_bytes)
        else:
            raise ArchiveError(f"{archive}: not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _extract_zip(archive: Path, dest: Path, max_member: int, max_total: int) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        total = 0
        infos = zf.infolist()
        for info in infos:  # check everything before writing anything
            _check_name(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ArchiveError(f"{archive}: member {info.filename!r} is not a regular file")
            if info.file_size > max_member:
                raise ArchiveError(f"{archive}: member {info.filename!r} is {info.file_size} bytes, "
                                   f"over the {max_member}-byte limit")
            if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise ArchiveError(f"{archive}: member {info.filename!r} expands {info.file_size} / "
                                   f"{info.compress_size} times (zip bomb?)")
            total += info.file_size
            if total > max_total:
                raise ArchiveError(f"{archive}: uncompressed size exceeds {max_total} bytes")
        for info in infos:
            target = dest / _check_name(archive, info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                written = 0
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > info.file_size:  # the header lied
                        raise ArchiveError(f"{archive}: member {info.filename!r} exceeds its declared size")
                    out.write(chunk)


def _extract_tar(archive: Path, dest: Path, max_member: int, max_total: int) -> None:
    try:
        tf = tarfile.open(archive)  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from exc
    with tf:
        members = tf.getmembers()
        total = 0
        for m in members:
            _check_name(archive, m.name)
            if m.issym() or m.islnk():
                raise ArchiveError(f"{archive}: member {m.name!r} is a link")
            if m.isdev() or m.isfifo() or not (m.isfile() or m.isdir()):
                raise ArchiveError(f"{archive}: member {m.name!r} is not a regular file or folder")
            if m.size > max_member:
                raise ArchiveError(f"{archive}: member {m.name!r} is {m.size} bytes, over the "
                                   f"{max_member}-byte limit")
            total += m.size
            if total > max_total:
                raise ArchiveError(f"{archive}: uncompressed size exceeds {max_total} bytes")
        for m in members:
            target = dest / _check_name(archive, m.name)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:  # pragma: no cover - regular files always have data
                raise ArchiveError(f"{archive}: member {m.name!r} has no data")
            with src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def find_root(folder: Path, marker: str) -> Path:
    """The folder at or below ``folder`` (up to 3 levels) that contains ``marker``."""
    for depth in range(4):
        for candidate in sorted(folder.glob("/".join(["*"] * depth) + ("/" if depth else "") + marker)):
            return candidate.parent
    raise ValueError(f"{folder}: no {marker!r} found within 3 folder levels")
