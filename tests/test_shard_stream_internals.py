"""The private parts of MosaicML streaming that :mod:`clic.data.shard_stream` relies on, checked on
the installed library, which ``pyproject.toml`` pins exactly for that reason: a release that renames,
moves or reshapes one of them fails here, not as a hung loader worker, a skipped cache lock or a
wrong world size in training. The list is the module's own: a private name it starts to use fails
here until it is listed."""

from __future__ import annotations

import ast
import inspect
import re
import threading
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from importlib.metadata import version
from pathlib import Path

import numpy as np
from filelock import BaseFileLock
from PIL import Image
from streaming import StreamingDataset
from streaming.base.dataset import _Iterator, _ShardState
from streaming.base.shared import SharedArray, SharedBarrier
from streaming.base.world import World

import clic.data.shard_stream as shard_stream
from clic.data.corpus import corpus_records
from clic.data.shard_stream import ShardStream
from clic.data.shards import write_shards

REPO = Path(__file__).resolve().parents[1]

# StreamingDataset's private attributes that ShardStream reads, sets or drops -> their type once a sample was read
PRIVATE = {
    "_unique_rank_world": World,  # .num_ranks: the world size an epoch is split over
    "_shard_states": SharedArray,  # of _ShardState: a shard whose fetch failed is marked LOCAL again
    "_cache_filelock": BaseFileLock,  # held while marking it
    "_shared_barrier": SharedBarrier,  # its FileLock `lock` dropped before loader workers fork
    "_iterator": _Iterator,  # .exit(): the previous epoch's threads stopped
    "_executor": ThreadPoolExecutor,  # .shutdown(): dropped before loader workers fork
    "_event": threading.Event,  # .set(): the download threads stopped on a failed shard
}
LAZY = ("_cache_filelock", "_iterator", "_executor", "_event")  # made by the first read: ShardStream tests hasattr
DROPPED = ("_iterator", "_executor", "_event")  # by ShardStream._forget_iteration, before every epoch
RESUME_KEYS = {"epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed"}  # ShardStream.set_epoch's


def _params(fn: Callable[..., object]) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_pin_is_the_installed_library() -> None:
    installed = version("mosaicml-streaming")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["shards"] == [f"mosaicml-streaming=={installed}"]
    assert f"mosaicml-streaming=={installed}" in (REPO / "requirements" / "lock.txt").read_text().splitlines()


def test_every_private_name_shard_stream_uses_is_listed() -> None:
    source = inspect.getsource(shard_stream)
    used = set(re.findall(r"self\.(_[A-Za-z]\w*)", source)) | set(re.findall(r"[\"'](_[A-Za-z]\w*)[\"']", source))
    own = set(vars(ShardStream)) | set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]+)?=(?!=)", source))
    assert used - own == set(PRIVATE)
    imported = {(node.module, alias.name) for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("streaming") for alias in node.names}
    assert imported == {("streaming", "Stream"), ("streaming", "StreamingDataset"),
                        ("streaming.base.dataset", "_ShardState")}


def test_private_classes_and_the_overridden_methods() -> None:
    assert issubclass(_ShardState, IntEnum) and {"PREPARING", "LOCAL"} <= set(_ShardState.__members__)
    assert _params(_Iterator.exit) == [("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)]
    for name in ("prepare_shard", "get_item", "__iter__"):  # MosaicML's threads call ShardStream's with its arguments
        assert _params(getattr(StreamingDataset, name)) == _params(getattr(ShardStream, name)), name
    assert isinstance(StreamingDataset.next_epoch, property) and StreamingDataset.next_epoch.fset is not None
    assert [p[0] for p in _params(StreamingDataset.load_state_dict)] == ["self", "obj"]


def test_private_attributes_of_a_streaming_dataset(tmp_path: Path) -> None:
    """On a real corpus behind a ``file://`` remote (fetched through ``prepare_shard``)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / f"{i}.jpg")
    write_shards(corpus_records([src]), tmp_path / "corpus", per_shard=4, seed=1, workers=1, progress=False)
    entry = f"file://{tmp_path / 'corpus'}"
    stream = ShardStream([entry], tmp_path / "cache", lambda img: {}, batch_size=2)
    assert stream._unique_rank_world.num_ranks == stream.world == 1
    assert not set(LAZY) & set(vars(stream)) and "lock" not in vars(stream._shared_barrier)
    assert stream._where(1) == f"{entry}: shard part-000001/shard.00000.mds"
    assert set(stream.state_dict(0, True)) >= RESUME_KEYS
    try:
        for _ in range(2):  # what _forget_iteration drops, the next iteration makes again
            stream.set_epoch(0)
            assert not set(DROPPED) & set(vars(stream)) and "lock" not in vars(stream._shared_barrier)
            first = next(iter(stream))["index"]
            for name, kind in PRIVATE.items():
                assert isinstance(vars(stream).get(name), kind), name
            assert isinstance(vars(stream._shared_barrier).get("lock"), BaseFileLock)
            shard = int(stream.spanner[first][0])
            assert stream._shard_states[shard] == _ShardState.LOCAL and shard in stream._checked
    finally:
        stream._forget_iteration()  # stops MosaicML's threads
