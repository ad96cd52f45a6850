"""What a user owns is never deleted, a corpus that cannot be read fails the run by name, and the
small cases of bad input each get a clear answer (docs/operations.md, "Guarantees")."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic import atomic
from clic.cli import main
from clic.config import DataConfig, PretrainConfig, SyntheticConfig
from clic.data.corpus import corpus_hashes, corpus_records, walk_images
from clic.data.prepare import prepare, prepare_transfer
from clic.data.shards import INDEX_NAME, CorpusError, check_index, is_shard_index, local_corpus, write_shards
from clic.data.synthetic import generate_ic9600
from clic.engine.train import ShortEpochError, train_one_epoch
from clic.params import from_dict
from clic.pretrain import run

from .conftest import tiny_overrides
from .test_shards import _tampered


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(folder: Path) -> dict[str, bytes]:
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years of work")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "sub" / "photo.jpg")
    return _tree(folder)


def _data(tmp_path: Path, **kw: object) -> DataConfig:
    settings = {"raw_dir": str(tmp_path / "raw"), "out_dir": str(tmp_path / "prepared"), "cache_size": 0,
                "synthetic": SyntheticConfig(n_train=8, n_test=4, size=48), **kw}
    return DataConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small JPEGs in two source folders."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for i in range(40):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def shards(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "corpus"
    write_shards(corpus_records([corpus]), out, per_shard=4, seed=0, workers=1, progress=False)
    return out


# ------------------------------------------------------------------------ nothing a user owns is deleted
def test_prepare_refuses_a_folder_it_did_not_write_and_leaves_it_whole(tmp_path: Path) -> None:
    users = tmp_path / "mine"
    before = _users_folder(users)
    with pytest.raises(atomic.OutputError, match=r"mine: holds sub, thesis.txt, which no clic command wrote"):
        prepare(_data(tmp_path, out_dir=str(users)), workers=1)
    assert _tree(users) == before
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{raw_dir: {tmp_path / 'raw'}, cache_size: 0}}\n")
    assert main(["data", "prepare", "--params", str(params), "--set", f"data.out_dir={users}"]) == 2
    assert _tree(users) == before
    # a folder it wrote (marked), and one written before folders were marked (its own names only), are replaced
    out = prepare(_data(tmp_path), workers=1)
    assert (out / atomic.MARKER).is_file()
    prepare(_data(tmp_path), workers=1, force=True)
    (out / atomic.MARKER).unlink()
    prepare(_data(tmp_path), workers=1, force=True)
    assert sorted(p.name for p in out.iterdir()) == [atomic.MARKER, "meta.json", "table.csv"]


def test_an_output_is_never_its_input_nor_around_or_inside_it(tmp_path: Path) -> None:
    source = generate_ic9600(tmp_path / "ic9600", seed=0, n_train=6, n_test=3, size=48, categories=("shapes",))
    before = _tree(source)
    for out in (source, source / "prepared", tmp_path):  # in place, inside the dataset, around it
        cfg = _data(tmp_path, source="ic9600", path=str(source), out_dir=str(out))
        with pytest.raises(atomic.OutputError, match=r"the output (is|lies inside|contains) the input"):
            prepare(cfg, workers=1)
    assert _tree(source) == before and (source / "images").is_dir()
    with pytest.raises(atomic.OutputError, match="contains the input"):
        prepare_transfer(_data(tmp_path), tmp_path, seed=0)  # around data.out_dir / raw_dir


def test_every_command_that_writes_refuses_what_the_user_owns(tmp_path: Path, corpus: Path, shards: Path,
                                                              tiny_prepared: Path) -> None:
    users = tmp_path / "mine"
    before = _users_folder(users)
    params = tmp_path / "params.yaml"
    params.write_text(f"seed: 0\ndata: {{raw_dir: {tmp_path / 'raw'}, out_dir: {tmp_path / 'prepared'}, cache_size: 0, "
                      "synthetic: {n_train: 8, n_test: 4, size: 48}}\n")
    photo = users / "sub" / "photo.jpg"
    commands = [
        ["data", "shard", "--params", str(params), "--out", str(users), "--no-progress", str(corpus)],
        ["data", "shard", "--params", str(params), "--out", str(users), "--force", str(corpus)],
        ["data", "shard", "--params", str(params), "--out", str(corpus / "a" / "shards"), str(corpus)],
        ["pretrain", "--method", "moco", "--params", str(params), "--out", str(users), "--data", str(tiny_prepared)],
        ["pretrain", "--method", "moco", "--params", str(params), "--out", str(tiny_prepared / "run"),
         "--data", str(tiny_prepared)],
        ["probe", "--params", str(params), "--baseline", "handcrafted", "--data", str(tiny_prepared), "--out",
         str(users)],
        ["data", "prepare", "--params", str(params), "--transfer", str(users)],
        ["score", "--model", "unused.pt", "--out", str(photo), str(photo)],
        ["embed", "--model", "unused.pt", "--out", str(users / "sub" / "f.npz"), str(users)],
        ["map", "--model", "unused.pt", "--out", str(photo), str(photo)],
        ["map", "--model", str(photo), "--out", str(photo), str(corpus / "a" / "001.jpg")],
        ["data", "shard", "--params", str(params), "--out", str(tmp_path / "again"), str(shards)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        assert _tree(users) == before, argv
    assert not (corpus / "a" / "shards").exists() and not (tiny_prepared / "run").exists()
    assert not (tmp_path / "again").exists()
    # shards: a folder it wrote is its own (a re-run resumes; --force starts over in it)
    assert main(["data", "shard", "--params", str(params), "--out", str(shards), "--per-shard", "4",
                 "--workers", "1", str(corpus)]) == 0


def test_only_proof_makes_an_unmarked_folder_ours(tmp_path: Path, shards: Path, tiny_prepared: Path) -> None:
    """Names alone do not make a folder a command's own: a user's ``cache/`` or ``encoder.pt``, or a
    hidden file that merely contains ``.tmp``, is refused; an unmarked folder holding the signature
    only that command writes is replaced."""
    for name, files in (("cache", {"cache/mine.txt": "precious"}), ("hidden", {".notes.tmp.md": "precious"})):
        folder = tmp_path / name
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        with pytest.raises(atomic.OutputError, match="which no clic command wrote"):
            prepare(_data(tmp_path, out_dir=str(folder)), workers=1)
        assert all((folder / rel).read_text() == text for rel, text in files.items())
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "encoder.pt").write_bytes(b"my own weights")
    with pytest.raises(atomic.OutputError, match=r"weights: holds encoder.pt, which no clic command wrote"):
        run(_moco(tmp_path, [str(shards)]), tmp_path / "unused", weights, progress=False)
    with pytest.raises(atomic.OutputError, match="the output lies inside the input file://"):  # a URL is its path
        run(_moco(tmp_path, [f"file://{shards}"]), tmp_path / "unused", shards / "run", progress=False)
    assert (weights / "encoder.pt").read_bytes() == b"my own weights"
    here = tmp_path / "here"  # out_dir "." names the working folder: its lock goes beside it, not in it
    here.mkdir()
    cwd = Path.cwd()
    os.chdir(here)
    try:
        prepare(_data(tmp_path, out_dir="."), workers=1)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in here.iterdir()) == [atomic.MARKER, "meta.json", "table.csv"]


def test_a_killed_prepare_never_costs_the_users_folder(tmp_path: Path) -> None:
    """replace_dir itself refuses an unmarked foreign folder: no code path swaps it away."""
    users = tmp_path / "mine"
    before = _users_folder(users)
    new = atomic.staging_dir(users)
    new.mkdir()
    with pytest.raises(atomic.OutputError):
        atomic.replace_dir(new, users, "test")
    assert _tree(users) == before


# ------------------------------------------------------------------------ a run that read less than planned fails
def _moco(tmp_path: Path, data: list[str], workers: int = 0) -> PretrainConfig:
    raw = {**tiny_overrides("moco"), "epochs": 1, "num_workers": workers, "checkpoint_every": 100, "data": data}
    return from_dict(PretrainConfig, {"method": "moco", **raw})


@pytest.mark.parametrize("workers", [0, 2])
def test_a_remote_shard_that_cannot_be_fetched_fails_the_run_by_name(shards: Path, tmp_path: Path,
                                                                      workers: int) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(shards, remote)
    (remote / "part-000007" / "shard.00000.mds").unlink()
    cfg = _moco(tmp_path, [f"file://{remote}"], workers)
    with pytest.raises(CorpusError, match=r"remote: shard part-000007/shard.00000.mds cannot be read \("
                                          r"FileNotFoundError") as err:
        run(cfg, tmp_path / "unused", tmp_path / "run", progress=False, corpus_dir=tmp_path / "work")
    assert "\n" not in str(err.value)  # one line, also from a loader worker
    assert not (tmp_path / "run" / "encoder.pt").exists()
    with pytest.raises(CorpusError, match=r"shard part-000007/shard.00000.mds cannot be fetched after 3 tries"):
        local_corpus(f"file://{remote}", tmp_path / "work2")  # the leak check's read
    if workers:
        return
    # the remote mended, a copy cut short in the cache (a kill mid-copy) is fetched again, not trusted
    shutil.copy2(shards / "part-000007" / "shard.00000.mds", remote / "part-000007" / "shard.00000.mds")
    cached = sorted((tmp_path / "work" / "mds").rglob("*.mds"))[0]
    cached.write_bytes(cached.read_bytes()[:500])
    run(cfg, tmp_path / "unused", tmp_path / "run", progress=False, corpus_dir=tmp_path / "work")
    assert (tmp_path / "run" / "encoder.pt").is_file()


def test_a_short_epoch_is_an_error_not_an_epoch() -> None:
    model = torch.nn.Linear(2, 1)

    class Tiny(torch.nn.Module):
        def forward(self, batch: dict, momentum: float) -> dict:
            return {"loss": model(batch["x"].flatten(1)[:, :2]).mean()}

    batches = [{"x": torch.ones(2, 3, 4, 4)}] * 3
    with pytest.raises(ShortEpochError, match="epoch 0: the loader gave 3 of the 5 planned steps"):
        train_one_epoch(Tiny(), batches, torch.optim.SGD(model.parameters(), 0.1), 0, 5, 0, lambda t: 0.1,
                        lambda t: 0.99, torch.device("cpu"), progress=False)


def test_index_counts_and_sizes_are_checked_against_the_shards_before_reading(shards: Path, tmp_path: Path) -> None:
    def more(s: list) -> None:
        s[2]["samples"] += 1

    def fewer(s: list) -> None:
        s[2]["samples"] -= 1

    def huge(s: list) -> None:  # a ~400-byte edit that made MosaicML allocate 7.5 GB
        for shard in s:
            shard["samples"], shard["raw_data"]["bytes"] = 10**8 // len(s), 2**27
    for name, edit, message in (
            ("more", more, r"part-000002/shard.00000.mds: holds 4 samples with offsets that do not match its index"),
            ("fewer", fewer, r"part-000002/shard.00000.mds: holds 4 samples"),
            ("huge", huge, r"shards\[0\] must be .* an int 'samples' its 'raw_data' 'bytes' \(at most")):
        folder = _tampered(shards, tmp_path / name, edit)
        with pytest.raises(CorpusError, match=message):
            run(_moco(tmp_path, [str(folder)]), tmp_path / "unused", tmp_path / f"run-{name}", progress=False)
        assert not (tmp_path / f"run-{name}" / "encoder.pt").exists()

    def many(s: list) -> None:  # within every shard's bytes, too many for one process in all
        s[:] = [{**s[0], "samples": 1_300_000, "raw_data": {"basename": f"{i}.mds", "bytes": 2**27, "hashes": {}}}
                for i in range(16)]
    with pytest.raises(CorpusError, match=r"lists 20,800,000 samples, over the 20,000,000 .* 1.6 GB each"):
        check_index(_tampered(shards, tmp_path / "many", many) / INDEX_NAME, "many", local=False)

    def twice(s: list) -> None:
        s.append(s[0])
    with pytest.raises(CorpusError, match=r"shards\[10\]: 'part-000000/shard.00000.mds' is listed twice"):
        check_index(_tampered(shards, tmp_path / "twice", twice) / INDEX_NAME, "twice")
    with pytest.raises(CorpusError, match="names one corpus twice"):
        run(_moco(tmp_path, [str(shards), f"file://{shards}/"]), tmp_path / "unused", tmp_path / "run-2x",
            progress=False, corpus_dir=tmp_path / "work")

    def hashes(s: list) -> None:
        del s[1]["hashes"]
    with pytest.raises(CorpusError, match=r"shards\[1\] must be an uncompressed MDS shard"):
        check_index(_tampered(shards, tmp_path / "hashes", hashes) / INDEX_NAME, "hashes")


def test_unreadable_samples_are_replaced_by_name_even_the_first(shards: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Every sample of the first shard is unreadable: the stream substitutes the next readable
    images and names what it skipped; the run trains every planned step."""
    from streaming import MDSWriter

    from clic.data.shard_stream import ShardStream
    from clic.data.shards import COLUMNS

    folder = tmp_path / "bad"
    dataset = local_corpus(shards, tmp_path)
    samples = [dataset[i] for i in range(len(dataset))]
    for s in samples[:3]:
        s["jpg"] = b"\xff\xd8 not a jpeg"
    with MDSWriter(out=str(folder), columns=COLUMNS, progress_bar=False) as writer:
        for s in samples:
            writer.write(s)
    stream = ShardStream([folder], tmp_path, lambda img: {"size": img.size}, batch_size=8, seed=0)
    stream.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        got = [stream.get_item(i) for i in range(4)]
    assert [g["image_id"] for g in got] == [0, 1, 2, 3] and all(g["size"] == (36, 36) for g in got)
    assert "bad: shard shard.00000.mds, sample 0 (" in caplog.text and "cannot decode image (" in caplog.text
    assert "<_io.BytesIO" not in caplog.text


