"""The CPU cores this process may use, and a scoped intra-op thread count."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroups' cpusets), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
