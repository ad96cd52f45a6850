"""Agreement between predicted and human complexity scores (computed with scipy).

PCC (Pearson), SRCC (Spearman), KRCC (Kendall tau-b), RMSE, MAE and RMAE as defined by IC9600's
code: ``sqrt(mean(|pred - true|))``. Bootstrap 95% intervals for PCC and SRCC resample images with
replacement (percentile method, fixed seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

_CORR = {"pcc": stats.pearsonr, "srcc": stats.spearmanr, "krcc": stats.kendalltau}


def _corr(kind: str, pred: np.ndarray, true: np.ndarray) -> float:
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        return math.nan  # undefined for constant inputs
    return float(_CORR[kind](pred, true)[0])


def regression_metrics(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> dict[str, float]:
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"pred and true must be 1-D of the same length, got {p.shape} and {t.shape}")
    err = p - t
    return {**{k: _corr(k, p, t) for k in _CORR},
            "rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
            "rmae": float(np.sqrt(np.mean(np.abs(err)))), "n": float(len(p))}


def bootstrap_ci(pred: np.ndarray, true: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of PCC and SRCC."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(p), size=(n_boot, len(p)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for kind in ("pcc", "srcc"):
        draws = np.array([_corr(kind, p[i], t[i]) for i in idx])
        out[kind] = (float(np.nanpercentile(draws, lo)), float(np.nanpercentile(draws, hi)))
    return out


def per_category(pred: np.ndarray, true: np.ndarray, categories: Sequence[str]) -> dict[str, dict[str, float]]:
    cats = np.asarray(categories)
    return {c: regression_metrics(np.asarray(pred)[cats == c], np.asarray(true)[cats == c])
            for c in sorted(set(cats.tolist())) if c}


def full_report(pred: np.ndarray, true: np.ndarray, categories: Sequence[str] | None = None,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics, bootstrap intervals (``pcc_ci95``/``srcc_ci95``) and per-category metrics."""
    report: dict = regression_metrics(pred, true)
    if n_boot:
        ci = bootstrap_ci(pred, true, n_boot, seed)
        report["pcc_ci95"], report["srcc_ci95"] = list(ci["pcc"]), list(ci["srcc"])
    if categories is not None and len(set(categories)) > 1:
        report["per_category"] = per_category(pred, true, categories)
    return report


def paired_srcc_difference(new: Sequence[float] | np.ndarray, old: Sequence[float] | np.ndarray,
                           true: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                           level: float = 0.95) -> dict[str, float]:
    """SRCC(new) - SRCC(old) on the same images, with the one-sided lower bound at ``level`` of a
    paired bootstrap (each draw resamples the images once for both): ``lower > 0`` says ``new``
    ranks these images better than ``old`` by more than their sampling noise."""
    a, b, t = (np.asarray(v, np.float64) for v in (new, old, true))
    if not a.shape == b.shape == t.shape or a.ndim != 1:
        raise ValueError(f"new, old and true must be 1-D of one length, got {a.shape}, {b.shape}, {t.shape}")
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, len(t), len(t))
        draws[i] = _corr("srcc", a[idx], t[idx]) - _corr("srcc", b[idx], t[idx])
    lower = float(np.nanpercentile(draws, (1 - level) * 100))
    return {"diff": _corr("srcc", a, t) - _corr("srcc", b, t), "lower": lower, "n": float(len(t)), "level": level}