def test_a_corpus_without_a_readable_image_or_with_no_side_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"none of the 3 images is readable, no index written"):
        write_shards(corpus_records([junk]), tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    with pytest.raises(ValueError, match=r"--side must be 0 \(keep the size\) or at least 32 pixels"):
        write_shards(corpus_records([junk]), tmp_path / "out2", side=-5, min_side=32, progress=False)


# ------------------------------------------------------------------------ smaller cases
def test_names_links_and_unrelated_indexes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / os.fsdecode(b"caf\xe9.jpg"))  # a latin-1 file name
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / INDEX_NAME).write_text('{"pages": []}')  # some other program's index
    with caplog.at_level(logging.WARNING):
        assert not is_shard_index(folder)
        images = list(walk_images(folder))
    assert "is no MosaicML shard index" in caplog.text and "loop.jpg: a link that cannot be followed" in caplog.text
    assert [p.name for p in images] == [os.fsdecode(b"caf\xe9.jpg")]
    out = tmp_path / "shards"
    write_shards(corpus_records([folder]), out, workers=1, progress=False)
    assert local_corpus(out, tmp_path)[0]["name"] == "photos/caf\\xe9.jpg"
    hashes = corpus_hashes(corpus_records([out], tmp_path), tmp_path / "h.jsonl", workers=1, progress=False)
    assert hashes.hashed == 1 and len(hashes.sha) == 1  # decoded now, not "0 hashed (1 known)"


def test_score_refuses_corrupt_jpegs_and_prints_plain_newlines(tmp_path: Path, tiny_prepared: Path) -> None:
    from clic.evaluation.evaluate import evaluate_random
    from clic.params import probe_config

    arch = from_dict(PretrainConfig, {"method": "moco", **tiny_overrides("moco")})
    evaluate_random(arch, tiny_prepared, probe_config({}), tmp_path / "report", 0, "cpu")
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    good.write_bytes(data)
    bad.write_bytes(data[:len(data) // 2] + bytes(200) + data[len(data) // 2 + 200:])  # mid-stream damage
    res = subprocess.run([sys.executable, "-m", "clic.cli", "score", "--model", str(tmp_path / "report" / "scorer.pt"),
                          "--workers", "0", str(good), str(bad)], capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert b"\r" not in res.stdout and res.stdout.decode().splitlines()[0] == "path,score"
    assert [line.split(",")[0] for line in res.stdout.decode().splitlines()[1:]] == [str(good)]
    assert b"bad.jpg: corrupt JPEG data" in res.stderr
    assert b"\r" not in (tmp_path / "report" / "predictions.csv").read_bytes()  # files as stdout: \n
