"""PNG plots of probe results (matplotlib, imported lazily: the core does not need it to train)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib ships with the pipeline extra
        raise ValueError("plots need matplotlib (pip install 'clic[pipeline]')") from exc
    return plt


def scatter(pred: np.ndarray, true: np.ndarray, title: str, metrics: dict, out: str | Path,
            categories: Sequence[str] | None = None) -> Path:
    """Predicted vs human score, PCC/SRCC in the title."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    cats = np.asarray(categories if categories is not None else [""] * len(pred))
    for c in sorted(set(cats.tolist())):
        sel = cats == c
        ax.scatter(np.asarray(true)[sel], np.asarray(pred)[sel], s=10, alpha=0.7, label=c or None)
    lo, hi = float(min(np.min(true), np.min(pred))), float(max(np.max(true), np.max(pred)))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel("human score")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{title}\nPCC {metrics['pcc']:.3f}  SRCC {metrics['srcc']:.3f}  (n={len(pred)})")
    if len(set(cats.tolist())) > 1:
        ax.legend(fontsize=7, markerscale=1.5)
    return _save(plt, fig, out)


def category_errors(report: dict, title: str, out: str | Path) -> Path | None:
    """Bar chart of per-category RMSE and SRCC."""
    per = report.get("per_category")
    if not per:
        return None
    plt = _plt()
    names = sorted(per)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100)
    for ax, key, color in zip(axes, ("rmse", "srcc"), ("tab:red", "tab:blue"), strict=True):
        ax.bar(names, [per[n][key] for n in names], color=color)
        ax.set_title(f"{key.upper()} by category")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(title)
    return _save(plt, fig, out)


def _save(plt: Any, fig: Any, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
