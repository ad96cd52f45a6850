"""Crash safety of prepared folders and checkpoints: kills and Ctrl-C during the swap, leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic import atomic
from clic.config import DataConfig
from clic.data.prepare import prepare
from clic.data.table import read_table
from clic.engine import checkpoint as ckpt


def _source(root: Path, labels: list[float]) -> DataConfig:
    """A folder source of len(labels) 40x40 images with these labels, prepared into ``root/prep``."""
    folder = root / "imgs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
    (root / "s.csv").write_text("image,score,split\n" + "".join(f"{i}.png,{v},train\n" for i, v in enumerate(labels)))
    return DataConfig(source="folder", path=str(folder), csv=str(root / "s.csv"), out_dir=str(root / "prep"),
                      cache_size=32)


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


_KILL_IN_SWAP = """
import os, sys
from clic.config import DataConfig
from clic.data.prepare import prepare
out = sys.argv[1]
def dies_on_swap(real):
    def rename(src, dst, *args, **kwargs):
        if ".partial-" in os.fspath(src) and os.fspath(dst) == out:
            os._exit(9)  # as kill -9 between moving the old folder away and the new one in
        return real(src, dst, *args, **kwargs)
    return rename
os.rename, os.replace = dies_on_swap(os.rename), dies_on_swap(os.replace)
prepare(DataConfig(source="folder", path=sys.argv[2], csv=sys.argv[3], out_dir=out, cache_size=32), workers=1)
"""


def test_a_kill_during_the_swap_keeps_the_previous_dataset(tmp_path: Path) -> None:
    cfg = _source(tmp_path, [0.1, 0.2, 0.3])
    out = prepare(cfg, workers=1)
    before = (out / "table.csv").read_text()
    _source(tmp_path, [0.9, 0.8, 0.7])  # new labels: the next prepare rebuilds and swaps
    proc = subprocess.Popen([sys.executable, "-c", _KILL_IN_SWAP, str(out), cfg.path, cfg.csv],
                            stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=300) == 9, proc.stderr.read() if proc.stderr else ""
    assert not out.exists()  # the kill fell between the two renames
    assert [p.name for p in tmp_path.glob("prep.old-*")] == [f"prep.old-{proc.pid}"]
    atomic.recover_dir(out)  # what every prepare does first, under the lock
    assert (out / "table.csv").read_text() == before
    assert not list(tmp_path.glob("prep.*-*"))  # the killed run's partial and aside folders are gone
    assert [r.score for r in read_table(prepare(cfg, workers=1))] == [0.9, 0.8, 0.7]


def test_prepare_restores_an_aside_dataset_on_start(tmp_path: Path, dead_pid: int) -> None:
    cfg = _source(tmp_path, [0.1, 0.2])
    out = prepare(cfg, workers=1)
    os.rename(out, tmp_path / f"prep.old-{dead_pid}")  # the state a kill between the renames leaves
    stamp = (tmp_path / f"prep.old-{dead_pid}" / "table.csv").stat().st_mtime_ns
    assert prepare(cfg, workers=1) == out
    assert (out / "table.csv").stat().st_mtime_ns == stamp  # restored, found up to date, not rebuilt
    assert sorted(p.name for p in tmp_path.glob("prep*")) == ["prep", "prep.lock"]


def test_ctrl_c_during_the_swap_keeps_the_previous_dataset(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _source(tmp_path, [0.1, 0.2])
    out = prepare(cfg, workers=1)
    before = (out / "table.csv").read_text()
    _source(tmp_path, [0.6, 0.7])
    real = os.rename

    def interrupted(src: str | Path, dst: str | Path) -> None:
        if ".partial-" in os.fspath(src) and Path(dst) == out:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, workers=1)
    monkeypatch.undo()
    assert (out / "table.csv").read_text() == before
    assert sorted(p.name for p in tmp_path.glob("prep*")) == ["prep", "prep.lock"]


def test_leftovers_of_killed_runs_are_removed_on_the_next_start(tmp_path: Path, dead_pid: int,
                                                                live_pid: int) -> None:
    cfg = _source(tmp_path, [0.1, 0.2])
    dead = [tmp_path / f"prep.partial-{dead_pid}", tmp_path / f"prep.old-{dead_pid}",
            tmp_path / f"prep.partial-{dead_pid}.partial-{dead_pid}"]
    alive = [tmp_path / f"prep.partial-{live_pid}", tmp_path / "prep.partial-notapid", tmp_path / "prep-other"]
    for d in dead + alive:
        (d / "cache").mkdir(parents=True)
        (d / atomic.MARKER).write_text("")  # what prepare wrote (the old one is restored first, then replaced)
    prepare(cfg, workers=1)
    assert not any(d.exists() for d in dead)
    assert all(d.exists() for d in alive)  # a running writer's folder and other names are not touched


def test_checkpoint_temporaries_of_killed_writers_are_removed(tmp_path: Path, dead_pid: int,
                                                              live_pid: int) -> None:
    path = tmp_path / "checkpoint.pt"
    dead, alive = tmp_path / f".checkpoint.pt.{dead_pid}.tmp", tmp_path / f".checkpoint.pt.{live_pid}.tmp"
    other = tmp_path / f".encoder.pt.{dead_pid}.tmp"
    for f in (dead, alive, other):
        f.write_bytes(b"half a checkpoint")
    ckpt.save_atomic({"w": torch.ones(2)}, path)
    assert not dead.exists() and alive.exists() and other.exists()
    dead.write_bytes(b"half a checkpoint")
    assert torch.equal(ckpt.load(path)["w"], torch.ones(2))
    assert dead.exists()  # a reader (maybe on another machine sharing the folder) deletes nothing
    assert ckpt.remove_leftovers(path) == [dead]  # what a training run does when it starts


def test_replace_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path: Path) -> None:
    out, tmp = tmp_path / "out", tmp_path / "new"
    (out / "keep").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        atomic.replace_dir(tmp, out, "test", ["keep"])  # ``new`` does not exist: the second rename fails
    assert (out / "keep").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
