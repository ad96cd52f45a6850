"""Distributed helpers that are no-ops in a single process (CPU or one GPU).

A floor below models/ and engine/: the methods' collectives (MoCo's gather of keys, shuffling BN)
and the engine's process group both come from here.
"""

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


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffling BN across ranks (He et al. 2020, ``_batch_shuffle_ddp``): gather the global
    batch, permute it with one permutation shared by every rank, and hand each rank its slice, so
    a key's BatchNorm statistics come from other images than its query's.

    x: (B, ...) this rank's batch. Returns (this rank's shuffled slice (B, ...), the inverse
    permutation (B * world,) for :func:`batch_unshuffle`). Identity with one process.
    """
    n = world_size()
    if n == 1:
        return x, torch.arange(x.shape[0], device=x.device)
    gathered = concat_all_gather(x)  # (B * world, ...)
    perm = torch.randperm(gathered.shape[0]).to(x.device)
    dist.broadcast(perm, src=0)
    return gathered[perm.view(n, -1)[rank()]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle`: (B, ...) shuffled slice -> (B, ...) in this rank's own order."""
    n = world_size()
    if n == 1:
        return x
    gathered = concat_all_gather(x)  # (B * world, ...)
    return gathered[inverse.view(n, -1)[rank()]]
