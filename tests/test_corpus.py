"""The pretraining corpus (``pretrain.data``): listing, archives, prepared datasets, content-hash
leakage against the evaluation images, the hash index, unreadable files and a pretraining run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clic.config import DataConfig, PretrainConfig
from clic.data.corpus import (
    Leak,
    corpus_hashes,
    corpus_records,
    evaluation_hashes,
    evaluation_records,
    find_leaks,
    leaks,
    read_index,
)
from clic.data.dataset import ViewDataset
from clic.data.imageio import content_hash, hamming, load_rgb, perceptual_hash, resize_short
from clic.data.prepare import prepare
from clic.data.table import read_table
from clic.engine import checkpoint as ckpt
from clic.params import from_dict, pretrain_config
from clic.pretrain import run

from .conftest import tiny_overrides


def _image(path: Path, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
    return path


def test_folders_are_walked_recursively_in_a_fixed_order(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for rel in ("z.png", "b/c/y.jpg", "a/x.png", "a/w.PNG", "b/v.bmp"):
        _image(root / rel, len(rel))
    _image(root / ".hidden.png", 1)
    _image(root / ".cache" / "thumb.png", 2)
    (root / "SOURCES.md").write_text("not an image")
    outside = _image(tmp_path / "elsewhere" / "out.png", 3)
    (root / "b" / "link-out.png").symlink_to(outside)
    (root / "b" / "link-in.png").symlink_to(root / "z.png")
    (root / "linked-folder").symlink_to(tmp_path / "elsewhere")

    records = corpus_records([root], tmp_path / "work")
    assert [r.name for r in records] == ["photos/z.png", "photos/a/w.PNG", "photos/a/x.png", "photos/b/link-in.png",
                                         "photos/b/v.bmp", "photos/b/c/y.jpg"]
    assert all(Path(r.path).is_absolute() and r.split == "unlabeled" and r.score is None for r in records)
    assert [r.category for r in records] == ["", "a", "a", "b", "b", "b"]
    assert corpus_records([root], tmp_path / "work") == records
    # two entries with the same folder name keep unique names
    other = tmp_path / "more" / "photos"
    _image(other / "z.png", 9)
    names = [r.name for r in corpus_records([root, other], tmp_path / "work")]
    assert len(names) == len(set(names)) == 7 and names[-1] == "photos~1/z.png"


def test_missing_or_empty_entries_name_the_setting(tmp_path: Path) -> None:
    _image(tmp_path / "ok" / "a.png", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"pretrain.data\[1\]: .*nope does not exist"):
        corpus_records([tmp_path / "ok", tmp_path / "nope"], tmp_path / "work")
    with pytest.raises(ValueError, match=r"pretrain.data\[0\]: .*empty holds no images"):
        corpus_records([tmp_path / "empty"], tmp_path / "work")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"pretrain.data\[0\]: .*notes.txt is not a folder"):
        corpus_records([tmp_path / "notes.txt"], tmp_path / "work")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_corpus_is_extracted_once(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    for rel in ("a/1.png", "b/2.jpg", "3.png"):
        _image(src / rel, len(rel))
    archive = tmp_path / f"web.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(src.rglob("*.*")):
                zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src, arcname="top")
    work = tmp_path / "work"
    records = corpus_records([archive], work)
    prefix = "web/" if kind == "zip" else "web/top/"
    assert sorted(r.name for r in records) == sorted(f"{prefix}{x}" for x in ("3.png", "a/1.png", "b/2.jpg"))
    folders = [p for p in work.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["web"] and (work / "web.source.json").is_file()  # the cache's marker
    stamp = folders[0].stat().st_mtime_ns
    assert corpus_records([archive], work) == records  # the same archive: not extracted again
    assert [p for p in work.iterdir() if p.is_dir()] == folders and folders[0].stat().st_mtime_ns == stamp
    assert all(Path(r.path).is_relative_to(folders[0]) for r in records)
    os.utime(archive, ns=(1, 1))  # touched, same content: its hash says so, nothing extracted
    assert corpus_records([archive], work) == records and folders[0].stat().st_mtime_ns == stamp


def test_prepared_dataset_as_corpus_uses_its_cache_and_hashes(tiny_prepared: Path, tmp_path: Path) -> None:
    table = read_table(tiny_prepared)
    records = corpus_records([tiny_prepared], tmp_path / "work")
    assert len(records) == len(table) == 64
    assert all(r.split == "unlabeled" and r.score is None and Path(r.cache).is_file() for r in records)
    assert [r.sha256 for r in records] == [r.sha256 for r in table]
    index = tmp_path / "work" / "hashes.jsonl"
    hashes = corpus_hashes(records, index, workers=1, progress=False)
    assert len(hashes.sha) == 64 and [hashes.sha[r.name] for r in records] == [r.sha256 for r in table]
    # the prepared test split is then entirely "in the corpus", by its pixels
    evaluation = evaluation_hashes(evaluation_records(table, "split"), tiny_prepared, index, 1, False)
    found = leaks(hashes, evaluation, max_bits=-1)
    assert sorted({x.evaluation for x in found}) == sorted(r.name for r in table if r.split == "test")
    assert all(x.exact and x.bits == 0 for x in found)


@pytest.fixture()
def labelled(tmp_path: Path, photos: list[Path]) -> Path:
    """A prepared folder dataset of the real photos: 0-4 train, 5-7 test."""
    folder = tmp_path / "labelled"
    folder.mkdir()
    rows = []
    for i, ph in enumerate(photos):
        (folder / f"{i}{ph.suffix}").write_bytes(ph.read_bytes())
        rows.append(f"{i}{ph.suffix},{0.1 * (i + 1):.2f},{'train' if i < 5 else 'test'}")
    (folder / "scores.csv").write_text("image,score,split\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(source="folder", path=str(folder), csv=str(folder / "scores.csv"), cache_size=48,
                     raw_dir=str(tmp_path / "raw"), out_dir=str(tmp_path / "prepared"))
    return prepare(cfg, workers=1)


def test_evaluation_images_in_the_corpus_are_found_by_pixels(labelled: Path, photos: list[Path],
                                                             tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "copy.png").write_bytes(photos[5].read_bytes())  # test image 5, the same file
    # test image 7 (a PNG) re-encoded as BMP: other bytes, the same pixels
    (corpus / "nested").mkdir()
    load_rgb(photos[7]).save(corpus / "nested" / "reencoded.bmp")
    (corpus / "train-copy.jpg").write_bytes(photos[0].read_bytes())  # a train image
    _image(corpus / "unrelated.png", 42)
    records = corpus_records([corpus], tmp_path / "work")
    hashes = corpus_hashes(records, tmp_path / "work" / "hashes.jsonl", workers=2, progress=False)
    assert hashes.hashed == 4 and not hashes.errors
    assert hashes.sha["corpus/nested/reencoded.bmp"] == content_hash(load_rgb(photos[7]))
    assert (corpus / "nested" / "reencoded.bmp").read_bytes() != photos[7].read_bytes()
    table = read_table(labelled)
    index = tmp_path / "work" / "hashes.jsonl"

    def found(mode: str) -> list[tuple[str, str]]:
        evaluation = evaluation_hashes(evaluation_records(table, mode), labelled, index, 1, False)
        return [(x.corpus, x.evaluation) for x in leaks(hashes, evaluation, max_bits=-1)]

    assert found("split") == [("corpus/copy.png", "5.png"), ("corpus/nested/reencoded.bmp", "7.png")]
    # with cross-validation every labelled image is evaluated: the train copy leaks too
    every = [("corpus/train-copy.jpg", "0.jpg"), ("corpus/copy.png", "5.png"), ("corpus/nested/reencoded.bmp", "7.png")]
    assert found("cv") == every
    assert [(x.corpus, x.evaluation) for x in find_leaks(records, table, labelled, -1, index=index,
                                                          progress=False)] == every


def test_perceptual_hash_is_the_dct_hash_of_its_definition(photos: list[Path]) -> None:
    """pHash by hand on one photo: grey 32x32 Lanczos, 2-D DCT-II, 8x8 low frequencies > median."""
    from scipy.fft import dct

    img = load_rgb(photos[0])
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(grey, axis=0), axis=1)[:8, :8]
    bits = "".join("1" if v > np.median(low) else "0" for v in low.ravel())
    assert perceptual_hash(img) == int(bits, 2) and bits.count("1") == 32
    assert hamming(np.array([0b1011], np.uint64), np.array([0, 0b1000], np.uint64)).tolist() == [[3, 2]]


def test_resized_reencoded_copy_of_an_evaluation_photo_is_caught(labelled: Path, photos: list[Path],
                                                                 tmp_path: Path) -> None:
    """The calibration case (research/calibrate_leaks.py): an evaluation photo shrunk and saved as a
    low-quality JPEG has other pixels, so only the perceptual hash finds it; resized, re-encoded
    copies of the other (distinct) photos are not taken for it."""
    import io

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, ph in enumerate(photos):  # every photo shrunk to a short side of 96 px, JPEG quality 50
        if i in (5, 7):
            continue
        img = resize_short(load_rgb(ph), 96)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=50)
        (corpus / f"web-{i}.jpg").write_bytes(buf.getvalue())
    records = corpus_records([corpus], tmp_path / "work")
    table = read_table(labelled)
    leaks_found = find_leaks(records, evaluation_records(table, "split"), labelled,
                             index=tmp_path / "work" / "hashes.jsonl", workers=1, progress=False)
    assert [(x.corpus, x.evaluation, x.exact) for x in leaks_found] == [("corpus/web-6.jpg", "6.jpg", False)]
    assert leaks_found[0].bits <= 4 and "near-duplicate" in str(leaks_found[0])  # other pixels, ~the same hash
    # identical pixels only: the copy is not found
    assert find_leaks(records, evaluation_records(table, "split"), labelled, -1,
                      index=tmp_path / "work" / "hashes.jsonl", progress=False) == []
    # the distinct photos lie far apart: the nearest pair of different photos is > 4 bits
    hashes = np.array([perceptual_hash(load_rgb(p)) for p in photos], dtype=np.uint64)
    d = hamming(hashes, hashes)
    assert d[~np.eye(len(photos), dtype=bool)].min() > 4
    assert isinstance(leaks_found[0], Leak)


def test_hash_index_hashes_only_new_or_changed_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    paths = [_image(corpus / f"{i}.png", i) for i in range(5)]
    index = tmp_path / "work" / "hashes.jsonl"
    first = corpus_hashes(corpus_records([corpus], tmp_path / "work"), index, workers=1, progress=False)
    assert first.hashed == 5 and len(read_index(index)) == 5
    assert first.phash["corpus/3.png"] == perceptual_hash(load_rgb(paths[3]))
    again = corpus_hashes(corpus_records([corpus], tmp_path / "work"), index, workers=1, progress=False)
    assert again.hashed == 0 and again.sha == first.sha and again.phash == first.phash
    # an index written before perceptual hashes: those files are decoded once more
    index.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "phash"}) + "\n"
                             for e in read_index(index).values()))
    assert corpus_hashes(corpus_records([corpus], tmp_path / "work"), index, workers=1, progress=False).hashed == 5
    _image(paths[2], 99)  # rewritten: other size or mtime
    os.utime(paths[2], ns=(1, 1))
    _image(corpus / "new.png", 7)
    third = corpus_hashes(corpus_records([corpus], tmp_path / "work"), index, workers=1, progress=False)
    assert third.hashed == 2 and third.sha["corpus/2.png"] != first.sha["corpus/2.png"]
    assert third.sha["corpus/2.png"] == content_hash(load_rgb(paths[2]))
    # a line cut short by a crash is ignored (that file is hashed again), the rest is kept
    index.write_text(index.read_text() + '{"path": "/x", "si')
    assert len(read_index(index)) == 6


def test_unreadable_corpus_files_are_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = tmp_path / "corpus"
    for i in range(4):
        _image(corpus / f"{i}.png", i)
    (corpus / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    records = corpus_records([corpus], tmp_path / "work")
    hashes = corpus_hashes(records, tmp_path / "work" / "hashes.jsonl", workers=1, progress=False)
    assert sorted(hashes.errors) == ["corpus/1.png"] and "1.png" in hashes.errors["corpus/1.png"]
    assert len(hashes.sha) == 3
    # the next call remembers the failure without decoding again
    assert corpus_hashes(records, tmp_path / "work" / "hashes.jsonl", progress=False).errors == hashes.errors
    ds = ViewDataset(records, tmp_path, lambda img: {"size": img.size, "pixels": np.asarray(img).sum()})
    with caplog.at_level(logging.WARNING, logger="clic.data.dataset"):
        sample = ds[1]
    assert "corpus/1.png" in caplog.text
    assert sample["image_id"] == 2 and sample["pixels"] == ds[2]["pixels"]  # its neighbour took its place


def test_pretrain_data_is_one_list_for_every_method() -> None:
    params = {"pretrain": {"data": ["a", "b/c.zip"], "common": {"epochs": 1}, "clicv2": {"backbone": "vit_tiny"}}}
    assert {pretrain_config(params, m).data for m in ("moco", "clic", "clicv2")} == {("a", "b/c.zip")}
    assert pretrain_config({"pretrain": {"data": "photos"}}, "moco").data == ("photos",)
    assert pretrain_config({}, "moco").data == ()
    with pytest.raises(ValueError, match=r"pretrain.clic.data: the pretraining corpus is set once, as pretrain.data"):
        pretrain_config({"pretrain": {"clic": {"data": ["x"]}}}, "clic")
    with pytest.raises(ValueError, match=r"pretrain.data\[1\] is empty"):
        pretrain_config({"pretrain": {"data": ["a", " "]}}, "moco")
    with pytest.raises(ValueError, match=r"pretrain.data: expected a list"):
        pretrain_config({"pretrain": {"data": {"a": 1}}}, "moco")


def test_pretraining_runs_on_the_corpus(tiny_prepared: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for i in range(16):
        _image(corpus / f"src{i % 3}" / f"{i}.jpg", i, size=48)
    (corpus / "src0" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    cfg = from_dict(PretrainConfig, {"method": "moco", **tiny_overrides("moco"), "epochs": 1,
                                     "data": [str(corpus)]})
    encoder = run(cfg, tiny_prepared, tmp_path / "out", progress=False, corpus_dir=tmp_path / "work")
    metrics = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert metrics["steps"] == 2  # 17 corpus files / batch 8 (the prepared train split would give 6)
    assert np.isfinite(metrics["loss"])
    assert ckpt.load(encoder)["config"]["data"] == [str(corpus)]
    # max_images spreads over the sorted listing: every source folder contributes
    from clic.pretrain import pretraining_records

    few = pretraining_records(from_dict(PretrainConfig, {"data": [str(corpus)], "max_images": 4}), tiny_prepared)
    assert [r.category for r in few] == ["src0", "src0", "src1", "src2"]  # 7, 5 and 5 files


@pytest.mark.slow
def test_validate_stage_fails_on_an_evaluation_image_in_the_corpus(tmp_path: Path) -> None:
    from .test_pipeline import _env, make_project

    corpus = tmp_path / "corpus"
    _image(corpus / "web" / "unrelated.png", 5)

    def tweak(p: dict) -> None:
        p["pretrain"]["data"] = [str(corpus)]
        p["validate"]["min_rows"] = 2

    root = make_project(tmp_path / "proj", tweak)
    stage = lambda name: subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=root,  # noqa: E731
                                        capture_output=True, text=True, timeout=600, env=_env())
    assert stage("fetch").returncode == 0
    res = stage("validate")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((root / "metrics" / "validation.json").read_text())
    assert summary["corpus"]["images"] == 1 and summary["corpus"]["evaluation_images_in_corpus"] == 0
    test_row = next(r for r in read_table(root / "data" / "prepared") if r.split == "test")
    load_rgb(root / "data" / "prepared" / test_row.path).save(corpus / "web" / "copied.bmp")  # re-encoded
    res = stage("validate")
    assert res.returncode == 2
    assert "in_pretraining_corpus: 1 unexpected rows" in res.stderr
    assert f"{test_row.name} = corpus/web/copied.bmp" in res.stderr
    assert (root / "data" / "corpus" / "hashes.jsonl").is_file()
