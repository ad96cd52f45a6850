"""Sharded corpora: the writer (parallel, resumable, webdataset layout) and the streaming reader
(deterministic per epoch, resumable at a step, split across ranks and workers without duplicates)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clic.config import PretrainConfig
from clic.data.corpus import corpus_records
from clic.data.imageio import content_hash, load_rgb
from clic.data.shard_stream import ShardStream
from clic.data.shards import (
    INDEX_NAME,
    ShardIndex,
    check_summaries,
    is_shard_index,
    iter_shard,
    shard_plan,
    write_shards,
)
from clic.engine import checkpoint as ckpt
from clic.params import from_dict
from clic.pretrain import run

from .conftest import tiny_overrides

N_JPEG, N_PNG = 46, 2  # 48 readable images (+1 unreadable), 7 per shard -> 7 shards


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


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writer_layout_contents_and_mixing(corpus: Path, shards: Path) -> None:
    index = json.loads((shards / INDEX_NAME).read_text())
    assert index["format"] == "clic-shards" and index["total"] == N_JPEG + N_PNG and index["unreadable"] == 1
    assert [s["url"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(7)]
    assert sum(s["count"] for s in index["shards"]) == 48 and is_shard_index(shards)
    with tarfile.open(shards / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.jpg", "000000000.json"] and all(n.endswith((".jpg", ".json")) for n in names)
    seen = {}
    for url in ShardIndex.load([shards]).urls:
        for _, data, meta in iter_shard(url):
            seen[meta["name"]] = (data, meta)
    assert len(seen) == 48 and not any(n.endswith("broken.jpg") for n in seen)
    for name, (data, meta) in seen.items():
        src = corpus / name.split("/", 1)[1]
        assert meta["sha256"] == content_hash(load_rgb(src))  # the leak check's hash of the source pixels
        assert (meta["width"], meta["height"]) == load_rgb(src).size and meta["source"] == src.parent.name
        if src.suffix == ".jpg":
            assert data == src.read_bytes()  # JPEGs stored byte for byte
        else:
            assert data[:2] == b"\xff\xd8"  # PNGs re-encoded as JPEG
    first = [m["source"] for _, _, m in iter_shard(str(shards / "shard-000000.tar"))]
    assert set(first) == {"a", "b"}  # a seeded permutation mixes the source folders


def test_killed_run_resumes_with_identical_shards(corpus: Path, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    before = {p.name: _sha(p) for p in out.glob("shard-*")}
    assert before == {p.name: _sha(p) for p in shards.glob("shard-*")}  # deterministic bytes
    # a kill during shard 4: shards 4-6 unpublished, a half-written temp file, no index
    for i in (4, 5, 6):
        (out / f"shard-{i:06d}.tar").unlink()
    (out / f".shard-{4:06d}.tar.999.tmp").write_bytes(b"half")
    (out / INDEX_NAME).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[0-3].tar")}
    summary = write_shards(corpus_records([corpus]), out, per_shard=7, seed=5, workers=2, progress=False)
    assert (summary.written, summary.shards, summary.images, summary.unreadable) == (3, 7, 48, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[0-3].tar")} == kept  # not rewritten
    assert {p.name: _sha(p) for p in out.glob("shard-*")} == before
    assert not list(out.glob(".*tmp")) and json.loads((out / INDEX_NAME).read_text())["total"] == 48


def test_another_listing_is_refused_unless_forced(corpus: Path, shards: Path) -> None:
    with pytest.raises(ValueError, match="different listing or settings"):
        write_shards(corpus_records([corpus]), shards, per_shard=5, seed=5, workers=1, progress=False)


def _index(folder: Path, name: str, shards: list[dict], source: Path) -> Path:
    """An index ``name`` in ``folder`` listing ``shards``, the shard files copied from ``source``."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.glob("shard-*"):
        if not (folder / f.name).exists():
            (folder / f.name).write_bytes(f.read_bytes())
    path = folder / name
    path.write_text(json.dumps({"format": "clic-shards", "version": 1, "total": sum(x["count"] for x in shards),
                                "shards": shards}))
    return path


