"""Readers for each data source; each returns :class:`Entry` rows (not yet decoded).

- ``ic9600``: a folder or archive in IC9600 layout (``images/``, ``train.txt``, ``test.txt``;
  lines ``<name><two spaces><score>``; category = the name's prefix before the first ``_``).
- ``savoias``: a clone of the SAVOIAS repository; scores from ``Ground truth/xlsx`` (read with the
  standard library; the pickled ``.npy`` copies are never loaded), divided by 100; split drawn
  deterministically from the seed since SAVOIAS ships none.
- ``folder``: any image folder plus a CSV of ``image,score[,split]``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from xml.etree import ElementTree

from clic.data.imageio import IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    score: float | None
    split: str
    category: str = ""


def _score(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: score {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: score {value} is outside [0, 1]")
    return value


def _checked(entries: list[Entry], where: str) -> list[Entry]:
    """``entries``, refused unless their names are unique and each is a file."""
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise ValueError(f"{where}: duplicate image name {e.name!r} (in {seen[e.name]} and {e.split})")
        seen[e.name] = e.split
    for e in entries:
        if not e.path.is_file():
            raise ValueError(f"{e.path}: image listed for {e.name!r} ({e.split}) is missing")
    return entries


def listed_path(base: Path, name: str, where: str) -> Path:
    """``base / name`` for an image name read at ``where`` (file:line), refused unless it stays
    inside ``base`` once symbolic links are resolved: no absolute names, no ``..``, no link out.
    Without this a list could pull any readable host file into the prepared data."""
    rel = Path(name)
    if not name:
        raise ValueError(f"{where}: empty image name")
    if rel.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{where}: image {name!r} is an absolute path; names are relative to {base}")
    if ".." in rel.parts or ".." in Path(name.replace("\\", "/")).parts:
        raise ValueError(f"{where}: image {name!r} has a '..' component; names must stay inside {base}")
    path = base / rel
    if len(rel.parts) > 1 or path.is_symlink():  # a plain name in base can only escape as a link
        target = path.resolve()
        if not target.is_relative_to(base.resolve()):
            raise ValueError(f"{where}: image {name!r} is a link to {target}, outside {base}")
    return path


def _require_rows(entries: list[Entry], path: Path, what: str) -> None:
    if not entries:
        raise ValueError(f"{path}: lists no images (expected {what}); an empty list would fail only later")


def seeded_split(name: str, seed: int, test_fraction: float) -> str:
    """Deterministic train/test assignment from a hash of (seed, name)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


# ------------------------------------------------------------------------------------- IC9600
def read_ic9600(root: Path) -> list[Entry]:
    """Parse ``train.txt``/``test.txt`` of an IC9600-layout folder; errors name file and line."""
    images = root / "images"
    if not images.is_dir():
        raise ValueError(f"{root}: no images/ folder (expected IC9600 layout: images/, train.txt, test.txt)")
    if not any((root / f"{split}.txt").is_file() for split in ("train", "test")):
        raise ValueError(f"{root}: neither train.txt nor test.txt found (IC9600 layout)")
    entries: list[Entry] = []
    for split in ("train", "test"):
        ann = root / f"{split}.txt"
        if not ann.is_file():
            continue
        before = len(entries)
        for lineno, raw in enumerate(_read_text(ann).splitlines(), start=1):
            line = raw.strip()  # as IC9600's own parser: strip, then split on two spaces
            if not line:
                continue
            where = f"{ann}:{lineno}"
            parts = line.split("  ")
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                raise ValueError(f"{where}: expected '<image name><two spaces><score>'{_separator_hint(line)}, "
                                 f"got {raw!r}")
            name, score = parts[0], parts[1].strip()
            category = name.split("_", 1)[0] if "_" in name else ""
            entries.append(Entry(name, listed_path(images, name, where), _score(score, where), split, category))
        _require_rows(entries[before:], ann, "lines '<image name><two spaces><score>'")
    return _checked(entries, str(root))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _separator_hint(line: str) -> str:
    """Why a stripped annotation line did not split into name and score, when it is clear."""
    if "\t" in line:
        return " (found a tab)"
    if "  " not in line and " " in line:
        score = line.rsplit(" ", 1)[1]
        try:
            float(score)
        except ValueError:
            return ""  # a name with spaces and no score: not a separator problem
        return " (found a single space)"
    return ""


