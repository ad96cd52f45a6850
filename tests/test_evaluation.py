from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic.config import PretrainConfig, ProbeConfig, from_dict
from clic.data.table import read_table
from clic.evaluation import handcrafted
from clic.evaluation.evaluate import evaluate_encoder, evaluate_handcrafted, evaluate_random
from clic.evaluation.metrics import bootstrap_ci, full_report, regression_metrics
from clic.evaluation.probe import cross_validated_predictions, fit_classifier, fit_ridge, fit_sgd, topk_accuracy
from clic.evaluation.transfer import transfer_probe
from clic.models.backbones import build_backbone
from clic.pretrain import run
from clic.scorer import load_scorer

from .conftest import tiny_overrides


# --------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values() -> None:
    pred = [1.0, 2.0, 3.0, 4.0]
    true = [1.0, 3.0, 2.0, 4.0]
    m = regression_metrics(pred, true)
    # Pearson: deviations (-1.5,-.5,.5,1.5) vs (-1.5,.5,-.5,1.5): 4/5
    assert m["pcc"] == pytest.approx(0.8)
    # Spearman: ranks differ by one swap: 1 - 6 * 2 / (4 * 15)
    assert m["srcc"] == pytest.approx(0.8)
    # Kendall: 5 concordant, 1 discordant pairs: (5 - 1) / 6
    assert m["krcc"] == pytest.approx(4 / 6)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmae"] == pytest.approx(math.sqrt(0.5))  # IC9600: sqrt(mean |err|)
    assert math.isnan(regression_metrics([1, 1, 1], [1, 2, 3])["pcc"])


def test_bootstrap_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(size=200)
    pred = true + rng.normal(0, 0.2, 200)
    ci = bootstrap_ci(pred, true, n_boot=300)
    est = regression_metrics(pred, true)
    assert ci["pcc"][0] < est["pcc"] < ci["pcc"][1] and ci["pcc"][1] - ci["pcc"][0] < 0.2
    report = full_report(pred, true, ["a", "b"] * 100, n_boot=50)
    assert set(report["per_category"]) == {"a", "b"} and report["per_category"]["a"]["n"] == 100


# ---------------------------------------------------------------------------------- probes
def test_ridge_matches_sklearn_and_picks_alpha_from_train_only() -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 30)) * rng.uniform(0.1, 10, 30)
    y = x[:, :3] @ np.array([0.5, -0.2, 0.1]) + rng.normal(0, 0.5, 120)
    head = fit_ridge(x, y, alphas=(0.1, 10.0, 1000.0), folds=5)
    xs = (x - x.mean(0)) / x.std(0)
    ref = Ridge(alpha=head.alpha).fit(xs, y)
    np.testing.assert_allclose(head.predict(x), ref.predict(xs), rtol=1e-6, atol=1e-8)
    assert head.alpha in (0.1, 10.0, 1000.0)
    # pure noise targets: CV must prefer the strongest penalty
    assert fit_ridge(x, rng.normal(size=120), alphas=(1e-3, 1e5)).alpha == 1e5


def test_sgd_probe_learns_a_linear_target() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    y = x @ rng.normal(size=8) * 0.1 + 0.5
    head = fit_sgd(x, y, epochs=60, lr=0.05)
    assert regression_metrics(head.predict(x), y)["pcc"] > 0.99


def test_cross_validation_never_sees_the_held_out_label() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    y = x[:, 0] + rng.normal(0, 0.1, 60)
    groups = ["a"] * 30 + ["b"] * 30
    pred = cross_validated_predictions(x, y, groups, folds=5, seed=0)
    y2 = y.copy()
    y2[7] = 100.0  # changing one label cannot change its own out-of-fold prediction
    assert cross_validated_predictions(x, y2, groups, folds=5, seed=0)[7] == pytest.approx(pred[7])
    y3 = y.copy()
    y3[40] = 100.0  # nor anything in the other category
    np.testing.assert_allclose(cross_validated_predictions(x, y3, groups, folds=5, seed=0)[:30], pred[:30])
    assert regression_metrics(pred, y)["pcc"] > 0.95


def test_classifier_on_separable_memmapped_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), 50)
    x = centres[labels] + rng.normal(size=(150, 16))
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    head = fit_classifier(np.load(tmp_path / "x.npy", mmap_mode="r"), labels, 3, epochs=20, batch_size=32)
    assert topk_accuracy(head.predict(x), labels, 1) == 1.0
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1]])
    assert topk_accuracy(logits, np.array([2, 2]), 1) == 0.0
    assert topk_accuracy(logits, np.array([2, 2]), 2) == 1.0


