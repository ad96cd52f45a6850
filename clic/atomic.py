"""Crash-safe updates of folders: build aside, swap in, recover after a kill, one writer at a time.

A folder ``out`` is rebuilt in ``<out>.partial-<pid>`` and swapped in by :func:`replace_dir`: the
old folder is renamed to ``<out>.old-<pid>``, the new one renamed to ``out``, then the old one is
deleted. At every instant either ``out`` is complete (old or new) or, after a kill between the two
renames, ``out`` is missing and ``<out>.old-<pid>`` holds it; :func:`recover_dir` (run first by
every writer, under :func:`lock`) puts it back and deletes what killed runs left behind. The pid in
a leftover's name tells whether its writer is still running.

Nothing a user owns is deleted: every folder a command writes holds a marker (:data:`MARKER`), and
:func:`check_output` refuses an output folder that is neither missing, empty, marked, nor shown to
be that command's output from before the marker existed (its names and a file only it writes), and
an output that is, contains or lies inside one of the command's inputs. :func:`replace_dir` checks it again
before its swap, so no code path replaces a folder this project did not write.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only folder: leave it, say so
            log.warning("could not remove %s: %s", path, exc.strerror or exc)


def remove_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Delete the entries of ``folder`` whose name matches ``pattern`` (a regular expression whose
    group ``pid`` is the writer's process id) when that process is gone; returns them."""
    regex = re.compile(pattern)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        m = regex.fullmatch(entry.name)
        if m and not pid_alive(int(m.group("pid"))):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d leftovers of killed runs in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


def staging_dir(out: Path) -> Path:
    """The private folder this process builds ``out`` in (``<out>.partial-<pid>``), emptied."""
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    _remove(tmp)
    return tmp


def recover_dir(out: Path) -> None:
    """Undo what a killed writer of ``out`` left: restore ``<out>.old-<pid>`` when ``out`` is
    missing, delete ``<out>.partial-<pid>*`` and other ``<out>.old-<pid>`` of dead processes."""
    aside = rf"{re.escape(out.name)}\.old-(?P<pid>\d+)"
    regex = re.compile(aside)
    asides = [p for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.old-*"))
              if (m := regex.fullmatch(p.name)) and not pid_alive(int(m.group("pid")))]
    if asides and not (out.exists() or out.is_symlink()):
        newest = max(asides, key=lambda p: p.lstat().st_mtime_ns)
        os.rename(newest, out)
        log.warning("restored %s from %s (left by a killed run)", out, newest.name)
    remove_leftovers(out.parent, aside)
    remove_leftovers(out.parent, rf"{re.escape(out.name)}\.partial-(?P<pid>\d+)(\..*)?")


def replace_dir(tmp: Path, out: Path, command: str, names: Collection[str] = (),
                proof: tuple[str, str] | None = None) -> None:
    """Put the complete folder ``tmp`` in place of ``out`` (see the module docstring), marked as
    written by ``command``; an ``out`` that :func:`check_output` (``names``, ``proof``) refuses is left
    as it is. A failure or Ctrl-C during the swap puts the old folder back before the exception
    propagates."""
    check_output(out, names=names, proof=proof)
    if tmp.is_dir():  # (a missing one fails the rename below)
        mark(tmp, command)
    aside = out.with_name(f"{out.name}.old-{os.getpid()}")
    _remove(aside)
    moved = False
    try:
        if out.exists() or out.is_symlink():
            os.rename(out, aside)
            moved = True
        os.rename(tmp, out)
    except BaseException:
        if moved and not (out.exists() or out.is_symlink()):
            os.rename(aside, out)
        raise
    if moved:
        _remove(aside)


MARKER = ".clic-output"  # in every folder a clic command wrote: the folder may be replaced or written into


class OutputError(ValueError):
    """An output that would overwrite, delete or be mixed with what the user owns."""


LEFTOVER = re.compile(r"\..+\.\d+\.tmp")  # ``.<name>.<pid>.tmp``: what a killed write of this project leaves


def check_inputs(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs`` (resolved paths;
    ``file://`` URLs are their paths, other URLs and empty strings are skipped)."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        text = str(given).removeprefix("file://")
        if not text or "://" in text or text.startswith("dbfs:"):
            continue
        source = Path(text).resolve()
        how = ("is" if target == source else "lies inside" if source in target.parents
               else "contains" if target in source.parents else "")
        if how:
            raise OutputError(f"{out}: the output {how} the input {given}; write it somewhere else (a command "
                              "never writes into, over or around what it reads)")


def check_output(out: str | Path, inputs: Iterable[str | Path] = (), names: Collection[str] = (),
                 folder: bool = True, proof: tuple[str, str] | None = None) -> None:
    """Refuse to write ``out`` when that could lose something the user owns.

    ``folder``: ``out`` is a folder the command replaces or writes into; it must be missing, empty,
    hold :data:`MARKER`, or be an output of the command written before the marker existed: only
    entries named in ``names`` (leftovers of killed writes, ``.<name>.<pid>.tmp``, count as its
    own) and, with ``proof = (file, key)``, that file in it holding a JSON object (a JSON-lines
    file: its first line) with that key, which no user's folder of those names would. Otherwise
    ``out`` is a file, which may not be a folder. Either way ``out`` may not be, contain or lie
    inside one of ``inputs`` (:func:`check_inputs`). Raises :class:`OutputError` naming the
    folder and what it holds.
    """
    out = Path(out)
    check_inputs(out, inputs)
    if not folder:
        if out.is_dir():
            raise OutputError(f"{out}: is a folder; name a file to write")
        return
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder; name a new or empty folder")
    if not out.is_dir() or (out / MARKER).is_file():
        return
    entries = [e.name for e in out.iterdir() if not LEFTOVER.fullmatch(e.name)]
    foreign = sorted(e for e in entries if e not in names)
    if entries and not foreign and proof is not None and not _proves(out / proof[0], proof[1]):
        foreign = sorted(entries)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{out}: holds {shown}, which no clic command wrote; refusing to replace or write into "
                          "it (nothing was changed): name a new or empty folder, or move those files away")


def _proves(file: Path, key: str) -> bool:
    """``file`` is a JSON object (or JSON lines, the first one) with ``key``: an output of ours."""
    try:
        with file.open("rb") as fh:
            head = fh.read(1 << 20)
        first = head.split(b"\n", 1)[0] if file.suffix == ".jsonl" else head
        value = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and key in value


def mark(folder: Path, command: str) -> None:
    """Mark ``folder`` as written by ``command`` (see :func:`check_output`)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.is_file():
        write_text(marker, f"written by {command}; clic commands may replace this folder\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling (``.<name>.<pid>.tmp``) and rename it over ``path``:
    readers see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, rows: Iterable[Sequence[object]]) -> None:
    """``rows`` (header first) as a CSV file, written whole by :func:`write_text`; lines end in
    ``\n`` as on standard output (the csv module's default CRLF leaves a ``\r`` in cut/awk)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text(path, buf.getvalue())


@contextlib.contextmanager
def lock(path: Path, what: str = "") -> Iterator[None]:
    """Hold ``<path>.lock`` (an OS file lock, released when the process dies); waits, saying so,
    while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fl = FileLock(f"{path}.lock")
    try:
        fl.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process %s %s (%s.lock)", what or "writing", path, path)
        fl.acquire()
    try:
        yield
    finally:
        fl.release()
