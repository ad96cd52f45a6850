"""Does it learn complexity, and does it carry over to kinds of images it never saw? Pretrain each
method (labels unused), probe every encoder and the baselines on the same folds, print a JSON table.

    python bench/real_data.py --params params/real-photos.yaml --out runs/unseen            # unseen kinds
    python bench/real_data.py --params params/real-photos.yaml --protocol final --out runs/final

Protocols:
- ``unseen`` (default): pretrain on ``pretrain.data`` only (the unlabelled corpus; none of the
  labelled photos, checked by content hash), then ridge-probe 5-fold inside each labelled category.
  Anything chosen by looking at numbers (the best single hand-crafted measure here) is chosen on
  the ``--select`` category only; the other categories are the report.
- ``final``: pretrain on everything available, ``pretrain.data`` plus the labelled photos: the
  encoders a user would take (``OUT/models/<method>/encoder.pt``). Its probe numbers are
  in-sample for pretraining (the encoder saw the probed images, not their labels).
- ``dev``: pretrain on the labelled photos only (the earlier protocol, for comparison).

Resumable: each method trains into ``OUT/models/<method>`` (re-running continues from checkpoints).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from clic.config import data_config, load_params, pretrain_config, probe_config
from clic.data.corpus import corpus_records, evaluation_records, find_leaks
from clic.data.prepare import prepare
from clic.data.table import read_table
from clic.evaluation import handcrafted
from clic.evaluation.evaluate import evaluate_encoder, evaluate_random, handcrafted_features
from clic.evaluation.metrics import bootstrap_ci, regression_metrics
from clic.pretrain import run

log = logging.getLogger("real_data")


def category_table(pred: np.ndarray, true: np.ndarray, cats: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    """SRCC / PCC with bootstrap 95% intervals, per category and over all images."""
    out: dict[str, Any] = {}
    groups = {c: np.array([x == c for x in cats]) for c in sorted(set(cats))}
    groups["all"] = np.ones(len(cats), bool)
    for name, m in groups.items():
        met = regression_metrics(pred[m], true[m])
        ci = bootstrap_ci(pred[m], true[m], n_boot, seed)
        out[name] = {"srcc": round(met["srcc"], 4), "srcc_ci95": [round(v, 3) for v in ci["srcc"]],
                     "pcc": round(met["pcc"], 4), "n": int(m.sum())}
    return out


def read_predictions(report_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with (report_dir / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["predicted"]) for r in rows]), np.array([float(r["human"]) for r in rows]),
            [r["category"] for r in rows])


def handcrafted_rows(data_dir: Path, select: str, n_boot: int, seed: int, workers: int) -> dict[str, Any]:
    """Every measure zero-shot per category; the best one is chosen on ``select`` only."""
    rows = [r for r in read_table(data_dir) if r.score is not None]
    x = handcrafted_features(rows, data_dir, workers)  # (N, 6)
    true = np.array([r.score for r in rows])
    cats = [r.category for r in rows]
    sel = np.array([c == select for c in cats])
    if not sel.any():
        raise ValueError(f"--select {select!r}: no labelled images of that category; have {sorted(set(cats))}")
    on_select = {m: regression_metrics(x[sel, j], true[sel])["srcc"] for j, m in enumerate(handcrafted.MEASURES)}
    best = max(on_select, key=lambda m: on_select[m])
    j = handcrafted.MEASURES.index(best)
    return {"selected_on": select, "srcc_on_selection": {m: round(v, 4) for m, v in on_select.items()},
            "best": best, "table": category_table(x[:, j], true, cats, n_boot, seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/real-photos.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/unseen")
    ap.add_argument("--protocol", choices=("unseen", "final", "dev"), default="unseen")
    ap.add_argument("--select", default="Scenes", help="the one category anything is chosen on")
    ap.add_argument("--methods", nargs="+", default=["moco", "clic", "clicv2"])
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    seed, pcfg, out = int(params.get("seed", 0)), probe_config(params), Path(args.out)
    dcfg = data_config(params)
    data_dir = prepare(dcfg, seed)
    corpus = list(params.get("pretrain", {}).get("data") or [])
    if args.protocol == "final":
        corpus = [*corpus, str(data_dir)]
    elif args.protocol == "dev":
        corpus = []
    elif not corpus:
        raise ValueError("protocol 'unseen' needs pretrain.data (the unlabelled corpus) in the params")
    if args.protocol == "unseen":  # the labelled photos must not be in the pretraining corpus
        leaks = find_leaks(corpus_records(corpus), evaluation_records(read_table(data_dir), pcfg.mode), workers=2)
        if leaks:
            raise ValueError(f"{len(leaks)} labelled images are in the pretraining corpus, e.g. {leaks[:3]}")
    section = {**params.get("pretrain", {}), "data": corpus}
    if args.protocol == "dev":  # every labelled image of the prepared dataset, labels unused
        section["common"] = {**section.get("common", {}), "splits": ["train", "test"]}
    params = {**params, "pretrain": section}
    n_boot = pcfg.bootstrap
    table: dict[str, Any] = {"protocol": args.protocol, "selection_category": args.select,
                             "pretrain_data": corpus or [str(data_dir)], "probe_image_size": pcfg.image_size}
    if not args.skip_baselines:
        table["handcrafted_best_single"] = handcrafted_rows(data_dir, args.select, n_boot, seed, pcfg.workers)
        from clic.evaluation.evaluate import evaluate_handcrafted

        evaluate_handcrafted(data_dir, pcfg, out / "reports" / "handcrafted", seed)
        table["handcrafted_ridge"] = category_table(*read_predictions(out / "reports" / "handcrafted"), n_boot, seed)
    randoms_done = set()
    for method in args.methods:
        cfg = pretrain_config(params, method)
        key = (cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth)
        if key not in randoms_done and not args.skip_baselines:
            rdir = out / "reports" / f"random_{method}"
            evaluate_random(cfg, data_dir, pcfg, rdir, seed)
            table[f"random_{cfg.backbone}"] = category_table(*read_predictions(rdir), n_boot, seed)
            randoms_done.add(key)
        start = time.time()
        encoder = run(cfg, data_dir, out / "models" / method, progress=False)
        minutes = round((time.time() - start) / 60, 1)
        rdir = out / "reports" / method
        evaluate_encoder(encoder, data_dir, pcfg, rdir, seed)
        table[method] = {**category_table(*read_predictions(rdir), n_boot, seed), "pretrain_minutes": minutes,
                         "epochs": cfg.epochs}
        print(json.dumps(table, indent=2), flush=True)
    path = out / "table.json"  # merged with the rows of earlier runs into the same OUT
    merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **table}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(merged, indent=2))


if __name__ == "__main__":
    main()