def test_bad_index_names_the_file(tmp_path: Path, shards: Path) -> None:
    bad = tmp_path / "x.shards.json"
    bad.write_text('{"shards": []}')
    with pytest.raises(ValueError, match=r"x.shards.json: not a shard index"):
        ShardIndex.load([bad])
    listed = json.loads((shards / INDEX_NAME).read_text())["shards"]
    # the index promises more than the shard holds, or less: named, never a silent drop or short epoch
    for count, message in ((9, r"shard-000000.tar \(listed in .*more.shards.json\): holds 7 samples, its index says 9"),
                           (5, r"shard-000000.tar \(listed in .*less.shards.json\): holds more than the 5 samples")):
        name = "more.shards.json" if count > 7 else "less.shards.json"
        lying = _index(tmp_path / "lying", name, [{**listed[0], "count": count}, *listed[1:]], shards)
        stream = ShardStream(ShardIndex.load([lying]), _ident, batch_size=7)
        with pytest.raises(ValueError, match=message):
            list(stream.samples())
        with pytest.raises(ValueError, match=rf"its summary counts 7 samples, the index {count}"):
            check_summaries(ShardIndex.load([lying]))  # what pretraining checks before any step
    twice = _index(tmp_path / "twice", "twice.shards.json", [listed[0], listed[1], listed[0]], shards)
    with pytest.raises(ValueError, match=r"twice.shards.json: shards\[2\] lists shard-000000.tar a second time"):
        ShardIndex.load([twice])
    for url, why in (("pipe:touch pwned", "is a shell command"), ("/etc/passwd.tar", "relative to the index"),
                     ("../shard-000000.tar", "no '..'"), ("file:///etc/x.tar", "file:// URL")):
        hostile = _index(tmp_path / "hostile", "h.shards.json", [{"url": url, "count": 1}], shards)
        with pytest.raises(ValueError, match=re.escape(why)):
            ShardIndex.load([hostile])


def test_an_index_from_a_server_never_runs_a_command(tmp_path: Path, shards: Path) -> None:
    """The worst failure found: a fetched index whose entry is ``pipe:CMD`` ran CMD. Through the
    commands a user runs (listing the corpus, pretraining), the command is refused and never run."""
    marker = tmp_path / "pwned"
    site = tmp_path / "site"
    _index(site, INDEX_NAME, [{"url": f"pipe:touch {marker}; cat shard-000000.tar", "count": 7}], shards)
    with _http(site) as base:
        url = f"{base}/{INDEX_NAME}"
        with pytest.raises(ValueError, match="is a shell command; an index never runs one"):
            ShardIndex.load([url])
        params = tmp_path / "p.yaml"
        base_params = Path(__file__).resolve().parents[1] / "params.yaml"
        params.write_text(f"extends: {base_params}\npretrain:\n  data: [{url}]\n")
        for cmd in (["data", "corpus", "--params", str(params)],
                    ["pretrain", "--params", str(params), "--method", "moco", "--out", str(tmp_path / "m")]):
            res = subprocess.run([sys.executable, "-m", "clic.cli", *cmd], capture_output=True, text=True, timeout=300,
                                 cwd=tmp_path)
            assert res.returncode == 2 and "is a shell command" in res.stderr and "Traceback" not in res.stderr, \
                res.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "m").exists()


