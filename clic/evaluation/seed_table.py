"""Seeds and images into one table: per category the mean SRCC over seeds with its spread, and
paired differences with 95% intervals over seeds and images (a hierarchical bootstrap). The rows
come from prediction files (``name, category, human, predicted``), read from a study's MLflow runs
(``clic study table``, stages/study_table.py) or from folders (:func:`read_folder`).

Interval of a difference A - B: each bootstrap draw resamples the images (the same draw for A and
B) and the seeds (the same seed indices for A and B where both ran them: the seed sets the probe's
folds as well as the pretraining), and takes mean-over-seeds SRCC of A minus that of B. A claim is
made only where the 95% interval excludes zero.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

Predictions = dict[str, tuple[float, float, str]]  # image name -> (predicted, human, category)
Rows = dict[str, dict[int, Predictions]]  # row -> seed -> predictions


def read_predictions(lines: Iterable[str]) -> Predictions:
    """A ``predictions.csv`` (its lines) as image name -> (predicted, human, category)."""
    return {r["name"]: (float(r["predicted"]), float(r["human"]), r["category"]) for r in csv.DictReader(lines)}


def read_folder(files: dict[tuple[str, int], Path]) -> Rows:
    """(row, seed) -> ``predictions.csv`` path, as rows."""
    rows: Rows = {}
    for (row, seed), path in sorted(files.items()):
        with path.open(newline="") as fh:
            rows.setdefault(row, {})[seed] = read_predictions(fh)
    return rows


def _srcc(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis: pred (..., N), true (N,) or (..., N)."""
    rp, rt = rankdata(pred, axis=-1), rankdata(true, axis=-1)
    rp = rp - rp.mean(-1, keepdims=True)
    rt = rt - rt.mean(-1, keepdims=True)
    return (rp * rt).sum(-1) / np.sqrt((rp * rp).sum(-1) * (rt * rt).sum(-1))


class Study:
    """Predictions aligned on one image order: ``pred[row]`` is (seeds, N), ``true`` (N,)."""

    def __init__(self, rows: Rows) -> None:
        """``ValueError`` unless every row and seed scored the same images with the same human
        scores: a table over seeds compares them on one evaluation set (a synthetic set or a
        train/test split drawn from each run's seed is another set per seed: fix ``data.seed``)."""
        cells = [(row, seed, p) for row, seeds in rows.items() for seed, p in seeds.items()]
        first_row, first_seed, first = cells[0]
        for row, seed, p in cells[1:]:
            if set(p) != set(first):
                odd = sorted(set(p) ^ set(first))
                raise ValueError(f"{row} seed {seed} and {first_row} seed {first_seed} scored different images "
                                 f"({len(odd)} in one only, e.g. {odd[0]}): a seed table needs one evaluation set "
                                 "(probe.mode cv, or data.seed fixed)")
            differ = next((n for n in first if p[n][1:] != first[n][1:]), None)
            if differ is not None:
                raise ValueError(f"{differ}: human score or category {p[differ][1:]} in {row} seed {seed} but "
                                 f"{first[differ][1:]} in {first_row} seed {first_seed}: the cells evaluated "
                                 "different data under one name (data.seed fixes a synthetic set or split)")
        names = sorted(first)
        self.names = names
        self.true = np.array([first[n][1] for n in names])
        self.categories = np.array([first[n][2] for n in names])
        self.seeds = {row: sorted(seeds) for row, seeds in rows.items()}
        self.pred = {row: np.array([[seeds[s][n][0] for n in names] for s in self.seeds[row]])
                     for row, seeds in rows.items()}

    def groups(self) -> dict[str, np.ndarray]:
        out = {c: np.flatnonzero(self.categories == c) for c in sorted(set(self.categories.tolist()))}
        out["all"] = np.arange(len(self.names))
        return out

    def summary(self, row: str) -> dict[str, Any]:
        """Per category: mean SRCC over seeds, its standard deviation and the per-seed values."""
        out = {}
        for cat, idx in self.groups().items():
            per_seed = _srcc(self.pred[row][:, idx], self.true[idx])
            out[cat] = {"mean": round(float(per_seed.mean()), 4),
                        "sd": round(float(per_seed.std(ddof=1)), 4) if len(per_seed) > 1 else None,
                        "seeds": {s: round(float(v), 4) for s, v in zip(self.seeds[row], per_seed, strict=True)}}
        return out

    def difference(self, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
        """Mean-over-seeds SRCC of ``a`` minus ``b`` per category, with a 95% interval over seeds
        and images (paired on the shared seeds and on the images)."""
        shared = sorted(set(self.seeds[a]) & set(self.seeds[b]))
        paired = len(shared) > 0 and set(self.seeds[a]) == set(self.seeds[b])
        rng = np.random.default_rng(seed)
        out = {}
        for cat, idx in self.groups().items():
            pa, pb, t = self.pred[a][:, idx], self.pred[b][:, idx], self.true[idx]
            point = float(_srcc(pa, t).mean() - _srcc(pb, t).mean())
            draws = np.empty(n_boot)
            for i in range(n_boot):
                img = rng.integers(0, len(idx), len(idx))
                sa = rng.integers(0, pa.shape[0], pa.shape[0])
                sb = sa if paired else rng.integers(0, pb.shape[0], pb.shape[0])
                draws[i] = _srcc(pa[sa][:, img], t[img]).mean() - _srcc(pb[sb][:, img], t[img]).mean()
            lo, hi = np.nanpercentile(draws, [2.5, 97.5])
            out[cat] = {"diff": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
                        "excludes_zero": bool(lo > 0 or hi < 0)}
        return {"a": a, "b": b, "seeds_a": self.seeds[a], "seeds_b": self.seeds[b], "paired_seeds": paired,
                "by_category": out}


def default_pairs(rows: list[str], methods: list[str], random_of: dict[str, str]) -> list[tuple[str, str]]:
    """Each method minus the one before it (``methods`` in order: CLIC - MoCo v2, CLICv2 - CLIC),
    each method minus its architecture's random init (``random_of[method]``) and minus the
    hand-crafted ridge, and each variant's row ``<variant>/<method>`` minus the method's row."""
    have = set(rows)
    present = [m for m in methods if m in have]
    pairs = list(zip(present[1:], present[:-1], strict=True))
    for m in present:
        pairs += [(m, r) for r in (random_of.get(m, ""), "handcrafted") if r in have]
    pairs += [(r, r.split("/", 1)[1]) for r in rows if "/" in r and r.split("/", 1)[1] in have]
    return pairs


def markdown(study: Study, diffs: list[dict[str, Any]]) -> str:
    cats = list(study.groups())
    lines = ["| row | seeds | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    for row in study.pred:
        s = study.summary(row)
        cells = [f"{s[c]['mean']:.3f}" + (f" ± {s[c]['sd']:.3f}" if s[c]["sd"] is not None else "") for c in cats]
        lines.append(f"| {row} | {len(study.seeds[row])} | " + " | ".join(cells) + " |")
    lines += ["", "| difference | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for d in diffs:
        cells = []
        for c in cats:
            x = d["by_category"][c]
            cell = f"{x['diff']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"
            cells.append(f"**{cell}**" if x["excludes_zero"] else cell)
        lines.append(f"| {d['a']} - {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