# ---------------------------------------------------------------------------- hand-crafted
def test_handcrafted_measures_on_known_images() -> None:
    flat = Image.new("RGB", (64, 64), (120, 80, 40))
    m = handcrafted.measure(flat)
    assert m["edge_density"] == 0.0 and m["gradient"] == 0.0 and m["entropy"] == 0.0 and m["regions"] == 1
    quads = np.zeros((64, 64, 3), np.uint8)
    quads[:32, 32:] = (255, 0, 0)
    quads[32:, :32] = (0, 255, 0)
    quads[32:, 32:] = (0, 0, 255)
    q = handcrafted.measure(Image.fromarray(quads))
    assert q["regions"] > 1
    assert q["entropy"] == pytest.approx(2.0)  # four equally frequent grey levels
    edges = handcrafted.canny(np.asarray(Image.fromarray(quads).convert("L"), float) / 255)
    assert edges[:, 28:36].any() and not edges[:20, :20].any()  # edges on the boundaries only
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    n = handcrafted.measure(noise)
    assert n["jpeg_bpp"] > q["jpeg_bpp"] > m["jpeg_bpp"] and n["png_bpp"] > q["png_bpp"]
    assert n["gradient"] > q["gradient"] and n["entropy"] > 7.5


def test_region_count_matches_scikit_image(photos: list[Path]) -> None:
    """Our Felzenszwalb-Huttenlocher equals the reference implementation on the same input."""
    from skimage.segmentation import felzenszwalb

    for p in photos[:4]:
        img = Image.open(p).convert("RGB").resize((64, 48))
        ref = felzenszwalb(np.asarray(img), scale=300, sigma=0.8, min_size=20)
        assert handcrafted.felzenszwalb_regions(img) == len(np.unique(ref))


