"""Schedules as pure functions of the fractional epoch ``t`` (MAE ``lr_sched``, MoCo v3
``adjust_moco_momentum``); the engine calls them every step, the model holds no schedule."""

from __future__ import annotations

import math


def cosine_lr(t: float, base: float, epochs: float, warmup: float, min_ratio: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` epochs, then half-cosine decay to ``min_ratio * base``."""
    if warmup > 0 and t < warmup:
        return base * t / warmup
    span = max(epochs - warmup, 1e-8)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_momentum(t: float, base: float, epochs: float) -> float:
    """Key-encoder momentum rising from ``base`` to 1 on a half cosine (MoCo v3 / BYOL)."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
