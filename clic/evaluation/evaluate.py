"""Probe an encoder (or a baseline) on a prepared dataset and write its report.

Outputs in ``out_dir``: ``metrics.json`` (pcc, srcc, krcc, rmse, rmae, mae, intervals, per
category), ``predictions.csv`` (name, category, human, predicted), ``scatter.png``,
``categories.png`` and, for encoders, ``scorer.pt``. Baselines on the same split/folds:
a random-initialised encoder of the same architecture and the hand-crafted measures, each
zero-shot (raw value vs score) and as ridge-probe features.

``probe.protocol: icnet`` runs the same machinery on frozen spatial maps (N, D, h, w) of whole
images resized to 512 x 512 (``probe.input``, ``probe.image_size``) with ICNet's head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clic import atomic
from clic.config import PretrainConfig, ProbeConfig
from clic.cores import die_with_parent
from clic.data.imageio import load_rgb
from clic.data.table import Record, fingerprint, read_table
from clic.embed import load_encoder
from clic.evaluation import handcrafted, plots
from clic.evaluation.features import dataset_features, file_digest, input_paths
from clic.evaluation.metrics import full_report, regression_metrics
from clic.evaluation.probe import cross_validated_predictions, fit_regression
from clic.models.backbones import at_resolution, build_backbone
from clic.models.heads import Head
from clic.scorer import Scorer, load_scorer

log = logging.getLogger(__name__)


def labelled(data_dir: Path, cfg: ProbeConfig) -> tuple[list[Record], list[Record]]:
    """(fit records, evaluation records): train/test for ``split``; all labelled twice for ``cv``."""
    rows = [r for r in read_table(data_dir) if r.score is not None]
    if cfg.mode == "cv":
        if len(rows) < cfg.folds:
            raise ValueError(f"{data_dir}: {len(rows)} labelled images, fewer than probe.folds={cfg.folds}")
        return rows, rows
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    if len(train) < 2 or not test:
        raise ValueError(f"{data_dir}: probe mode 'split' needs labelled train and test images "
                         f"(found {len(train)} train, {len(test)} test); use probe.mode=cv otherwise")
    return train, test


def probe(x_fit: np.ndarray, fit: list[Record], x_eval: np.ndarray, evaluate: list[Record], cfg: ProbeConfig,
          seed: int, x_aug: np.ndarray | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, Head]:
    """Predictions for ``evaluate`` and the head fitted on ``fit`` (all labelled images in cv mode).
    ``x_aug``: training-only features of flipped ``fit`` images (icnet)."""
    y_fit = np.array([r.score for r in fit], np.float64)
    head = fit_regression(x_fit, y_fit, cfg, seed, x_aug, device)
    if cfg.mode == "split":
        return head.predict(x_eval), head
    return cross_validated_predictions(x_eval, y_fit, [r.category for r in evaluate], cfg.folds, seed, x_aug, cfg,
                                       device), head


# what a report folder holds (``clic probe --out`` refuses a folder holding anything else, unless marked)
REPORT_NAMES = ("metrics.json", "predictions.csv", "scatter.png", "categories.png", "scorer.pt", "validation.csv")


def write_report(out_dir: Path, name: str, pred: np.ndarray, records: list[Record], cfg: ProbeConfig,
                 seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    atomic.mark(out_dir, "clic probe")
    true = np.array([r.score for r in records], np.float64)
    cats = [r.category for r in records]
    report = {"name": name, **full_report(pred, true, cats, cfg.bootstrap, seed), **(extra or {})}
    atomic.write_text(out_dir / "metrics.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic.write_csv(out_dir / "predictions.csv", [["name", "category", "human", "predicted"], *(
        [r.name, r.category, f"{r.score:.6f}", f"{p:.6f}"] for r, p in zip(records, pred, strict=True))])
    plots.scatter(pred, true, name, report, out_dir / "scatter.png", cats)
    plots.category_errors(report, name, out_dir / "categories.png")
    return report


def evaluate_encoder(encoder: str | Path, data_dir: str | Path, cfg: ProbeConfig, out_dir: str | Path,
                     seed: int = 0, device: str | None = None, cache_dir: str | Path | None = None,
                     name: str | None = None) -> dict[str, Any]:
    """Probe a pretrained encoder; writes the report and ``scorer.pt``; returns the report."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, pcfg = load_encoder(encoder, dev)
    backbone, pcfg = at_resolution(backbone, pcfg, cfg.input_size(pcfg.image_size))
    return evaluate_backbone(backbone, pcfg, file_digest(encoder), data_dir, cfg, out_dir, seed, dev,
                             cache_dir, name or pcfg.method)


