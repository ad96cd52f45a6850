"""Seeds and images into one table: per category the mean SRCC over seeds with its spread, and
paired differences with 95% intervals over seeds and images (a hierarchical bootstrap).

    python bench/seed_table.py runs/seeds/main [runs/seeds/clicv2-nomem ...] [--json OUT.json]

Each argument is a ``bench/real_data.py --seeds ...`` output folder (``seed-<s>/reports/<row>/
predictions.csv``); a row of a folder other than the first is named ``<folder>/<row>``
(``clicv2-nomem/clicv2``). Rows: every method, ``handcrafted`` (ridge on the six measures) and
``random_<method>`` (its architecture at random init).

Interval of a difference A - B: each bootstrap draw resamples the images (the same draw for A and
B) and the seeds (the same seed indices for A and B where both ran them: the seed sets the probe's
folds as well as the pretraining), and takes mean-over-seeds SRCC of A minus that of B. A claim is
made only where the 95% interval excludes zero.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import parser  # this folder's shared helpers (on sys.path)
from scipy.stats import rankdata

Rows = dict[str, dict[int, dict[str, tuple[float, float, str]]]]


def read_rows(folders: list[Path], only: set[int] | None = None) -> Rows:
    """row -> seed -> image name -> (predicted, human, category); ``only``: these seeds alone."""
    rows: Rows = {}
    for i, folder in enumerate(folders):
        for seed_dir in sorted(folder.glob("seed-*")):
            seed = int(seed_dir.name.split("-", 1)[1])
            if only is not None and seed not in only:
                continue
            for report in sorted((seed_dir / "reports").glob("*/predictions.csv")):
                name = report.parent.name if i == 0 else f"{folder.name}/{report.parent.name}"
                with report.open(newline="") as fh:
                    preds = {r["name"]: (float(r["predicted"]), float(r["human"]), r["category"])
                             for r in csv.DictReader(fh)}
                rows.setdefault(name, {})[seed] = preds
    if not rows:
        raise SystemExit(f"no seed-*/reports/*/predictions.csv under {', '.join(map(str, folders))}")
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
        names = sorted(set.intersection(*(set(p) for seeds in rows.values() for p in seeds.values())))
        first = next(iter(next(iter(rows.values())).values()))
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


def default_pairs(rows: list[str]) -> list[tuple[str, str]]:
    """CLIC - MoCo, CLICv2 - CLIC, each method - its random init and - the hand-crafted ridge, and
    each ablation folder's row - the main row of its method."""
    have = set(rows)
    pairs = [(a, b) for a, b in (("clic", "moco"), ("clicv2", "clic")) if a in have and b in have]
    for m in ("moco", "clic", "clicv2"):
        # real_data.py probes a random init once per architecture: CLIC's ResNet is MoCo's
        rand = f"random_{m}" if f"random_{m}" in have or m != "clic" else "random_moco"
        if m in have:
            pairs += [(m, r) for r in (rand, "handcrafted") if r in have]
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


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="these seeds only (to pair a one-seed variant with the same seed of its base row)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="also the difference A - B of two rows (e.g. clicv2-nomem/clicv2 clicv2-maskonly/clicv2)")
    args = ap.parse_args()
    study = Study(read_rows(args.folders, set(args.seeds) if args.seeds else None))
    unknown = [r for pair in args.pair for r in pair if r not in study.pred]
    if unknown:
        ap.error(f"--pair: no row {unknown[0]!r}; rows: {', '.join(study.pred)}")
    pairs = dict.fromkeys(default_pairs(list(study.pred)) + [tuple(p) for p in args.pair])  # once each
    diffs = [study.difference(a, b, args.boot) for a, b in pairs]
    print(f"{len(study.names)} images; mean SRCC ± sd over seeds; differences with 95% intervals over seeds and "
          "images (bold: the interval excludes zero)\n")
    print(markdown(study, diffs))
    if args.json:
        args.json.write_text(json.dumps({"rows": {r: study.summary(r) for r in study.pred}, "differences": diffs},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