# ------------------------------------------------------------------------------------ SAVOIAS
SAVOIAS_KEYS = {
    "Scenes": "scenes", "Advertisement": "ad", "Visualizations": "vis", "Objects": "objects",
    "Interior Design": "interior_design", "Art": "art", "Suprematism": "sup",
}
_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}


def read_xlsx_column(path: Path, header: str = "gt") -> list[float]:
    """Values below ``header`` in the first sheet of an .xlsx (standard library only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            strings: list[str] = []
            if "xl/sharedStrings.xml" in zf.namelist():
                sst = ElementTree.fromstring(zf.read("xl/sharedStrings.xml"))
                strings = ["".join(t.text or "" for t in si.iter(f"{{{_NS['m']}}}t"))
                           for si in sst.findall("m:si", _NS)]
            sheet = ElementTree.fromstring(zf.read("xl/worksheets/sheet1.xml"))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .xlsx workbook ({exc})") from exc
    column: str | None = None
    values: list[float] = []
    for row in sheet.iter(f"{{{_NS['m']}}}row"):
        for cell in row.findall("m:c", _NS):
            ref = cell.get("r", "")
            col = re.sub(r"\d", "", ref)
            text = cell.findtext("m:v", "", _NS)
            if cell.get("t") == "s" and text:
                text = strings[int(text)]
            if column is None:
                if text.strip().lower() == header:
                    column = col
            elif col == column:
                try:
                    values.append(float(text))
                except ValueError:
                    raise ValueError(f"{path}: cell {ref} holds {text!r}, expected a number") from None
    if column is None:
        raise ValueError(f"{path}: no column headed {header!r}")
    return values


def read_savoias(root: Path, categories: Iterable[str], seed: int, test_fraction: float) -> list[Entry]:
    images_root, gt_root = root / "Images", root / "Ground truth" / "xlsx"
    if not images_root.is_dir() or not gt_root.is_dir():
        raise ValueError(f"{root}: expected a SAVOIAS clone with 'Images/' and 'Ground truth/xlsx/'")
    wanted = list(categories) or [c for c in SAVOIAS_KEYS if (images_root / c).is_dir()]
    entries: list[Entry] = []
    for cat in wanted:
        if cat not in SAVOIAS_KEYS:
            raise ValueError(f"unknown SAVOIAS category {cat!r}; expected one of {', '.join(SAVOIAS_KEYS)}")
        folder = images_root / cat
        xlsx = gt_root / f"global_ranking_{SAVOIAS_KEYS[cat]}.xlsx"
        if not folder.is_dir() or not xlsx.is_file():
            raise ValueError(f"{root}: category {cat!r} needs {folder} and {xlsx}")
        scores = read_xlsx_column(xlsx)
        files = {int(p.stem): p for p in folder.iterdir()
                 if p.stem.isdigit() and p.suffix.lower() in IMAGE_SUFFIXES}
        if sorted(files) != list(range(len(scores))):
            raise ValueError(f"{folder}: {len(files)} numbered images but {xlsx} lists {len(scores)} "
                             "scores; expected images 0..N-1 matching the rows")
        for i, score in enumerate(scores):
            listed_path(folder, files[i].name, f"{xlsx}: row {i + 2}")
            name = f"{cat.replace(' ', '_')}_{i}{files[i].suffix.lower()}"
            value = _score(str(score / 100.0), f"{xlsx}: row {i + 2}")
            entries.append(Entry(name, files[i], value, seeded_split(name, seed, test_fraction), cat))
    return _checked(entries, str(root))


# ------------------------------------------------------------------------------------- folder
def read_folder(root: Path, csv_path: Path, seed: int, test_fraction: float) -> list[Entry]:
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: CSV not found")
    entries: list[Entry] = []
    with io.StringIO(_read_text(csv_path), newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "score"] or len(header) > 3 or (len(header) == 3 and header[2] != "split"):
            raise ValueError(f"{csv_path}:1: expected header 'image,score[,split]', got {','.join(header)!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            where = f"{csv_path}:{lineno}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} comma-separated fields, got {len(row)}")
            name = row[0].strip()
            score = _score(row[1].strip(), where) if row[1].strip() else None
            split = row[2].strip() if len(row) == 3 else seeded_split(name, seed, test_fraction)
            if split not in ("train", "test", "val", "unlabeled"):
                raise ValueError(f"{where}: split {split!r} is not one of train, test, val, unlabeled")
            entries.append(Entry(name, listed_path(root, name, where), score, split, Path(name).parent.name))
    _require_rows(entries, csv_path, "rows 'image,score[,split]' below the header")
    return _checked(entries, str(csv_path))
