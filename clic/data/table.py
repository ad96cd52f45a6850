"""The one prepared format every source is turned into.

A prepared dataset is a folder holding ``table.csv`` (one row per image) and ``meta.json``
(source, counts, fingerprint), plus an optional resized cache ``cache/<sha>.png`` with the short
side at ``cache_size`` so that training never decodes full-size photos twice.

Columns: ``name`` (unique), ``path`` (the source image, relative to the prepared folder when
possible), ``score`` (in [0, 1], empty when unlabelled), ``split``, ``category``, ``width``,
``height`` (of the decoded source), ``sha256`` (of the decoded pixels), ``cache`` (relative to the
prepared folder, or empty).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clic import atomic

COLUMNS = ("name", "path", "score", "split", "category", "width", "height", "sha256", "cache")
SPLITS = ("train", "test", "val", "unlabeled")


@dataclasses.dataclass(frozen=True)
class Record:
    name: str
    path: str
    score: float | None
    split: str
    category: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""
    cache: str = ""

    def image_path(self, root: Path) -> Path:
        """The best file to read: the cache when there is one, else the source."""
        return (root / self.cache) if self.cache else resolve(root, self.path)


def resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def relative_to(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` when it lies inside the working folder (the project), else
    absolute: a project-local dataset stays portable, an outside one stays findable."""
    path = path.resolve()
    if path.is_relative_to(Path.cwd().resolve()):
        return os.path.relpath(path, root.resolve())
    return str(path)


def write_table(root: Path, records: Iterable[Record], meta: dict[str, Any]) -> None:
    """Write ``table.csv``, then ``meta.json`` (plus fingerprint and counts), each atomically."""
    records = list(records)
    root.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r.split == s for r in records) for s in sorted({r.split for r in records})}
    rows = ([r.name, r.path, "" if r.score is None else f"{r.score:.6f}", r.split, r.category, r.width, r.height,
             r.sha256, r.cache] for r in records)
    atomic.write_csv(root / "table.csv", [COLUMNS, *rows])
    meta = {**meta, "fingerprint": fingerprint(records), "counts": counts}
    atomic.write_text(root / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_table(root: str | Path, splits: Iterable[str] | None = None) -> list[Record]:
    """Read a prepared table; ``splits`` filters rows. Errors name the file and line."""
    root = Path(root)
    path = root / "table.csv"
    if not path.is_file():
        raise ValueError(f"{path}: no prepared table here; run `clic data prepare` first")
    wanted = set(splits) if splits is not None else None
    out = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}:1: expected header {','.join(COLUMNS)}, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            try:
                rec = Record(row["name"], row["path"], float(row["score"]) if row["score"] else None, row["split"],
                             row["category"], int(row["width"]), int(row["height"]), row["sha256"], row["cache"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: malformed row ({exc})") from exc
            cache = Path(rec.cache)
            if rec.cache and (cache.is_absolute() or ".." in cache.parts):
                raise ValueError(f"{path}:{lineno}: cache {rec.cache!r} is not a path inside {root}")
            if wanted is None or rec.split in wanted:
                out.append(rec)
    return out


def fingerprint(records: Iterable[Record]) -> str:
    """Order-independent digest of (name, content, score, split): the dataset's identity."""
    keys = sorted(f"{r.name}|{r.sha256}|{r.score}|{r.split}" for r in records)
    return hashlib.sha256("".join(f"{key}\n" for key in keys).encode()).hexdigest()[:16]
