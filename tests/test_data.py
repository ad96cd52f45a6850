from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clic.config import DataConfig, SyntheticConfig
from clic.data.archive import ArchiveError, safe_extract
from clic.data.imageio import ImageError, load_rgb, to_rgb
from clic.data.prepare import prepare
from clic.data.sources import read_folder, read_ic9600, read_savoias, read_xlsx_column
from clic.data.synthetic import generate_classification, generate_ic9600, render
from clic.data.table import read_table


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_in_ic9600_layout(tmp_path: Path) -> None:
    a = generate_ic9600(tmp_path / "a", seed=1, n_train=6, n_test=3, size=48, categories=("shapes", "texture"))
    b = generate_ic9600(tmp_path / "b", seed=1, n_train=6, n_test=3, size=48, categories=("shapes", "texture"))
    c = generate_ic9600(tmp_path / "c", seed=2, n_train=6, n_test=3, size=48, categories=("shapes", "texture"))
    assert _digest(a) == _digest(b) != _digest(c)
    lines = (a / "train.txt").read_text().splitlines()
    assert len(lines) == 6 and all("  " in line for line in lines)
    entries = read_ic9600(a)
    assert [e.split for e in entries].count("test") == 3
    assert {e.category for e in entries} == {"shapes", "texture"}
    assert all(0.0 <= e.score <= 1.0 for e in entries)  # type: ignore[operator]


def test_synthetic_complexity_rises_with_the_label() -> None:
    """The generator's knobs must move the image statistics the label claims to measure."""
    import torch

    from clic.transforms.masking import image_entropy, patch_entropy

    for style in ("shapes", "texture", "stripes", "mixed"):
        ents = []
        for z in (0.05, 0.95):
            vals = []
            for i in range(6):
                img, _ = render(7, i, 64, style, z=z)
                x = torch.from_numpy(np.array(img.crop((0, 0, 64, 64)))).permute(2, 0, 1)[None]
                vals.append(float(patch_entropy(x, 8).mean() + image_entropy(x).mean()))
            ents.append(np.mean(vals))
        assert ents[1] > ents[0], (style, ents)


def test_classification_set_layout(tmp_path: Path) -> None:
    root = generate_classification(tmp_path, seed=0, n_classes=3, n_train=2, n_val=1, size=40)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "square", "triangle"]
    assert len(list((root / "val" / "circle").glob("*.png"))) == 1


# ------------------------------------------------------------------------------- IC9600 reader
def _ic9600(tmp_path: Path, lines: list[str], images: tuple[str, ...] = ("a_1.jpg", "b 2_3.jpg")) -> Path:
    root = tmp_path / "ic"
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(images):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / "images" / name)
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_ic9600_names_with_single_spaces(tmp_path: Path) -> None:
    entries = read_ic9600(_ic9600(tmp_path, ["a_1.jpg  0.5", "b 2_3.jpg  0.25"]))
    assert [(e.name, e.score, e.category) for e in entries] == [("a_1.jpg", 0.5, "a"), ("b 2_3.jpg", 0.25, "b 2")]


def test_ic9600_trailing_whitespace_is_accepted(tmp_path: Path) -> None:
    """IC9600's own parser strips each line before splitting on two spaces."""
    entries = read_ic9600(_ic9600(tmp_path, ["a_1.jpg  0.5   ", "b 2_3.jpg  0.25 \t"]))
    assert [(e.name, e.score) for e in entries] == [("a_1.jpg", 0.5), ("b 2_3.jpg", 0.25)]


