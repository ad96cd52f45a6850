"""What the benchmarks share: the command line, clocks, peak memory and the JSON they print."""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
P = ParamSpec("P")
T = TypeVar("T")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's command line, its module docstring as the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def emit(result: dict[str, Any], indent: int = 1) -> None:
    """The result, as the JSON the script prints on stdout."""
    print(json.dumps(result, indent=indent))


def sync(device: torch.device | None) -> None:
    """Wait for the work queued on a CUDA device, so that a clock read after it times that work."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def rate(n: int, fn: Callable[[], object], repeat: int = 1, device: torch.device | None = None,
         ndigits: int | None = 1) -> float:
    """Items/s (rounded to ``ndigits``) of ``repeat`` calls of ``fn`` that each handle ``n`` items;
    the ``device``'s queued work is waited for before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    per_s = repeat * n / (time.perf_counter() - start)
    return per_s if ndigits is None else round(per_s, ndigits)


def peak_rss_mb(workers: bool = False) -> float:
    """Peak resident memory in MiB of this process, or of its largest reaped child (``workers``)."""
    who = resource.RUSAGE_CHILDREN if workers else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # KiB on Linux
