"""Sharded corpora on MosaicML streaming: the writer (parallel, resumable, MDS parts) and the
training stream (deterministic per epoch, resumable at a step, split across ranks and workers
without duplicates, per-sample seeded views)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from clic.config import PretrainConfig
from clic.data.corpus import corpus_records
from clic.data.imageio import content_hash, load_rgb
from clic.data.shard_stream import ShardStream
from clic.data.shards import COLUMNS, INDEX_NAME, is_shard_index, local_corpus, shard_plan, write_shards
from clic.params import from_dict
from clic.pretrain import run

from .conftest import tiny_overrides

N_JPEG, N_PNG = 46, 2  # 48 readable images (+1 unreadable), 7 per part -> 7 parts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two source folders of tiny images, one PNG per folder and one broken file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(N_JPEG + N_PNG):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        arr = rng.integers(0, 256, (20 + i % 5, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / (f"{i:03d}.png" if i < N_PNG else f"{i:03d}.jpg"))
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def shards(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    return out


def _files(folder: Path) -> dict[str, str]:
    """Every file of a corpus folder (relative path -> SHA-256), lock and plan aside."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (".writer.lock", "clic.json")}


def _ident(img: Image.Image) -> dict:
    return {"size": torch.tensor(img.size)}


def _ids(stream: ShardStream, workers: int) -> list[int]:
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, drop_last=True)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_writer_layout_contents_and_mixing(corpus: Path, shards: Path) -> None:
    index = json.loads((shards / INDEX_NAME).read_text())
    assert index["version"] == 2 and is_shard_index(shards)
    assert [s["raw_data"]["basename"] for s in index["shards"]] == [f"part-{i:06d}/shard.00000.mds" for i in range(7)]
    assert all(dict(zip(s["column_names"], s["column_encodings"], strict=True)) == COLUMNS for s in index["shards"])
    plan = json.loads((shards / "clic.json").read_text())
    assert plan["total"] == sum(s["samples"] for s in index["shards"]) == 48 and len(plan["unreadable"]) == 1
    dataset = local_corpus(shards, shards / "unused")
    seen = {dataset[i]["name"]: dataset[i] for i in range(len(dataset))}
    assert len(seen) == 48 and not any(n.endswith("broken.jpg") for n in seen)
    for name, s in seen.items():
        src = corpus / name.split("/", 1)[1]
        assert s["sha256"] == content_hash(load_rgb(src))  # the leak check's hash of the source pixels
        assert (s["width"], s["height"]) == load_rgb(src).size and s["source"] == src.parent.name
        if src.suffix == ".jpg":
            assert s["jpg"] == src.read_bytes()  # JPEGs stored byte for byte
        else:
            assert s["jpg"][:2] == b"\xff\xd8"  # PNGs re-encoded as JPEG
    assert {dataset[i]["source"] for i in range(7)} == {"a", "b"}  # a seeded permutation mixes the sources


