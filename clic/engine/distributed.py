"""Distributed helpers that are no-ops in a single process (CPU or one GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA. Returns True when running distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_initialized()):
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (B, ...) from every rank along dim 0 (identity with one process)."""
    n = world_size()
    if n == 1:
        return t
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