def evaluate_random(arch: PretrainConfig, data_dir: str | Path, cfg: ProbeConfig, out_dir: str | Path,
                    seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """The random-initialised encoder of the same architecture, probed the same way."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    arch = arch.model_copy(update={"image_size": cfg.input_size(arch.image_size)})
    backbone = build_backbone(arch.backbone, arch.image_size, arch.patch_size, arch.depth, arch.pool).to(dev).eval()
    return evaluate_backbone(backbone, arch, f"random-{arch.backbone}-{seed}", Path(data_dir), cfg,
                             Path(out_dir), seed, dev, None, f"random_{arch.backbone}")


def evaluate_backbone(backbone: torch.nn.Module, pcfg: PretrainConfig, model_key: str, data_dir: Path,
                      cfg: ProbeConfig, out_dir: Path, seed: int, dev: torch.device,
                      cache_dir: str | Path | None, name: str) -> dict[str, Any]:
    fit, evaluate = labelled(data_dir, cfg)
    spatial = cfg.protocol == "icnet"

    def feats(recs: list[Record], flip: bool = False) -> np.ndarray:
        return dataset_features(backbone, recs, data_dir, pcfg.image_size, model_key, cache_dir, cfg.batch_size,
                                cfg.workers, dev, whole=cfg.whole, spatial=spatial, flip=flip,
                                stages=cfg.features == "stages")

    start = time.perf_counter()
    x_fit = feats(fit)  # (N, D), or (N, D, h, w) for icnet
    x_eval = x_fit if evaluate is fit else feats(evaluate)
    x_aug = feats(fit, flip=True) if spatial and cfg.icnet.flip else None
    fitted = time.perf_counter()
    pred, head = probe(x_fit, fit, x_eval, evaluate, cfg, seed, x_aug, dev)
    log.info("%s: features %s in %.1f s, %s head fits (%s) in %.1f s", name, tuple(x_fit.shape),
             fitted - start, cfg.protocol, cfg.mode, time.perf_counter() - fitted)
    meta = {"dataset_fingerprint": fingerprint(fit + ([] if evaluate is fit else evaluate)),
            "protocol": cfg.protocol, "mode": cfg.mode, "alpha": float(head.alpha),
            "input": "whole" if cfg.whole else "crop", "image_size": int(pcfg.image_size), "features": cfg.features}
    extra: dict[str, Any] = {**meta, "feature_dim": int(x_fit.shape[1])}
    if spatial:
        extra["feature_grid"] = [int(x_fit.shape[2]), int(x_fit.shape[3])]
    if cfg.validation_fraction > 0:
        extra["validation"] = write_validation(x_fit, fit, x_aug, cfg, seed, dev, out_dir)
    report = write_report(out_dir, name, pred, evaluate, cfg, seed, extra)
    scorer = Scorer(backbone, pcfg, head, {**meta, "srcc": report["srcc"], "pcc": report["pcc"]}, dev,  # type: ignore[arg-type]
                    whole=cfg.whole, stages=cfg.features == "stages")
    scorer.save(out_dir / "scorer.pt")
    return report


def validation_split(records: list[Record], fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation images carved from ``records`` (the training images): a
    ``fraction`` of them drawn with ``seed``, at least 2, leaving at least 2 to fit on."""
    n = len(records)
    k = min(max(2, round(fraction * n)), n - 2)
    if k < 2:
        raise ValueError(f"probe.validation_fraction={fraction}: {n} training images are too few to carve a "
                         "validation set of 2 and fit on 2 more; set it to 0")
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def write_validation(x_fit: np.ndarray, fit: list[Record], x_aug: np.ndarray | None, cfg: ProbeConfig, seed: int,
                     dev: torch.device, out_dir: Path) -> dict[str, Any]:
    """Predictions for the validation images (:func:`validation_split`) by a head fitted on the
    other training images, in ``validation.csv`` (name, human, predicted): what the registry's
    champion is chosen on. Returns their summary for the report."""
    val = validation_split(fit, cfg.validation_fraction, seed)
    rest = np.setdiff1d(np.arange(len(fit)), val)
    y = np.array([r.score for r in fit], np.float64)
    head = fit_regression(x_fit[rest], y[rest], cfg, seed, None if x_aug is None else x_aug[rest], dev,
                          folds=min(cfg.folds, len(rest)))
    pred = head.predict(x_fit[val])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(out_dir / "validation.csv", [["name", "human", "predicted"], *(
        [fit[i].name, f"{fit[i].score:.6f}", f"{p:.6f}"] for i, p in zip(val, pred, strict=True))])
    return {"n": len(val), "fraction": cfg.validation_fraction, "seed": seed,
            "srcc": regression_metrics(pred, y[val])["srcc"],
            "names_sha256": hashlib.sha256("\n".join(sorted(fit[i].name for i in val)).encode()).hexdigest()}


def evaluate_scorer(scorer_path: str | Path, data_dir: str | Path, cfg: ProbeConfig, out_dir: str | Path,
                    seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Cross-dataset evaluation: a scorer fitted on one dataset (e.g. IC9600 or synthetic) scores
    every labelled image of another (e.g. SAVOIAS); nothing is refitted."""
    data_dir = Path(data_dir)
    scorer = load_scorer(scorer_path, device)
    records = [r for r in read_table(data_dir) if r.score is not None]
    if len(records) < 2:
        raise ValueError(f"{data_dir}: needs at least 2 labelled images, found {len(records)}")
    paths, _ = input_paths(records, data_dir, scorer.cfg.image_size)
    scores, kept, errors = scorer.score_files(paths, cfg.batch_size, cfg.workers, progress=False)
    if errors:
        raise ValueError(f"{len(errors)} images could not be read: {errors[0]}")
    fitted_on = scorer.meta.get("dataset_fingerprint", "unknown")
    return write_report(Path(out_dir), f"{scorer.cfg.method} (fitted on {fitted_on})", scores, records, cfg, seed,
                        {"fitted_on": fitted_on, "evaluated_on": fingerprint(records), "cross_dataset": True})


def _measure(path: Path) -> list[float]:
    m = handcrafted.measure(load_rgb(path))
    return [m[k] for k in handcrafted.MEASURES]


def handcrafted_features(records: list[Record], root: Path, workers: int = 2) -> np.ndarray:
    paths = [r.image_path(root) for r in records]
    with ProcessPoolExecutor(max(1, workers), initializer=die_with_parent) as pool:
        return np.array(list(pool.map(_measure, paths, chunksize=8)), np.float64)


def evaluate_handcrafted(data_dir: str | Path, cfg: ProbeConfig, out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Each hand-crafted measure zero-shot (raw value vs score) and all six as ridge-probe features."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    fit, evaluate = labelled(data_dir, cfg)
    x_fit = handcrafted_features(fit, data_dir, cfg.workers)
    x_eval = x_fit if evaluate is fit else handcrafted_features(evaluate, data_dir, cfg.workers)
    true = np.array([r.score for r in evaluate], np.float64)
    zero_shot = {}
    for j, m in enumerate(handcrafted.MEASURES):
        zero_shot[m] = regression_metrics(x_eval[:, j], true)
        if cfg.mode == "cv":  # per-category correlations averaged, as the probe is fitted per category
            cats = np.array([r.category for r in evaluate])
            per = [regression_metrics(x_eval[cats == c, j], true[cats == c]) for c in sorted(set(cats.tolist()))]
            zero_shot[m]["srcc_mean_category"] = float(np.mean([p["srcc"] for p in per]))
    best = max(handcrafted.MEASURES, key=lambda m: zero_shot[m]["srcc"])
    ridge_cfg = cfg.model_copy(update={"protocol": "ridge"})
    pred, _ = probe(np.log1p(np.abs(x_fit)), fit, np.log1p(np.abs(x_eval)), evaluate, ridge_cfg, seed)
    return write_report(out_dir, "handcrafted", pred, evaluate, cfg, seed,
                        {"zero_shot": zero_shot, "best_zero_shot": best,
                         "best_zero_shot_srcc": zero_shot[best]["srcc"]})