def test_killed_run_resumes_with_identical_shards(corpus: Path, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    before = _files(out)
    assert before == _files(shards)  # deterministic bytes
    # a kill during part 4: parts 4-6 unpublished, a half-written temporary folder, no index
    for i in (4, 5, 6):
        shutil.rmtree(out / f"part-{i:06d}")
    (out / ".part-000004.999.tmp").mkdir()
    (out / ".part-000004.999.tmp" / "shard.00000.mds").write_bytes(b"half")
    (out / INDEX_NAME).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[0-3]/*.mds")}
    summary = write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    assert (summary.written, summary.parts, summary.images, summary.unreadable) == (3, 7, 48, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[0-3]/*.mds")} == kept  # not rewritten
    assert _files(out) == before and not list(out.glob(".*tmp"))


def test_a_corpus_folder_named_like_a_url_is_written_as_any_other(corpus: Path, shards: Path, tmp_path: Path) -> None:
    """MosaicML's ``merge_index`` parses a local path as a URL: under ``run#2`` it names every
    shard after the wrong folder. The index is ours, and the same as anywhere else."""
    out = tmp_path / "run#2?" / "shards"
    write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    assert _files(out) == _files(shards)


def test_another_listing_is_refused_unless_forced(corpus: Path, shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="different listing or settings"):
        write_shards(corpus_records([corpus]), shards, per_shard=5, seed=5, workers=1, progress=False)
    out = tmp_path / "forced"
    shutil.copytree(shards, out)
    summary = write_shards(corpus_records([corpus]), out, per_shard=5, seed=5, workers=1, force=True, progress=False)
    assert summary.parts == 10 and sorted(p.name for p in out.glob("part-*"))[-1] == "part-000009"


def _tampered(shards: Path, folder: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(shards, folder)
    index = json.loads((folder / INDEX_NAME).read_text())
    edit(index["shards"])
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return folder


def test_an_index_from_anyone_is_checked_before_reading(shards: Path, tmp_path: Path) -> None:
    """Only the writer's columns are read (never a pickled one, whose loading runs code), shards
    stay inside the corpus's folder, and a damaged or missing shard is named before training."""
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / INDEX_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"junk/index.json: not a readable shard index"):
        local_corpus(tmp_path / "junk", tmp_path)

    def pickled(s: list) -> None:
        s[2]["column_encodings"][s[2]["column_names"].index("name")] = "pkl"

    def escape(s: list) -> None:
        s[1]["raw_data"]["basename"] = "../../outside.mds"

    def cut(s: list) -> None:
        path = tmp_path / "cut" / s[3]["raw_data"]["basename"]
        path.write_bytes(path.read_bytes()[:-100])

    def huge(s: list) -> None:
        s[0]["samples"] = 10**12  # MosaicML would allocate per sample: terabytes

    def typed(s: list) -> None:
        s[5]["raw_data"]["bytes"] = "8166"

    for name, edit, message in (("pickled", pickled, r"shards\[2\] must be an uncompressed MDS shard with the columns"),
                                ("huge", huge, r"shards\[0\] must be .* an int 'samples' its 'raw_data'"),
                                ("typed", typed, r"shards\[5\] must be an uncompressed MDS shard"),
                                ("escape", escape, r"shards\[1\]: '../../outside.mds' must be a path inside"),
                                ("cut", cut, r"part-000003/shard.00000.mds: [\d,]+ bytes, its index .* lists")):
        folder = _tampered(shards, tmp_path / name, edit)
        with pytest.raises(ValueError, match=message):
            local_corpus(folder, tmp_path)
        with pytest.raises(ValueError, match=message):  # what pretraining builds before any step
            ShardStream([folder], tmp_path, _ident, batch_size=4)


def test_order_is_a_function_of_seed_and_epoch_not_of_workers(shards: Path, tmp_path: Path) -> None:
    stream = ShardStream([shards], tmp_path, _ident, 8, seed=1)
    assert stream.steps_per_epoch == 6

    def order(epoch: int, workers: int, skip: int = 0) -> list[int]:
        stream.set_epoch(epoch, skip)
        return _ids(stream, workers)

    first = order(0, 0)
    assert sorted(first) == list(range(48)) and order(0, 2) == first == order(0, 3)
    assert order(1, 2) != first
    for skip in (1, 4, 6):  # resuming at a step gives the uninterrupted remainder, whatever the workers
        assert order(0, 2, skip) == first[skip * 8:] == order(0, 0, skip)
    other = ShardStream([shards], tmp_path, _ident, 8, seed=2)
    other.set_epoch(0)
    assert _ids(other, 0) != first
    stream.set_epoch(3)
    a = next(iter(stream))
    stream.set_epoch(3)
    b = next(iter(stream))  # views seeded by (seed, epoch, sample)
    assert a["index"] == b["index"] and torch.equal(a["size"], b["size"])


def _rank(rank: int, world: int, corpora: list[str], out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for k, folder in enumerate(corpora):
        stream = ShardStream([folder], out, _ident, 4, seed=3)
        result = {"steps": stream.steps_per_epoch}
        for epoch, skip in ((0, 0), (1, 0), (1, min(2, stream.steps_per_epoch))):
            stream.set_epoch(epoch, skip)
            result[f"{epoch}:{skip}"] = _ids(stream, 2)
        Path(out, f"{k}-{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_two_workers_see_every_sample_once(corpus: Path, shards: Path, tmp_path: Path) -> None:
    """Two real DDP processes (gloo) with two loader workers each: every rank the same number of
    steps, each sample once an epoch, and a resumed epoch continues where it stopped; with 15
    images (not a multiple of 4 x 2), the one step an epoch takes holds 8 distinct images, and
    the loader's padding (MosaicML repeats a few samples so the ranks hold the same count) comes
    after it."""
    import socket

    small = tmp_path / "small"
    write_shards(corpus_records([corpus])[:15], small, per_shard=4, seed=5, workers=1, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, [str(shards), str(small)], str(tmp_path), port), nprocs=2)
    r = [json.loads((tmp_path / f"0-{k}.json").read_text()) for k in (0, 1)]
    assert r[0]["steps"] == r[1]["steps"] == 48 // 8
    for epoch in (0, 1):
        ids = [r[k][f"{epoch}:0"] for k in (0, 1)]
        assert len(ids[0]) == len(ids[1]) == 24 and sorted(ids[0] + ids[1]) == list(range(48))
    assert r[0]["0:0"] != r[0]["1:0"]
    assert all(r[k]["1:2"] == r[k]["1:0"][8:] for k in (0, 1))
    r = [json.loads((tmp_path / f"1-{k}.json").read_text()) for k in (0, 1)]
    assert r[0]["steps"] == r[1]["steps"] == 15 // 8
    for epoch in (0, 1):
        taken = r[0][f"{epoch}:0"][:4] + r[1][f"{epoch}:0"][:4]
        assert len(set(taken)) == 8 and set(taken) <= set(range(15))


def test_remote_corpus_is_cached_and_streams_as_the_local_one(corpus: Path, shards: Path, tmp_path: Path) -> None:
    """A remote corpus (``file://``: MosaicML's copy from a mounted file system, the same path an
    s3:// or gs:// corpus takes) is cached under the work folder and gives the local order; a
    corpus rewritten under the same URL is read anew."""
    remote = ShardStream([f"file://{shards}"], tmp_path / "work", _ident, 8, seed=1)
    local = ShardStream([shards], tmp_path / "work", _ident, 8, seed=1)
    for s in (remote, local):
        s.set_epoch(0)
    expected = _ids(local, 0)
    assert _ids(remote, 0) == expected
    cached = [p for p in (tmp_path / "work" / "mds").iterdir() if p.is_dir()]
    assert len(cached) == 1 and len(list(cached[0].glob("part-*/*.mds"))) == 7
    records = corpus_records([f"file://{shards}"], tmp_path / "work")
    assert len(records) == 48 and records[0].path.startswith(str(cached[0]))
    # shard_cache reaches MosaicML's cache_limit (its eviction is not exercised here: with a limit of
    # a few 8 kB shards, MosaicML 0.10's eviction and ready threads once waited on each other forever)
    bounded = ShardStream([f"file://{shards}"], tmp_path / "bounded", _ident, 8, seed=1, cache_limit="40kb")
    assert bounded.cache_limit == 40 * 1024
    moved = tmp_path / "moved"  # the remote corpus rewritten under the same URL: the stale cache is emptied
    shutil.copytree(shards, moved)
    first = ShardStream([f"file://{moved}"], tmp_path / "work", _ident, 8, seed=1)
    first.set_epoch(0)
    _ids(first, 0)
    shutil.rmtree(moved)
    write_shards(corpus_records([corpus]), moved, per_shard=5, seed=5, workers=1, progress=False)
    again = ShardStream([f"file://{moved}"], tmp_path / "work", _ident, 8, seed=1)
    again.set_epoch(0)
    assert sorted(_ids(again, 0)) == list(range(48))
    hostile = _tampered(shards, tmp_path / "hostile", lambda s: s[0]["raw_data"].update(basename="../x.mds"))
    with pytest.raises(ValueError, match=r"hostile/index.json: shards\[0\]: '../x.mds' must be a path inside"):
        ShardStream([f"file://{hostile}"], tmp_path / "work2", _ident, 8)
    assert not list((tmp_path / "work2").rglob("*.mds"))  # refused before any shard was fetched


def test_pretrain_streams_from_shards(shards: Path, tmp_path: Path) -> None:
    raw = {**tiny_overrides("moco"), "epochs": 1, "num_workers": 2, "data": [str(shards)]}
    cfg = from_dict(PretrainConfig, {"method": "moco", **raw})
    run(cfg, tmp_path / "unused", tmp_path / "run", progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["steps"] == 48 // 8 and np.isfinite(metrics[0]["loss"])
    (tmp_path / "plain").mkdir()
    bad = from_dict(PretrainConfig, {"method": "moco", **raw, "data": [str(shards), str(tmp_path / "plain")]})
    with pytest.raises(ValueError, match=r"pretrain.data\[1\]: not a sharded corpus"):
        run(bad, tmp_path / "unused", tmp_path / "run2", progress=False)


def test_clic_extra_mosaics_on_shards_are_refused_before_the_stream_opens(shards: Path, tmp_path: Path) -> None:
    """Extra mosaics need the image files: on a (remote) sharded corpus CLIC's pairing extra is
    refused before any shard is fetched; pairing key streams."""
    raw = {**tiny_overrides("clic"), "epochs": 1, "num_workers": 0, "data": [f"file://{shards}"]}
    cfg = from_dict(PretrainConfig, {"method": "clic", **raw, "rcm": {"pairing": "extra"}})
    with pytest.raises(ValueError, match=r"rcm.pairing=extra: extra mosaics need the image files"):
        run(cfg, tmp_path / "unused", tmp_path / "run", progress=False, corpus_dir=tmp_path / "work")
    assert not list((tmp_path / "work").rglob("*.*"))  # nothing fetched, not even the index
    cfg = from_dict(PretrainConfig, {"method": "clic", **raw, "rcm": {"pairing": "key"}})
    run(cfg, tmp_path / "unused", tmp_path / "run", progress=False, corpus_dir=tmp_path / "work")
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["steps"] == 48 // 8


def test_killed_shard_run_resumes_as_if_never_stopped(shards: Path, tmp_path: Path) -> None:
    """SIGKILL a real `clic pretrain` streaming shards mid-epoch (its MosaicML shared memory left
    behind); resuming with another worker count ends on the uninterrupted run's weights."""
    import signal

    import yaml

    from clic.engine import checkpoint as ckpt

    params = tmp_path / "params.yaml"
    over = {**tiny_overrides("moco"), "epochs": 2}
    params.write_text(yaml.safe_dump({"seed": 0, "pretrain": {"data": [str(shards)], "moco": over}}))
    cmd = [sys.executable, "-m", "clic.cli", "pretrain", "--method", "moco", "--params", str(params), "--no-progress"]
    subprocess.run([*cmd, "--out", str(tmp_path / "straight")], check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed), "--set", "num_workers=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if ckpt.load(killed / "checkpoint.pt")["step"] >= 2:  # mid-epoch
                break
        except (OSError, RuntimeError, KeyError, EOFError, ValueError):  # not written yet, or mid-write
            pass
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = ckpt.load(killed / "checkpoint.pt")
    assert (state["epoch"], state["step"]) < (2, 0) and state["step"] > 0, "not killed mid-epoch"
    subprocess.run([*cmd, "--out", str(killed)], check=True, capture_output=True, timeout=300)
    a, b = (ckpt.load(p / "encoder.pt")["backbone"] for p in (tmp_path / "straight", killed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pretrain_decodes_shard_samples_on_the_device(shards: Path, tmp_path: Path) -> None:
    """decode_on: device with shards: workers hand on each sample's JPEG bytes undecoded (the writer
    stored the PNGs as JPEGs too), the step decodes them; one epoch takes every full batch."""
    stream = ShardStream([shards], tmp_path, lambda enc: {"encoded": enc.data}, batch_size=8, seed=1, encoded=True)
    stream.set_epoch(0)
    kinds = sorted(item["encoded"].dim() for item in stream)
    assert kinds == [1] * (N_JPEG + N_PNG)
    raw = {**tiny_overrides("clicv2"), "epochs": 1, "num_workers": 2, "augment_on": "device", "decode_on": "device",
           "data": [str(shards)]}
    cfg = from_dict(PretrainConfig, {"method": "clicv2", **raw})
    run(cfg, tmp_path / "unused", tmp_path / "run", progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["steps"] == 48 // 8 and np.isfinite(metrics[0]["loss"])


def test_cli_shard_and_one_writer_per_folder(corpus: Path, shards: Path, tmp_path: Path) -> None:
    from clic.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("seed: 5\n")
    out = tmp_path / "cli"
    assert main(["data", "shard", "--params", str(params), "--out", str(out), "--per-shard", "7", "--workers", "2",
                 "--no-progress", str(corpus)]) == 0
    assert _files(out) == _files(shards)  # same seed: same shards
    hold = (f"import time; from filelock import FileLock; lock = FileLock({str(out / '.writer.lock')!r}); "
            "lock.acquire(); print('held', flush=True); time.sleep(1.5)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        start = time.perf_counter()  # another writer holds the folder: this one waits for it
        summary = write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=1, progress=False)
        assert time.perf_counter() - start > 0.8 and summary.written == 0
    finally:
        holder.kill()
        holder.wait()
    assert main(["data", "shard", "--params", str(params), "--out", str(out), "--per-shard", "5",
                 str(corpus)]) == 2  # a different plan in the same folder: refused, nothing deleted
    assert len(list(out.glob("part-*"))) == 7


def test_leak_check_reads_what_the_shards_hold(shards: Path, tmp_path: Path, photos: list[Path]) -> None:
    """An evaluation photo slipped into a shard whose recorded hash was left alone is found: the
    check hashes the shards' content, never the writer's word."""
    from streaming import MDSWriter

    from clic.data.corpus import corpus_hashes, leaks
    from clic.data.imageio import resize_short
    from clic.data.table import Record

    buf = io.BytesIO()
    resize_short(load_rgb(photos[3]), 48).save(buf, "JPEG", quality=85)
    folder = tmp_path / "tampered"
    samples = [local_corpus(shards, tmp_path)[i] for i in range(48)]
    samples[9] = {**samples[9], "jpg": buf.getvalue()}  # the image swapped, its name and hash kept
    with MDSWriter(out=str(folder), columns=COLUMNS, progress_bar=False) as writer:
        for s in samples:
            writer.write(s)
    records = corpus_records([folder], tmp_path)
    assert len(records) == 48 and records[9].sha256 == samples[9]["sha256"]
    hashes = corpus_hashes(records, tmp_path / "hashes.jsonl", workers=1, progress=False)
    assert len(hashes.sha) == 48 and not hashes.errors
    evaluation = corpus_hashes([Record("eval/photo3", str(photos[3]), 0.5, "test",
                                       sha256=content_hash(load_rgb(photos[3])))],
                               tmp_path / "hashes.jsonl", workers=1, progress=False)
    found = leaks(hashes, evaluation)
    assert [(x.evaluation, x.corpus, x.exact) for x in found] == [("eval/photo3", records[9].name, False)]
    assert 0 <= found[0].bits <= 4


def test_leak_check_of_shards_keeps_the_pixel_limit(shards: Path, tmp_path: Path) -> None:
    """Shard samples are decoded under the caller's pixel limit (data.max_pixels), as files are."""
    from clic.data.corpus import corpus_hashes

    records = corpus_records([shards], tmp_path)
    hashes = corpus_hashes(records, tmp_path / "hashes.jsonl", workers=1, max_pixels=64, progress=False)
    assert not hashes.sha and sorted(hashes.errors) == sorted(r.name for r in records)
    assert all("64" in err for err in hashes.errors.values())
    assert len(corpus_hashes(records, tmp_path / "hashes.jsonl", workers=1, progress=False).sha) == 48


def test_the_gpu_shards_profile_streams_its_corpus(shards: Path, tmp_path: Path) -> None:
    """params/gpu-shards.yaml, its corpus pointed at the test's shards: the loader it builds is
    the MosaicML stream, at the profile's per-process batch, and CLIC pairs mosaics online."""
    from clic.params import load_params, pretrain_config
    from clic.pretrain import build_loader

    profile = Path(__file__).resolve().parents[1] / "params" / "gpu-shards.yaml"
    params = load_params(profile, [f"pretrain.data=[{shards}]", "pretrain.common.batch_size=4",
                                   "pretrain.common.num_workers=0"])
    cfg = pretrain_config(params, "clicv2")
    assert pretrain_config(load_params(profile), "moco").moco.queue_size == 65536
    assert pretrain_config(params, "clic").rcm.pairing == "key"
    loader, feed, n = build_loader(cfg, tmp_path, tmp_path, rank=0, world=1, pin_memory=False)
    assert isinstance(feed, ShardStream) and n == 48 and feed.steps_per_epoch == 12 and loader.batch_size == 4
    with pytest.raises(ValueError, match=r"moco.queue_size=65536 exceeds"):  # 48 images cannot hold the papers' K
        build_loader(pretrain_config(params, "moco"), tmp_path, tmp_path, rank=0, world=1, pin_memory=False)


def test_shard_loader_leaves_the_global_rng_alone(shards: Path, tmp_path: Path) -> None:
    from clic.pretrain import build_loader

    raw = {**tiny_overrides("clicv2"), "data": [str(shards)]}
    cfg = from_dict(PretrainConfig, {"method": "clicv2", **raw})
    loader, feed, n = build_loader(cfg, tmp_path, tmp_path, rank=0, world=1, pin_memory=False)
    assert n == 48 and feed.steps_per_epoch == 6
    feed.set_epoch(1, skip=2)
    state = torch.get_rng_state()
    batch = next(iter(loader))  # a resumed run restores the RNG, then starts the loader mid-epoch
    assert torch.equal(torch.get_rng_state(), state) and len(batch["index"]) == 8


def test_sigkilled_writer_is_completed_by_a_rerun(corpus: Path, shards: Path, tmp_path: Path) -> None:
    """A real kill -9 of the writer and its workers, while a worker waits on an image (a FIFO
    nobody writes): the parts before it are published; a re-run writes only the rest, and the
    result is the uninterrupted one byte for byte."""
    import signal

    slow = tmp_path / "slow.jpg"
    os.mkfifo(slow)
    records = corpus_records([corpus, slow])
    seed = next(s for s in range(100) if 3 <= [p for _, p, _ in shard_plan(records, s)].index(str(slow)) // 4 < 10)
    blocked = [p for _, p, _ in shard_plan(records, seed)].index(str(slow)) // 4  # its part
    params = tmp_path / "params.yaml"
    params.write_text(f"seed: {seed}\n")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clic.cli", "data", "shard", "--params", str(params), "--out",
                             str(out), "--per-shard", "4", "--workers", "1", "--no-progress", str(corpus), str(slow)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / f"part-{blocked - 1:06d}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # it stays blocked on the FIFO: nothing more can be published
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:06d}" for i in range(blocked)]
    assert not (out / INDEX_NAME).exists()
    slow.unlink()
    Image.fromarray(np.full((20, 24, 3), 77, np.uint8)).save(slow)  # the image becomes readable
    reference = write_shards(corpus_records([corpus, slow]), tmp_path / "ref", per_shard=4, seed=seed, workers=1,
                             progress=False)
    again = write_shards(corpus_records([corpus, slow]), out, per_shard=4, seed=seed, workers=2, progress=False)
    assert again.written == reference.parts - blocked and again.images == reference.images == 49
    assert _files(out) == _files(tmp_path / "ref")


def test_workers_die_with_a_killed_writer(corpus: Path, tmp_path: Path) -> None:
    """kill -9 of `clic data shard` alone (not its process group): its workers, one blocked on an
    image that never comes (a FIFO), end with it instead of waiting forever (~300 MB each)."""
    import signal

    slow = tmp_path / "slow.jpg"
    os.mkfifo(slow)
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "clic.cli", "data", "shard", "--params", str(params), "--out",
                             str(tmp_path / "out"), "--per-shard", "4", "--workers", "2", "--no-progress", str(slow),
                             str(corpus)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    try:
        deadline = time.monotonic() + 60
        while len(workers := children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2, "the writer started no workers"
        time.sleep(1.0)  # a worker is now blocked opening the FIFO
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.1)
    for p in alive:  # leave nothing behind whatever the outcome
        os.kill(p, signal.SIGKILL)
    assert alive == [], "workers outlived their killed parent"