@pytest.mark.parametrize(("lines", "message"), [
    (["a_1.jpg\t0.5"], r"train.txt:1: expected '<image name><two spaces><score>' \(found a tab\)"),
    (["a_1.jpg 0.5"], r"train.txt:1: .*\(found a single space\)"),
    (["a_1.jpg  0.5", "b 2_3.jpg 0.25  "], r"train.txt:2: .*\(found a single space\)"),
    # a name with single spaces and no score is not a separator problem: no hint
    (["a_1.jpg  0.5", "b 2_3.jpg  "], r"train.txt:2: expected '<image name><two spaces><score>', got 'b 2_3.jpg  '"),
    (["a_1.jpg  0.5  x"], r"train.txt:1: expected '<image name><two spaces><score>', got"),
    (["a_1.jpg  0.5", "b 2_3.jpg  1.5"], r"train.txt:2: score 1.5 is outside \[0, 1\]"),
    (["a_1.jpg  high"], r"train.txt:1: score 'high' is not a number"),
    (["a_1.jpg  0.5", "a_1.jpg  0.4"], r"duplicate image name 'a_1.jpg'"),
    (["missing_1.jpg  0.5"], r"missing_1.jpg: image listed .* is missing"),
])
def test_ic9600_bad_annotations(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_ic9600(_ic9600(tmp_path, lines))


# ---------------------------------------------------------------------------- image decoding
def test_modes_become_rgb(photos: list[Path]) -> None:
    base = load_rgb(photos[0])
    grey = base.convert("L")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white
    p_trans = base.convert("P")
    p_trans.info["transparency"] = 0
    i16 = Image.fromarray(np.asarray(grey).astype("<u2") * 257).convert("I;16")
    for img in (grey, rgba, p_trans, base.convert("CMYK"), i16):
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == base.size
    assert np.all(np.asarray(to_rgb(rgba)) == 255)
    assert np.abs(np.asarray(to_rgb(i16))[..., 0].astype(int) - np.asarray(grey).astype(int)).max() <= 1


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (30, 60)



def test_reduced_jpeg_decoding_keeps_min_size_and_content(tmp_path: Path) -> None:
    img, _ = render(0, 3, 640, "mixed")
    jpg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    img.resize((640, 480)).save(jpg, quality=95)
    img.resize((640, 480)).save(png)
    full = load_rgb(jpg)
    small = load_rgb(jpg, min_size=100)  # 1/4 scale: 160 x 120 is the smallest with both sides >= 100
    assert full.size == (640, 480) and small.size == (160, 120)
    assert load_rgb(jpg, min_size=200).size == (320, 240)
    assert load_rgb(jpg, min_size=300).size == (640, 480)  # half scale would give a 240 px short side
    assert load_rgb(png, min_size=100).size == (640, 480)  # only JPEG has DCT scaling
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(small, dtype=float) - reference).mean() < 4.0  # same picture, 8-bit levels
def test_truncated_and_corrupt_images_name_the_file(tmp_path: Path, photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    for bad in (trunc, junk):
        with pytest.raises(ImageError, match=bad.name):
            load_rgb(bad)


def test_decompression_bomb_is_refused(photos: list[Path]) -> None:
    with pytest.raises(ImageError, match="exceeds the limit of 1000"):
        load_rgb(photos[0], max_pixels=1000)


# --------------------------------------------------------------------------------- archives
def _zip_with(path: Path, name: str, data: bytes = b"x", symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize(("name", "symlink", "message"), [
    ("/etc/passwd", False, "absolute path"),
    ("../evil.txt", False, r"escapes the extraction folder"),
    ("images/link", True, "symbolic link"),
])
def test_zip_refuses_unsafe_members(tmp_path: Path, name: str, symlink: bool, message: str) -> None:
    archive = _zip_with(tmp_path / "a.zip", name, symlink=symlink)
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_tar_refuses_links_devices_and_oversize(tmp_path: Path) -> None:
    def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> Path:
        path = tmp_path / f"{member.name.replace('/', '_')}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.addfile(member, io.BytesIO(data) if data else None)
        return path

    link = tarfile.TarInfo("images/l")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    dev = tarfile.TarInfo("images/dev")
    dev.type = tarfile.CHRTYPE
    big = tarfile.TarInfo("images/big.jpg")
    big.size = 10
    for member, data, message in ((link, b"", "is a link"), (dev, b"", "not a regular file"),
                                  (big, b"0123456789", "over the 5-byte limit")):
        with pytest.raises(ArchiveError, match=message):
            safe_extract(tar_with(member, data), tmp_path / "out", max_member_bytes=5)


def test_ic9600_archive_prepares_like_the_folder(tmp_path: Path) -> None:
    src = generate_ic9600(tmp_path / "IC9600", seed=0, n_train=4, n_test=2, size=40, categories=("scenes",))
    archive = tmp_path / "ic9600.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="IC9600")
    common = {"cache_size": 32, "raw_dir": str(tmp_path / "raw")}
    a = prepare(DataConfig(source="ic9600", path=str(archive), out_dir=str(tmp_path / "pa"), **common), workers=1)
    b = prepare(DataConfig(source="ic9600", path=str(src), out_dir=str(tmp_path / "pb"), **common), workers=1)
    ra, rb = read_table(a), read_table(b)
    assert [(r.name, r.sha256, r.score) for r in ra] == [(r.name, r.sha256, r.score) for r in rb]
    assert all(max(Image.open(r.image_path(a)).size) >= 32 == min(Image.open(r.image_path(a)).size) for r in ra)


# --------------------------------------------------------------------------------- SAVOIAS
def _xlsx(path: Path, values: list[float]) -> None:
    rows = '<row r="1"><c r="A1" t="s"><v>0</v></c></row>' + "".join(
        f'<row r="{i + 2}"><c r="A{i + 2}"><v>{v}</v></c></row>' for i, v in enumerate(values))
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/sharedStrings.xml", f'<sst xmlns="{ns}"><si><t>gt</t></si></sst>')
        zf.writestr("xl/worksheets/sheet1.xml", f'<worksheet xmlns="{ns}"><sheetData>{rows}</sheetData></worksheet>')


def test_savoias_reads_xlsx_and_splits_by_seed(tmp_path: Path) -> None:
    root = tmp_path / "Savoias-Dataset"
    (root / "Images" / "Art").mkdir(parents=True)
    (root / "Ground truth" / "xlsx").mkdir(parents=True)
    (root / "Ground truth" / "npy").mkdir(parents=True)
    (root / "Ground truth" / "npy" / "global_ranking_art.npy").write_bytes(b"\x93NUMPY pickle never loaded")
    scores = [10.0, 55.5, 90.0, 0.0, 100.0, 42.0]
    for i in range(len(scores)):
        Image.fromarray(np.full((40, 40, 3), i * 30, np.uint8)).save(root / "Images" / "Art" / f"{i}.jpg")
    (root / "Images" / "Art" / "global_ranking").write_text("stray file the real clone has")
    _xlsx(root / "Ground truth" / "xlsx" / "global_ranking_art.xlsx", scores)
    assert read_xlsx_column(root / "Ground truth" / "xlsx" / "global_ranking_art.xlsx") == scores
    entries = read_savoias(root, ["Art"], seed=0, test_fraction=0.5)
    assert [e.score for e in entries] == pytest.approx([s / 100 for s in scores])
    assert entries[1].name == "Art_1.jpg" and entries[1].path.name == "1.jpg"
    again = read_savoias(root, ["Art"], seed=0, test_fraction=0.5)
    assert [e.split for e in entries] == [e.split for e in again]
    (root / "Images" / "Art" / "6.jpg").write_bytes((root / "Images" / "Art" / "0.jpg").read_bytes())
    with pytest.raises(ValueError, match="7 numbered images but .* lists 6 scores"):
        read_savoias(root, ["Art"], seed=0, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown SAVOIAS category 'Cats'"):
        read_savoias(root, ["Cats"], seed=0, test_fraction=0.5)


# ---------------------------------------------------------------------------------- folder
def test_folder_source_and_its_errors(tmp_path: Path, photos: list[Path]) -> None:
    for p in photos[:3]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    good = tmp_path / "scores.csv"
    good.write_text(f"image,score,split\n{photos[0].name},0.2,train\n{photos[1].name},0.9,test\n{photos[2].name},,train\n")
    entries = read_folder(tmp_path, good, 0, 0.3)
    assert [(e.score, e.split) for e in entries] == [(0.2, "train"), (0.9, "test"), (None, "train")]
    for text, message in ((f"image;score\n{photos[0].name};0.2\n", r"scores.csv:1: expected header"),
                          (f"image,score\n{photos[0].name},2\n", r"scores.csv:2: score 2.0 is outside"),
                          (f"image,score,split\n{photos[0].name},0.1,holdout\n", r"scores.csv:2: split 'holdout'")):
        good.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_folder(tmp_path, good, 0, 0.3)


# -------------------------------------------------------------------------------- prepare
def test_prepare_fails_whole_and_keeps_the_previous_output(tmp_path: Path, photos: list[Path]) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in photos[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(f"image,score,split\n{photos[0].name},0.1,train\n{photos[1].name},0.7,test\n")
    cfg = DataConfig(source="folder", path=str(folder), csv=str(csv_path), out_dir=str(tmp_path / "prep"),
                     cache_size=48, min_size=32)
    out = prepare(cfg, workers=1)
    rows = read_table(out)
    assert [r.name for r in rows] == [photos[0].name, photos[1].name]
    assert all(min(Image.open(out / r.cache).size) == 48 for r in rows)
    assert len({r.sha256 for r in rows}) == 2
    # same inputs: kept as they are (no rebuild); a changed label or --force rebuilds
    stamp = (out / "table.csv").stat().st_mtime_ns
    assert prepare(cfg, workers=1) == out and (out / "table.csv").stat().st_mtime_ns == stamp
    csv_path.write_text(f"image,score,split\n{photos[0].name},0.2,train\n{photos[1].name},0.7,test\n")
    assert [r.score for r in read_table(prepare(cfg, workers=1))] == pytest.approx([0.2, 0.7])
    stamp = (out / "table.csv").stat().st_mtime_ns
    assert (prepare(cfg, workers=1, force=True) / "table.csv").stat().st_mtime_ns != stamp
    before = (out / "table.csv").read_text()
    # corrupt one image: the whole prepare fails, names it, and the previous table survives
    (folder / photos[1].name).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=rf"1 of 2 images are unusable:\n  .*{photos[1].name}"):
        prepare(cfg, workers=1)
    assert (out / "table.csv").read_text() == before
    assert not list(tmp_path.glob("prep.partial*"))
    # corrupted in the middle of its entropy-coded data: Pillow decodes it into garbage without a
    # word, prepare names it
    buf = io.BytesIO()
    Image.open(photos[1]).convert("RGB").save(buf, "JPEG")  # skimage's coffee
    data = bytearray(buf.getvalue())
    mid = len(data) // 2
    for i in range(mid, mid + 40):  # bits flipped, no marker byte made or broken
        if data[i] != 0xFF and data[i] ^ 0x55 != 0xFF:
            data[i] ^= 0x55
    (folder / photos[1].name).write_bytes(bytes(data))
    Image.open(folder / photos[1].name).load()  # what Pillow alone says: nothing
    with pytest.raises(ValueError, match=rf"{photos[1].name}: corrupt JPEG data \(Corrupt JPEG data"):
        prepare(cfg, workers=1)
    assert (out / "table.csv").read_text() == before


def test_prepare_refuses_images_below_min_size(tmp_path: Path) -> None:
    root = _ic9600(tmp_path, ["a_1.jpg  0.5"], images=("a_1.jpg",))
    Image.new("RGB", (20, 60)).save(root / "images" / "a_1.jpg")
    cfg = DataConfig(source="ic9600", path=str(root), out_dir=str(tmp_path / "p"), min_size=32)
    with pytest.raises(ValueError, match=r"20x60 is smaller than the minimum side of 32"):
        prepare(cfg, workers=1)


def test_synthetic_prepare_counts(tiny_prepared: Path) -> None:
    assert len(read_table(tiny_prepared, ["train"])) == 48
    assert len(read_table(tiny_prepared, ["test"])) == 16
    cfg = SyntheticConfig()
    assert cfg.n_train > 0


# ------------------------------------------------------------------ reliability (issue 10)
def _ic9600_tree(root: Path, labels: dict[str, float], shade: int = 0, test: str | None = None) -> Path:
    """An IC9600-layout folder: one 40x40 image per name (grey level ``shade + 20 i``), labels in
    train.txt, ``test`` as the whole test.txt (None: no test.txt)."""
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(labels):
        Image.fromarray(np.full((40, 40, 3), (shade + 20 * i) % 256, np.uint8)).save(root / "images" / name)
    (root / "train.txt").write_text("".join(f"{n}  {v}\n" for n, v in labels.items()))
    if test is not None:
        (root / "test.txt").write_text(test)
    return root


def _targz(src: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="IC9600")
    return archive


def test_a_changed_archive_under_the_same_name_is_extracted_again(tmp_path: Path) -> None:
    archive = tmp_path / "IC9600.tar.gz"
    _targz(_ic9600_tree(tmp_path / "v1", {"a_1.png": 0.1, "a_2.png": 0.2}), archive)
    cfg = DataConfig(source="ic9600", path=str(archive), raw_dir=str(tmp_path / "raw"),
                     out_dir=str(tmp_path / "prep"), cache_size=0)
    first = read_table(prepare(cfg, workers=1))
    assert [(r.name, r.score) for r in first] == [("a_1.png", 0.1), ("a_2.png", 0.2)]
    extracted = tmp_path / "raw" / "ic9600-IC9600.tar"
    inode = extracted.stat().st_ino
    # the same content written again (new mtime and inode): hashed, found equal, not extracted again
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(archive.read_bytes())
    os.replace(copy, archive)
    assert [r.sha256 for r in read_table(prepare(cfg, workers=1))] == [r.sha256 for r in first]
    assert extracted.stat().st_ino == inode
    # a corrected archive under the same name: new labels, one new image, one more row
    _targz(_ic9600_tree(tmp_path / "v2", {"a_1.png": 0.5, "a_2.png": 0.2, "b_3.png": 0.9}, shade=7), archive)
    second = read_table(prepare(cfg, workers=1))
    assert [(r.name, r.score) for r in second] == [("a_1.png", 0.5), ("a_2.png", 0.2), ("b_3.png", 0.9)]
    assert second[0].sha256 != first[0].sha256
    marker = json.loads((tmp_path / "raw" / "ic9600-IC9600.tar.source.json").read_text())
    assert marker["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    # --force extracts again even when nothing changed
    inode = extracted.stat().st_ino
    assert [r.score for r in read_table(prepare(cfg, workers=1, force=True))] == [0.5, 0.2, 0.9]
    assert extracted.stat().st_ino != inode
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "ic9600-IC9600.tar", "ic9600-IC9600.tar.lock", "ic9600-IC9600.tar.source.json"]


def _escape(kind: str, base: Path, host: Path) -> str:
    """An image name pointing at ``host`` (outside ``base``) by ``kind``."""
    if kind == "absolute":
        return str(host)
    if kind == "dotdot":
        return os.path.relpath(host, base)
    (base / "link.png").symlink_to(host)
    return "link.png"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_ic9600_names_must_stay_inside_the_dataset(tmp_path: Path, kind: str) -> None:
    host = tmp_path / "host" / "photo.png"
    host.parent.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(host)
    root = _ic9600_tree(tmp_path / "ic", {"a_1.png": 0.1})
    name = _escape(kind, root / "images", host)
    with (root / "train.txt").open("a") as fh:
        fh.write(f"{name}  0.5\n")
    reason = {"dotdot": "has a '..' component", "absolute": "is an absolute path", "symlink": "is a link to"}[kind]
    with pytest.raises(ValueError, match=rf"train.txt:2: image '{re.escape(name)}' {reason}"):
        read_ic9600(root)
    cfg = DataConfig(source="ic9600", path=str(root), out_dir=str(tmp_path / "prep"), raw_dir=str(tmp_path / "raw"))
    with pytest.raises(ValueError, match="train.txt:2"):
        prepare(cfg, workers=1)
    assert not (tmp_path / "prep").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_folder_csv_names_must_stay_inside_the_folder(tmp_path: Path, kind: str) -> None:
    host = tmp_path / "host.png"
    Image.new("RGB", (40, 40)).save(host)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "ok.png")
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(f"image,score\nok.png,0.1\n{_escape(kind, folder, host)},0.2\n")
    with pytest.raises(ValueError, match=r"s.csv:3: image .* (has a '..'|is an absolute|is a link to)"):
        read_folder(folder, csv_path, 0, 0.3)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_an_archive_cannot_list_host_files(tmp_path: Path, kind: str) -> None:
    """Safe extraction is not bypassed by a train.txt naming files outside the archive."""
    host = tmp_path / "home" / "someone" / "photo.png"
    host.parent.mkdir(parents=True)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(host)
    src = _ic9600_tree(tmp_path / "src", {"a_1.png": 0.1})
    raw = tmp_path / "raw"
    extracted_images = raw / "ic9600-evil.tar" / "IC9600" / "images"
    name = str(host) if kind == "absolute" else os.path.relpath(host, extracted_images)
    with (src / "train.txt").open("a") as fh:
        fh.write(f"{name}  0.9\n")
    archive = _targz(src, tmp_path / "evil.tar.gz")
    cfg = DataConfig(source="ic9600", path=str(archive), raw_dir=str(raw), out_dir=str(tmp_path / "prep"))
    with pytest.raises(ValueError, match=r"train.txt:2: image .* (is an absolute path|has a '..' component)"):
        prepare(cfg, workers=1)
    assert not (tmp_path / "prep").exists()


def _bomb(tmp_path: Path, size: int) -> Path:
    """A .tar.gz of one ``size``-byte member of zeros (about 1000 times smaller packed)."""
    path = tmp_path / "bomb.tar.gz"
    member = tarfile.TarInfo("IC9600/images/a_1.png")
    member.size = size
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(member, io.BytesIO(bytes(size)))
    return path


def test_tar_compression_ratio_and_total_size_are_guarded(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path, 3 * 2**20)
    packed = bomb.stat().st_size
    assert packed < 20_000  # 3 MiB in a few KB
    with pytest.raises(ArchiveError, match=r"expands to over 3145728 bytes from .* ratio limit of 200"):
        safe_extract(bomb, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))
    safe_extract(bomb, tmp_path / "ok", max_ratio=10_000)  # the same archive under a looser limit
    assert (tmp_path / "ok" / "IC9600" / "images" / "a_1.png").stat().st_size == 3 * 2**20
    # limits come from params (data.max_archive_ratio / max_archive_bytes / max_member_bytes)
    common = {"source": "ic9600", "path": str(bomb), "raw_dir": str(tmp_path / "raw"), "out_dir": str(tmp_path / "p")}
    for limits, message in (({"max_archive_ratio": 50.0}, "ratio limit of 50"),
                            ({"max_archive_ratio": 1e5, "max_archive_bytes": 2**21}, "exceeds 2097152 bytes"),
                            ({"max_archive_ratio": 1e5, "max_member_bytes": 2**20}, "over the 1048576-byte limit")):
        with pytest.raises(ArchiveError, match=message):
            prepare(DataConfig(**common, **limits), workers=1)  # type: ignore[arg-type]
    assert not (tmp_path / "p").exists() and not list((tmp_path / "raw").glob("*partial*"))


def test_zip_ratio_limit_comes_from_the_argument(tmp_path: Path) -> None:
    archive = tmp_path / "z.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", bytes(2 * 2**20))
    with pytest.raises(ArchiveError, match="ratio limit of 200"):
        safe_extract(archive, tmp_path / "out")
    assert safe_extract(archive, tmp_path / "out", max_ratio=1e5) == tmp_path / "out"


