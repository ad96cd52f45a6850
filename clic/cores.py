"""The CPU cores this process may use, and a scoped intra-op thread count."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroups' cpusets), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def die_with_parent() -> None:
    """Initializer of worker processes: on Linux, the kernel kills this process when its parent
    dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of a command leaves no workers blocked forever on
    a queue nobody feeds. Elsewhere nothing (the workers end when their queue is closed)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call: nobody would signal us
            os._exit(1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