# ----------------------------------------------------------------- encoders, scorer, transfer
@pytest.fixture(scope="module")
def tiny_encoder(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = from_dict(PretrainConfig, {"method": "moco", **tiny_overrides("moco"), "epochs": 1})
    return run(cfg, tiny_prepared, tmp_path_factory.mktemp("enc"), progress=False)


def test_probe_writes_report_and_a_scorer_that_reproduces_it(tiny_encoder: Path, tiny_prepared: Path,
                                                             tmp_path: Path, photos: list[Path]) -> None:
    cfg = ProbeConfig(bootstrap=50, workers=0)
    report = evaluate_encoder(tiny_encoder, tiny_prepared, cfg, tmp_path, cache_dir=tmp_path / "cache")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["srcc"] == pytest.approx(report["srcc"]) and -1 <= saved["srcc"] <= 1
    assert saved["n"] == 16 and len(saved["pcc_ci95"]) == 2
    assert (tmp_path / "scatter.png").stat().st_size > 1000 and (tmp_path / "categories.png").exists()
    assert list((tmp_path / "cache").glob("features-*.npy"))
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    scorer = load_scorer(tmp_path / "scorer.pt", "cpu")
    test = read_table(tiny_prepared, ["test"])
    paths = [r.image_path(tiny_prepared) for r in test]
    from_paths = scorer(paths)
    np.testing.assert_allclose(from_paths, [float(r.split(",")[3]) for r in rows[1:]], atol=2e-5)
    np.testing.assert_allclose(scorer([Image.open(p) for p in paths[:2]]), from_paths[:2], atol=1e-5)
    # the heat map is the head at every position: its mean is the image's score
    assert scorer.map(photos[0]).mean() == pytest.approx(float(scorer(photos[0])[0]), abs=1e-4)
    with pytest.raises(ValueError, match="not a clic scorer"):
        load_scorer(tiny_encoder)


def test_vit_probed_above_its_training_resolution(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = from_dict(PretrainConfig, {"method": "clicv2", **tiny_overrides("clicv2"), "epochs": 1})
    encoder = run(cfg, tiny_prepared, tmp_path / "enc", progress=False)
    report = evaluate_encoder(encoder, tiny_prepared, ProbeConfig(bootstrap=0, workers=0, image_size=48), tmp_path)
    assert report["n"] == 16 and report["feature_dim"] == 192
    scorer = load_scorer(tmp_path / "scorer.pt", "cpu")  # rebuilt at 48 px with the resampled embedding
    assert scorer.cfg.image_size == 48 and scorer.backbone.grid == 6
    paths = [r.image_path(tiny_prepared) for r in read_table(tiny_prepared, ["test"])]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    np.testing.assert_allclose(scorer(paths), [float(r.split(",")[3]) for r in rows], atol=2e-5)
    assert scorer.map(paths[0]).shape == (6, 6)


def test_cross_dataset_scorer_is_not_refitted(tiny_encoder: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    from clic.config import DataConfig, SyntheticConfig
    from clic.data.prepare import prepare
    from clic.evaluation.evaluate import evaluate_scorer

    evaluate_encoder(tiny_encoder, tiny_prepared, ProbeConfig(bootstrap=0, workers=0), tmp_path / "fit")
    other = prepare(DataConfig(raw_dir=str(tmp_path / "raw"), out_dir=str(tmp_path / "other"), cache_size=64,
                               synthetic=SyntheticConfig(n_train=10, n_test=6, size=64)), seed=11, workers=1)
    report = evaluate_scorer(tmp_path / "fit" / "scorer.pt", other, ProbeConfig(bootstrap=0, workers=0),
                             tmp_path / "cross")
    assert report["n"] == 16 and report["cross_dataset"] is True  # every labelled image, both splits
    assert report["fitted_on"] != report["evaluated_on"]
    scorer = load_scorer(tmp_path / "fit" / "scorer.pt", "cpu")
    rows = (tmp_path / "cross" / "predictions.csv").read_text().splitlines()[1:]
    first = read_table(other)[0]
    assert float(rows[0].split(",")[3]) == pytest.approx(float(scorer(first.image_path(other))[0]), abs=1e-5)


def test_baselines_share_the_split(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = ProbeConfig(bootstrap=0, workers=1)
    arch = from_dict(PretrainConfig, {"method": "moco", **tiny_overrides("moco")})
    rnd = evaluate_random(arch, tiny_prepared, cfg, tmp_path / "random")
    hc = evaluate_handcrafted(tiny_prepared, cfg, tmp_path / "hc")
    assert rnd["n"] == hc["n"] == 16 and rnd["name"] == "random_resnet18"
    assert set(hc["zero_shot"]) == set(handcrafted.MEASURES)
    assert hc["best_zero_shot_srcc"] == max(v["srcc"] for v in hc["zero_shot"].values())
    assert hc["best_zero_shot_srcc"] > 0  # 16 test images: only the sign is stable


def test_cv_mode_uses_every_labelled_image(tiny_prepared: Path, tmp_path: Path) -> None:
    hc = evaluate_handcrafted(tiny_prepared, ProbeConfig(mode="cv", bootstrap=0, workers=1), tmp_path)
    assert hc["n"] == 64 and "srcc_mean_category" in hc["zero_shot"]["entropy"]
    # the synthetic generator's knobs are visible to pixel statistics: the best measure tracks the label
    assert hc["best_zero_shot_srcc"] > 0.5, hc["zero_shot"]


def test_transfer_probe_streams_and_cleans_up(tmp_path: Path) -> None:
    from clic.data.synthetic import generate_classification

    root = generate_classification(tmp_path / "cls", seed=0, n_classes=2, n_train=6, n_val=4, size=40)
    torch.manual_seed(0)
    bb = build_backbone("resnet18").eval()
    m = transfer_probe(bb, 32, root, "toy", tmp_path / "work", epochs=5, workers=0)
    assert set(m) == {"toy_top1", "toy_top5", "toy_classes", "toy_train_images"}
    assert m["toy_top5"] == 1.0 and 0 <= m["toy_top1"] <= 1 and m["toy_train_images"] == 12
    assert not (tmp_path / "work").exists()


def test_cli_score_and_map(tiny_encoder: Path, tiny_prepared: Path, tmp_path: Path, photos: list[Path]) -> None:
    evaluate_encoder(tiny_encoder, tiny_prepared, ProbeConfig(bootstrap=0, workers=0), tmp_path / "r")
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"nope")
    (bad / "ok.png").write_bytes(photos[1].read_bytes())
    cmd = [sys.executable, "-m", "clic.cli"]
    res = subprocess.run([*cmd, "score", "--model", str(tmp_path / "r" / "scorer.pt"), "--out",
                          str(tmp_path / "s.csv"), str(photos[0]), str(bad), "--workers", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "broken.jpg" in res.stderr and "1 unreadable" in res.stdout
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "path,score" and len(lines) == 3
    scorer = load_scorer(tmp_path / "r" / "scorer.pt", "cpu")
    assert float(lines[1].split(",")[1]) == pytest.approx(float(scorer(photos[0])[0]), abs=1e-5)
    res = subprocess.run([*cmd, "map", "--model", str(tmp_path / "r" / "scorer.pt"), "--out",
                          str(tmp_path / "m.png"), str(photos[0])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "m.png").size == (256, 256)