@contextlib.contextmanager
def _http(folder: Path, cut_after: dict[str, int] | None = None) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``folder``; ``cut_after``: path -> bytes after which
    the connection is dropped, for that many requests (value: (bytes, times) as a list)."""
    import http.server
    import threading

    cuts = {k: list(v) for k, v in (cut_after or {}).items()}  # type: ignore[call-overload]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(folder), **kw)  # type: ignore[arg-type]

        def log_message(self, *a: object) -> None:
            pass

        def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
            cut = cuts.get(self.path)
            if cut and cut[1] > 0:
                cut[1] -= 1
                outputfile.write(source.read(cut[0]))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            super().copyfile(source, outputfile)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_broken_shards_are_named_and_remote_faults_retried(tmp_path: Path, shards: Path) -> None:
    listed = json.loads((shards / INDEX_NAME).read_text())["shards"]
    folder = tmp_path / "broken"
    ok = _index(folder, "ok.shards.json", listed, shards)
    data = (folder / "shard-000002.tar").read_bytes()
    cases = {"truncated": data[: len(data) // 2], "empty": b"", "not a tar": b"GIF89a" + b"\0" * 600}
    for what, content in cases.items():
        (folder / "shard-000002.tar").write_bytes(content)
        stream = ShardStream(ShardIndex.load([ok]), _ident, batch_size=1)  # every sample of every shard
        with pytest.raises(ValueError, match=r"shard-000002.tar \(listed in .*ok.shards.json\): (cannot read the shard|"
                                             r"holds \d samples)") as err:
            list(stream.samples())
        assert "Traceback" not in str(err.value), what
    (folder / "shard-000002.tar").write_bytes(data)
    huge = tarfile.TarInfo("000099.jpg")  # a member that claims 3 GB: refused from its header
    huge.size = 3 * 2**30
    (folder / "shard-000003.tar").write_bytes(huge.tobuf() + b"\0" * 1024)
    with pytest.raises(ValueError, match=r"shard-000003.tar .*3,221,225,472 bytes, over the 67,108,864-byte limit"):
        list(ShardStream(ShardIndex.load([ok]), _ident, batch_size=1).samples())
    # over http: a server that drops the connection mid-transfer twice is read again; one that
    # keeps dropping it is named after 3 attempts
    site = tmp_path / "site"
    _index(site, INDEX_NAME, listed, shards)
    good = [k for k, _, _ in iter_shard(str(site / "shard-000001.tar"))]
    with _http(site, {"/shard-000001.tar": [3000, 2]}) as base:
        index = ShardIndex.load([f"{base}/{INDEX_NAME}"])
        assert [k for k, _, _ in iter_shard(index.urls[1], index.where(1), 7)] == good
    with _http(site, {"/shard-000001.tar": [3000, 99]}) as base:
        index = ShardIndex.load([f"{base}/{INDEX_NAME}"])
        with pytest.raises(ValueError, match=r"shard-000001.tar \(listed in http://.*\): cannot read the shard .* "
                                             r"after 3 attempts"):
            list(iter_shard(index.urls[1], index.where(1), 7))


def _ident(img: Image.Image) -> dict:
    return {"size": torch.tensor(img.size)}


def _ids(stream: ShardStream, workers: int) -> list[int]:
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, drop_last=True)
    return [i for batch in loader for i in batch["index"].tolist()]


@pytest.mark.parametrize("batch_size", [4, 8])  # 3 batches per worker, and 2 + 1
def test_two_ranks_two_workers_see_every_sample_once(shards: Path, batch_size: int) -> None:
    index = ShardIndex.load([shards])
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = ShardStream(index, _ident, batch_size, seed=1, rank=rank, world=2, shuffle_buffer=5)
            stream.set_epoch(epoch)
            ids = _ids(stream, workers=2)
            assert len(ids) == stream.steps_per_epoch * batch_size == 24
            seen += ids
        assert sorted(seen) == list(range(48))


def test_order_is_a_function_of_seed_and_epoch(shards: Path) -> None:
    index = ShardIndex.load([shards])

    def order(seed: int, epoch: int) -> list[int]:
        stream = ShardStream(index, _ident, 8, seed=seed, shuffle_buffer=5)
        stream.set_epoch(epoch)
        return [i for i, _, _ in stream.samples()]

    assert order(1, 0) == order(1, 0) and sorted(order(1, 0)) == list(range(48))
    assert order(1, 1) != order(1, 0) and order(2, 0) != order(1, 0)
    stream = ShardStream(index, _ident, 8, seed=1, shuffle_buffer=5)
    stream.set_epoch(3)
    a = next(iter(stream))
    b = next(iter(stream))
    assert a["index"] == b["index"] and torch.equal(a["size"], b["size"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_a_step_gives_the_uninterrupted_remainder(shards: Path, workers: int) -> None:
    index = ShardIndex.load([shards])
    for rank in (0, 1):
        stream = ShardStream(index, _ident, 8, seed=4, rank=rank, world=2, shuffle_buffer=5)
        stream.set_epoch(2)
        full = _ids(stream, workers)
        assert stream.steps_per_epoch == 3 and len(full) == 24
        for skip in (1, 2, 3):
            stream.set_epoch(2, skip=skip)
            assert _ids(stream, workers) == full[skip * 8:], (rank, skip)


def test_stream_from_http_and_pipe_urls(shards: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(shards)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/{INDEX_NAME}"
        for _ in range(100):
            try:
                remote = ShardIndex.load([url])
                break
            except ValueError:
                time.sleep(0.05)
        local = ShardIndex.load([shards])
        assert remote.urls[0] == f"http://127.0.0.1:{port}/shard-000000.tar" and remote.counts == local.counts
        a, b = (ShardStream(ix, _ident, 8, seed=2, shuffle_buffer=5) for ix in (remote, local))
        assert [(i, d) for i, d, _ in a.samples()] == [(i, d) for i, d, _ in b.samples()]
    finally:
        server.kill()
        server.wait()
    piped = iter_shard(f"pipe:cat {shards / 'shard-000001.tar'}")  # webdataset's pipe: convention
    assert [k for k, _, _ in piped] == [k for k, _, _ in iter_shard(str(shards / "shard-000001.tar"))]


def test_pretrain_streams_from_shards(shards: Path, tmp_path: Path) -> None:
    raw = {**tiny_overrides("moco"), "epochs": 1, "num_workers": 2, "data": [str(shards / INDEX_NAME)]}
    cfg = from_dict(PretrainConfig, {"method": "moco", **raw})
    run(cfg, tmp_path / "unused", tmp_path / "run", progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["steps"] == 48 // 8 and np.isfinite(metrics[0]["loss"])
    state = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    ckpt.save_atomic({**state, "epoch": 0, "step": 2}, tmp_path / "run" / "checkpoint.pt")  # as if killed at step 2
    fewer = from_dict(PretrainConfig, {"method": "moco", **raw, "num_workers": 0})
    with pytest.raises(ValueError, match="stopped mid-epoch with num_workers=2, now 0"):
        run(fewer, tmp_path / "unused", tmp_path / "run", progress=False)
    bad = from_dict(PretrainConfig, {"method": "moco", **raw, "data": [str(shards), str(tmp_path)]})
    with pytest.raises(ValueError, match=r"pretrain.data\[1\]: not a shard index"):
        run(bad, tmp_path / "unused", tmp_path / "run2", progress=False)


def test_pretrain_decodes_shard_samples_on_the_device(shards: Path, tmp_path: Path) -> None:
    """decode_on: device with shards: workers hand on each sample's JPEG bytes undecoded (the writer
    stored the PNGs as JPEGs too), the step decodes them; one epoch takes every full batch."""
    index = ShardIndex.load([shards / INDEX_NAME])
    stream = ShardStream(index, lambda enc: {"encoded": enc.data}, batch_size=8, seed=1, encoded=True)
    stream.set_epoch(0)
    kinds = sorted(item["encoded"].dim() for item in stream)
    assert kinds == [1] * (N_JPEG + N_PNG)
    raw = {**tiny_overrides("clicv2"), "epochs": 1, "num_workers": 2, "augment_on": "device", "decode_on": "device",
           "data": [str(shards / INDEX_NAME)]}
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
    assert (out / INDEX_NAME).read_text() == (shards / INDEX_NAME).read_text()  # same seed: same shards
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
    assert len(list(out.glob("shard-*.tar"))) == 7


def test_leak_check_reads_what_the_shards_hold(shards: Path, tmp_path: Path, photos: list[Path]) -> None:
    """An evaluation photo slipped into a shard whose summary was left alone is found: the check
    hashes the shards' content, never the summaries' word."""
    from clic.data.corpus import corpus_hashes, leaks
    from clic.data.imageio import resize_short
    from clic.data.table import Record

    listed = json.loads((shards / INDEX_NAME).read_text())["shards"]
    folder = tmp_path / "tampered"
    index = _index(folder, INDEX_NAME, listed, shards)
    summary = (folder / "shard-000004.json").read_text()
    buf = io.BytesIO()
    resize_short(load_rgb(photos[3]), 48).save(buf, "JPEG", quality=85)
    victim = ""
    with tarfile.open(shards / "shard-000004.tar") as src, tarfile.open(folder / "shard-000004.tar", "w") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".jpg") and not victim:  # the first sample's image, swapped
                payload, victim = buf.getvalue(), member.name
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    assert (folder / "shard-000004.json").read_text() == summary  # the summary says nothing changed
    records = corpus_records([index])
    assert len(records) == 48 and all(r.path.split("#")[0].endswith(".tar") for r in records)
    hashes = corpus_hashes(records, tmp_path / "hashes.jsonl", workers=1, progress=False)
    assert len(hashes.sha) == 48 and not hashes.errors
    evaluation = corpus_hashes([Record("eval/photo3", str(photos[3]), 0.5, "test",
                                       sha256=content_hash(load_rgb(photos[3])))],
                               tmp_path / "hashes.jsonl", workers=1, progress=False)
    found = leaks(hashes, evaluation)
    key = victim.rsplit(".", 1)[0]
    assert [(x.evaluation, x.exact) for x in found] == [("eval/photo3", False)] and x_bits_ok(found[0].bits)
    assert next(r.name for r in records if r.path.endswith(f"#{key}")) == found[0].corpus


def x_bits_ok(bits: int) -> bool:
    return 0 <= bits <= 4


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
    nobody writes): the shards before it are published; a re-run writes only the rest, and the
    result is the uninterrupted one byte for byte."""
    import os
    import signal

    slow = tmp_path / "slow.jpg"
    os.mkfifo(slow)
    records = corpus_records([corpus, slow])
    seed = next(s for s in range(100) if 3 <= [p for _, p, _ in shard_plan(records, 4, s)].index(str(slow)) // 4 < 10)
    blocked = [p for _, p, _ in shard_plan(records, 4, seed)].index(str(slow)) // 4  # its shard
    params = tmp_path / "params.yaml"
    params.write_text(f"seed: {seed}\n")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clic.cli", "data", "shard", "--params", str(params), "--out",
                             str(out), "--per-shard", "4", "--workers", "1", "--no-progress", str(corpus), str(slow)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / f"shard-{blocked - 1:06d}.tar").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # it stays blocked on the FIFO: nothing more can be published
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-{i:06d}.tar" for i in range(blocked)]
    assert not (out / INDEX_NAME).exists()
    slow.unlink()
    Image.fromarray(np.full((20, 24, 3), 77, np.uint8)).save(slow)  # the image becomes readable
    reference = write_shards(corpus_records([corpus, slow]), tmp_path / "ref", per_shard=4, seed=seed, workers=1,
                             progress=False)
    again = write_shards(corpus_records([corpus, slow]), out, per_shard=4, seed=seed, workers=2, progress=False)
    assert again.written == reference.shards - blocked and again.images == reference.images == 49
    ref = tmp_path / "ref"
    assert {p.name: _sha(p) for p in out.glob("shard-*")} == {p.name: _sha(p) for p in ref.glob("shard-*")}


def test_workers_die_with_a_killed_writer(corpus: Path, tmp_path: Path) -> None:
    """kill -9 of `clic data shard` alone (not its process group): its workers, one blocked on an
    image that never comes (a FIFO), end with it instead of waiting forever (~300 MB each)."""
    import os
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
