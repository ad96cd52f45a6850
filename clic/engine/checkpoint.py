"""Atomic, safely-loadable checkpoints carrying the resolved config and the git revision.

Everything saved is tensors, numbers, strings, lists, tuples and dicts, so
``torch.load(weights_only=True)`` reads it back (no arbitrary pickles).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from clic import atomic


def git_revision(cwd: str | Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty`` of the working tree, ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> str:
    """Hash of the ``clic`` package's source: a run resumes only from a checkpoint of the same code
    (a changed method retrains), and a result names the code that produced it."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(package.rglob("*.py")):
        h.update(p.relative_to(package.parent).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` siblings of ``path`` left by killed writers (their process
    is gone); called by every save and when a training run starts. Readers never delete."""
    path = Path(path)
    return atomic.remove_leftovers(path.parent, rf"\.{re.escape(path.name)}\.(?P<pid>\d+)\.tmp")


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ValueError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