@pytest.mark.parametrize(("train", "test"), [("", "a_1.png  0.1\n"), ("\n  \n", "a_1.png  0.1\n"),
                                             ("a_1.png  0.1\n", "")])
def test_an_empty_annotation_file_is_refused(tmp_path: Path, train: str, test: str) -> None:
    root = _ic9600_tree(tmp_path / "ic", {"a_1.png": 0.1}, test=test)
    (root / "train.txt").write_text(train)
    empty = "train.txt" if not train.strip() else "test.txt"
    cfg = DataConfig(source="ic9600", path=str(root), out_dir=str(tmp_path / "prep"))
    with pytest.raises(ValueError, match=rf"{empty}: lists no images"):
        prepare(cfg, workers=1)
    assert not (tmp_path / "prep").exists()


def test_a_csv_without_rows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("image,score\n\n")
    with pytest.raises(ValueError, match=r"s.csv: lists no images"):
        read_folder(tmp_path, tmp_path / "s.csv", 0, 0.3)
    (tmp_path / "s.csv").write_bytes(b"image,score\n\xff\xfe.png,0.1\n")
    with pytest.raises(ValueError, match=r"s.csv: not UTF-8 text"):
        read_folder(tmp_path, tmp_path / "s.csv", 0, 0.3)


_CONCURRENT = """
import logging, sys, time
from pathlib import Path
from clic.config import DataConfig
from clic.data.prepare import prepare
logging.basicConfig(level=logging.INFO, format="%(message)s")
root, go = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.01)
prepare(DataConfig(source="ic9600", path=str(root), out_dir=str(root.parent / "prep"), cache_size=32), workers=1)
"""


