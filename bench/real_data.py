"""Does it learn complexity, and does it carry over to kinds of images it never saw? Pretrain each
method (labels unused), probe every encoder and the baselines on the same folds, print a JSON table.

    python bench/real_data.py --params params/real-photos.yaml --out runs/unseen            # unseen kinds
    python bench/real_data.py --params params/real-photos.yaml --protocol final --out runs/final

Protocols:
- ``unseen`` (default): pretrain on ``pretrain.data`` only (the unlabelled corpus, checked to hold
  none of the labelled photos, resized or re-encoded copies included: decoded pixels and perceptual
  hashes, ``validate.near_duplicate_bits``), then ridge-probe 5-fold inside each labelled category.
  Anything chosen by looking at numbers (the best single hand-crafted measure) is chosen on the
  ``--select`` category only; the other categories are the report.
- ``final``: pretrain on ``pretrain.data`` plus the labelled photos: the encoders a user would take
  (``OUT/models/<method>/encoder.pt``); its probe numbers are in-sample for pretraining.
- ``dev``: pretrain on the labelled photos only (the earlier protocol, for comparison).

``--seeds 0 1 2`` runs each seed (pretraining, the probe's folds, the random inits) into
``OUT/seed-<s>/``, for ``bench/seed_table.py``. Resumable: run the same command again; a method
whose encoder (same config, same code) and probe report are there is not redone. A seed is
bit-identical only at the same thread count (``OMP_NUM_THREADS``, recorded in ``table.json`` beside
each row's code version and git revision).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import parser, timed  # this folder's shared helpers (on sys.path)

from clic.data.corpus import corpus_records, evaluation_records, find_leaks
from clic.data.prepare import prepare
from clic.data.table import read_table
from clic.engine import checkpoint as ckpt
from clic.evaluation import handcrafted
from clic.evaluation.evaluate import evaluate_encoder, evaluate_handcrafted, evaluate_random, handcrafted_features
from clic.evaluation.metrics import bootstrap_ci, regression_metrics
from clic.params import data_config, load_params, pretrain_config, probe_config, to_dict, validate_config
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
    ap = parser(__doc__)
    ap.add_argument("--params", default="params/real-photos.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/unseen")
    ap.add_argument("--protocol", choices=("unseen", "final", "dev"), default="unseen")
    ap.add_argument("--select", default="Scenes", help="the one category anything is chosen on")
    ap.add_argument("--methods", nargs="+", default=["moco", "clic", "clicv2"])
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--encoders", nargs="+", default=[], metavar="METHOD=PATH",
                    help="probe these encoders (encoder.pt or checkpoint.pt) instead of pretraining those methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="one run per seed into OUT/seed-<s>/ (default: the params' seed, into OUT)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    data_seed = int(params.get("seed", 0))  # one prepared dataset for every seed (its split is unused in cv mode)
    if args.seeds is None:
        run_seed(args, params, Path(args.out), data_seed)
    for seed in args.seeds or []:
        run_seed(args, {**params, "seed": seed}, Path(args.out) / f"seed-{seed}", data_seed)


def done_before(encoder: Path, report: Path, cfg: Any) -> bool:
    """Whether ``encoder`` was trained with exactly ``cfg`` and probed into ``report`` (resume)."""
    if not (encoder.is_file() and (report / "predictions.csv").is_file()):
        return False
    return torch.load(encoder, map_location="cpu", weights_only=False).get("config") == to_dict(cfg)


def run_seed(args: argparse.Namespace, params: dict[str, Any], out: Path, data_seed: int) -> None:
    """One seed of the protocol into ``out`` (``table.json`` there): the seed drives pretraining,
    the random inits and the probe's folds; the dataset is prepared with ``data_seed``."""
    seed, pcfg = int(params.get("seed", 0)), probe_config(params)
    data_dir = prepare(data_config(params), data_seed)
    corpus = list(params.get("pretrain", {}).get("data") or [])
    if args.protocol == "final":
        corpus = [*corpus, str(data_dir)]
    elif args.protocol == "dev":
        corpus = []
    elif not corpus:
        raise ValueError("protocol 'unseen' needs pretrain.data (the unlabelled corpus) in the params")
    if args.protocol == "unseen":  # the labelled photos must not be in the pretraining corpus
        bits = validate_config(params).near_duplicate_bits
        leaks = find_leaks(corpus_records(corpus), evaluation_records(read_table(data_dir), pcfg.mode), data_dir,
                           bits, workers=2)
        if leaks:
            raise ValueError(f"{len(leaks)} labelled images are in the pretraining corpus (identical or within "
                             f"{bits} perceptual-hash bits), e.g. {'; '.join(map(str, leaks[:3]))}")
    section = {**params.get("pretrain", {}), "data": corpus}
    if args.protocol == "dev":  # every labelled image of the prepared dataset, labels unused
        section["common"] = {**section.get("common", {}), "splits": ["train", "test"]}
    params = {**params, "pretrain": section}
    n_boot = pcfg.bootstrap
    table: dict[str, Any] = {"protocol": args.protocol, "selection_category": args.select, "seed": seed,
                             "pretrain_data": corpus or [str(data_dir)], "probe_image_size": pcfg.image_size,
                             "torch_threads": torch.get_num_threads()}
    if not args.skip_baselines:
        table["handcrafted_best_single"] = handcrafted_rows(data_dir, args.select, n_boot, seed, pcfg.workers)
        evaluate_handcrafted(data_dir, pcfg, out / "reports" / "handcrafted", seed)
        table["handcrafted_ridge"] = category_table(*read_predictions(out / "reports" / "handcrafted"), n_boot, seed)
    code = ckpt.code_version()  # a run interrupted under other code retrains instead of resuming
    given = dict(e.split("=", 1) for e in args.encoders)
    for m, path in given.items():
        if m not in args.methods or not Path(path).is_file():
            raise ValueError(f"--encoders {m}={path}: expected METHOD=PATH with METHOD in --methods and PATH a file")
    randoms_done = set()
    for method in args.methods:
        cfg = pretrain_config(params, method)
        key = (cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth)
        if key not in randoms_done and not args.skip_baselines:
            rdir = out / "reports" / f"random_{method}"
            evaluate_random(cfg, data_dir, pcfg, rdir, seed)
            table[f"random_{cfg.backbone}"] = category_table(*read_predictions(rdir), n_boot, seed)
            randoms_done.add(key)
        rdir, encoder = out / "reports" / method, out / "models" / method / "encoder.pt"
        if method in given:  # trained elsewhere (bench/gpu_corpus.py): probed only
            evaluate_encoder(given[method], data_dir, pcfg, rdir, seed)
            table[method] = {**category_table(*read_predictions(rdir), n_boot, seed), "encoder": str(given[method])}
        elif done_before(encoder, rdir, cfg):
            log.info("%s: trained and probed before with this config (%s); not redone", method, rdir)
            earlier = read_json(out / "table.json").get(method, {})
            table[method] = {**category_table(*read_predictions(rdir), n_boot, seed),
                             **{k: earlier[k] for k in ("pretrain_minutes", "epochs", "code_version", "git")
                                if k in earlier}}
        else:
            encoder, seconds = timed(run, cfg, data_dir, out / "models" / method, progress=False, code_version=code)
            evaluate_encoder(encoder, data_dir, pcfg, rdir, seed)
            table[method] = {**category_table(*read_predictions(rdir), n_boot, seed),
                             "pretrain_minutes": round(seconds / 60, 1), "epochs": cfg.epochs, "code_version": code,
                             "git": ckpt.git_revision()}
        save_table(out, table)  # after each method: an interrupted run keeps what it measured
    print(json.dumps(save_table(out, table), indent=2))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_table(out: Path, table: dict[str, Any]) -> dict[str, Any]:
    """``table`` merged over the rows of earlier runs into ``out/table.json``, written atomically."""
    path = out / "table.json"
    merged = {**read_json(path), **table}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return merged


if __name__ == "__main__":
    main()
