"""One epoch of self-supervised pretraining (MAE ``engine_pretrain.train_one_epoch`` shape).

Knows nothing about where metrics go: it returns a dict of averages and calls ``on_checkpoint``
at the caller's cadence, after the losses so far were checked.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


class NonFiniteLossError(RuntimeError):
    """Raised before the optimiser step, so the last checkpoint stays the last good state."""


class ShortEpochError(ValueError):
    """The loader ran out before the planned steps: the epoch read less than it planned, so
    nothing of it is kept (no checkpoint, no encoder)."""


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``amp == "off"``; on CPU only when ``amp == "bf16"``."""
    if amp == "off" or (device.type != "cuda" and amp != "bf16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def train_one_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    epoch: int, steps_per_epoch: int, start_step: int, lr_at: Callable[[float], float],
                    momentum_at: Callable[[float], float], device: torch.device, amp: str = "auto",
                    clip_grad: float = 0.0, channels_last: bool = False,
                    on_checkpoint: Callable[[int, int], None] | None = None, checkpoint_every: int = 0,
                    sync_every: int = 1,
                    augment: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
                    augment_seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Train steps ``start_step..steps_per_epoch-1`` of ``epoch``; returns averaged metrics.

    ``lr_at``/``momentum_at`` map the fractional epoch to this step's values.
    ``on_checkpoint(epoch, steps_done)`` runs every ``checkpoint_every`` steps of the epoch (not
    at its end, which the caller saves anyway), always after the losses so far were checked.

    No host synchronisation per step: the step's outputs stay on the device and are read every
    ``sync_every`` steps, before a checkpoint and at the end of the epoch (``float(loss)`` each
    step would stall a GPU's queue). The non-finite check stays exact: the first offending step is
    named, and no checkpoint is written after it.

    ``augment(batch, generator)`` finishes the views on the device (``augment_on: device``); its
    generator is seeded from (``augment_seed``, epoch, step), so a resumed run draws the same.

    A loader that ends before ``steps_per_epoch`` raises :class:`ShortEpochError` (no partial
    epoch is ever taken for a whole one).
    """
    model.train()
    sums: dict[str, float] = {}
    pending: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # (step, lr, detached outputs)
    n_steps, n_images = 0, 0
    start = time.perf_counter()
    # an epoch is steps_per_epoch steps: a sharded loader may hold a few more (MosaicML pads every
    # rank to the same sample count with repeats, at the end of its order), never fewer
    bar = tqdm(itertools.islice(loader, steps_per_epoch - start_step), total=steps_per_epoch - start_step,
               desc=f"epoch {epoch}", unit="step",
               disable=not progress, leave=False)

    def flush() -> None:
        """Read the pending steps' outputs in one transfer; stop at the first non-finite loss."""
        if not pending:
            return
        keys = list(pending[0][2])
        values = torch.stack([torch.stack([o[k].float() for k in keys]) for _, _, o in pending]).cpu()  # (S, M)
        loss_col = keys.index("loss")
        for (step, lr, _), row in zip(pending, values.tolist(), strict=True):
            if not math.isfinite(row[loss_col]):
                parts = dict(zip(keys, row, strict=True))
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}: {parts}; stopping, the "
                                         "last checkpoint holds the last good state (lower the lr or enable "
                                         "clip_grad)")
            for k, v in zip([*keys, "lr"], [*row, lr], strict=True):
                sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values[-1, loss_col].item():.4f}", lr=f"{pending[-1][1]:.2e}")
        pending.clear()

    for i, batch in enumerate(bar, start=start_step):
        t = epoch + i / steps_per_epoch
        lr = lr_at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = to_device(batch, device, channels_last)
        if augment is not None:
            g = torch.Generator(device=device).manual_seed((augment_seed * 1_000_003 + epoch) * 1_000_003 + i)
            batch = to_device(augment(batch, g), device, channels_last)
        with autocast(device, amp):
            out = model(batch, momentum=momentum_at(t))
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        bsz = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() == 4).shape[0]
        n_steps += 1
        n_images += bsz
        pending.append((i, lr, {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)
                                and v.dim() == 0}))
        done = i + 1
        checkpoint = (on_checkpoint is not None and checkpoint_every > 0 and done % checkpoint_every == 0
                      and done < steps_per_epoch)
        if checkpoint or len(pending) >= sync_every:
            flush()
        if checkpoint:
            on_checkpoint(epoch, done)  # type: ignore[misc]
    flush()
    if n_steps < steps_per_epoch - start_step:
        raise ShortEpochError(f"epoch {epoch}: the loader gave {n_steps} of the {steps_per_epoch - start_step} "
                              f"planned steps ({n_images} images); a run that reads less than it planned stops, "
                              "and the last checkpoint holds the last complete state")
    elapsed = time.perf_counter() - start
    metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
    metrics["images_per_s"] = n_images / elapsed if elapsed > 0 else math.nan
    metrics["steps"] = float(n_steps)
    return metrics