def test_concurrent_prepares_of_one_output(tmp_path: Path) -> None:
    """Two processes start the same prepare at the same instant: one builds, the other waits for
    it and reuses the result; both succeed."""
    import subprocess
    import sys
    import time

    root = _ic9600_tree(tmp_path / "ic", {f"a_{i}.png": i / 40 for i in range(24)})
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(root), str(go), str(tmp_path / f"ready{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("prepared 24 images" in log for log in logs) == 1, logs
    assert sum("is up to date" in log for log in logs) == 1, logs
    rows = read_table(tmp_path / "prep")
    assert [r.score for r in rows] == pytest.approx([i / 40 for i in range(24)])
    assert all((tmp_path / "prep" / r.cache).is_file() for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("prep")) == ["prep", "prep.lock"]


def test_a_corrupt_zip_member_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "c.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.bin", os.urandom(30_000))
    data = bytearray(archive.read_bytes())
    data[1000:2000] = bytes(1000)  # damage the stored data, keep the headers
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"c.zip: member 'a.bin' is corrupt \(Bad CRC-32"):
        safe_extract(archive, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_a_prepared_table_cannot_point_its_cache_outside(tiny_prepared: Path, tmp_path: Path) -> None:
    """A prepared dataset may come from someone else (pretrain.data): its cache column is checked."""
    bad = tmp_path / "shared-prepared"
    bad.mkdir()
    lines = (tiny_prepared / "table.csv").read_text().splitlines()
    row = lines[2].split(",")
    row[-1] = "../../etc/passwd"
    (bad / "table.csv").write_text("\n".join([lines[0], lines[1], ",".join(row)]) + "\n")
    with pytest.raises(ValueError, match=r"table.csv:3: cache '../../etc/passwd' is not a path inside"):
        read_table(bad)
