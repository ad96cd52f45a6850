from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic.config import PretrainConfig, ProbeConfig
from clic.data.table import read_table
from clic.evaluation import handcrafted
from clic.evaluation.evaluate import evaluate_encoder, evaluate_handcrafted, evaluate_random
from clic.evaluation.icnet import fit_icnet, icnet_loss, icnet_lr
from clic.evaluation.metrics import bootstrap_ci, full_report, regression_metrics
from clic.evaluation.probe import cross_validated_predictions, fit_classifier, fit_ridge, fit_sgd, topk_accuracy
from clic.evaluation.transfer import transfer_probe
from clic.models.backbones import build_backbone
from clic.models.heads import ICNetHead
from clic.params import from_dict
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


def test_classifier_is_a_function_of_its_seed() -> None:
    """The transfer probe's head starts from its seed, not from whatever the global RNG holds: the
    same features and seed give the same weights, and the caller's RNG is left as it was."""
    rng = np.random.default_rng(5)
    x, labels = rng.normal(size=(40, 8)), np.repeat(np.arange(4), 10)
    first = fit_classifier(x, labels, 4, epochs=3, batch_size=16, seed=1)
    torch.rand(7)  # the global RNG moves on
    state = torch.random.get_rng_state()
    again = fit_classifier(x, labels, 4, epochs=3, batch_size=16, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    np.testing.assert_array_equal(first.weight, again.weight)
    assert not np.array_equal(fit_classifier(x, labels, 4, epochs=3, batch_size=16, seed=2).weight, first.weight)


# --------------------------------------------------------------------------- icnet protocol
def test_icnet_loss_is_ninety_score_ten_map_on_a_hand_computed_case() -> None:
    score = torch.tensor([0.5, 1.0])
    target = torch.tensor([0.0, 1.0])
    cmap = torch.zeros(2, 1, 2, 2)
    cmap[0] = 0.2  # mean 0.2, error 0.2
    cmap[1, 0, 0] = 0.6
    cmap[1, 0, 1] = 1.0  # mean 0.8, error 0.2
    # MSE(score) = (0.25 + 0) / 2 = 0.125; MSE(mean map) = (0.04 + 0.04) / 2 = 0.04
    assert float(icnet_loss(score, cmap, target)) == pytest.approx(0.9 * 0.125 + 0.1 * 0.04)
    assert float(icnet_loss(score, cmap, target, map_weight=0.0)) == pytest.approx(0.125)


def test_icnet_schedule_warms_up_then_steps_at_10_and_20() -> None:
    assert icnet_lr(0.0, 0.05) == 0.0
    assert icnet_lr(0.5, 0.05) == pytest.approx(0.025)
    assert icnet_lr(1.0, 0.05) == icnet_lr(9.99, 0.05) == pytest.approx(0.05)
    assert icnet_lr(10.0, 0.05) == pytest.approx(0.01)
    assert icnet_lr(29.9, 0.05) == pytest.approx(0.002)


def _on_off_grids(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4, 6, 6) features whose label is the fraction of grid positions "on"; an on position
    has channel 0 at +1 or -1 (random sign), so pooling cancels it and only the layout tells."""
    rng = np.random.default_rng(seed)
    frac = rng.uniform(0.05, 0.95, n)
    on = rng.uniform(size=(n, 6, 6)) < frac[:, None, None]
    x = rng.normal(0, 0.1, (n, 4, 6, 6)).astype(np.float32)
    x[:, 0] += on * rng.choice([-1.0, 1.0], (n, 6, 6))
    return x, on.mean(axis=(1, 2))


def test_icnet_head_learns_a_spatial_pattern_that_pooling_loses() -> None:
    from clic.config import IcnetProbeConfig

    x, y = _on_off_grids(200, 0)
    xt, yt = _on_off_grids(100, 1)
    cfg = IcnetProbeConfig(channels=16, kernel=1, hidden=32, batch_size=32, epochs=40, milestones=(25, 35), lr=0.2)
    flipped = np.ascontiguousarray(x[..., ::-1])  # the label does not depend on the side
    head = fit_icnet(x, y, cfg, seed=0, x_flip=flipped)
    pred = head.predict(xt)
    assert regression_metrics(pred, yt)["srcc"] > 0.9
    assert np.mean((pred - yt) ** 2) < 0.3 * np.var(yt)  # far better than the best constant
    pooled = fit_ridge(x.mean(axis=(2, 3)), y)  # a linear probe on pooled features cannot see it
    assert regression_metrics(pooled.predict(xt.mean(axis=(2, 3))), yt)["srcc"] < 0.3
    # deterministic given the seed; another seed is another run
    np.testing.assert_array_equal(fit_icnet(x, y, cfg, seed=0, x_flip=flipped).predict(xt), pred)
    assert not np.array_equal(fit_icnet(x, y, cfg, seed=1, x_flip=flipped).predict(xt), pred)
    # the map is in [0, 1] at the feature grid, and the state round-trips through weights_only
    with torch.no_grad():
        score, cmap = head(torch.from_numpy(xt[:3]))
    assert cmap.shape == (3, 1, 6, 6) and float(cmap.min()) >= 0 and float(cmap.max()) <= 1
    buf = io.BytesIO()
    torch.save(head.state(), buf)
    buf.seek(0)
    again = ICNetHead.from_state(torch.load(buf, weights_only=True))
    np.testing.assert_allclose(again.predict(xt), pred, atol=1e-6)


def test_whole_input_is_a_resize_without_crop() -> None:
    from clic.embed import eval_transform
    from clic.transforms.common import MEAN, STD

    arr = np.zeros((100, 200, 3), np.uint8)  # wide: red | green | blue in vertical bands
    arr[:, :50, 0] = arr[:, 50:150, 1] = arr[:, 150:, 2] = 255
    img = Image.fromarray(arr)
    whole = eval_transform(32, whole=True)(img)
    assert whole.shape == (3, 32, 32)
    ref = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    ref = (ref - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(whole.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    red, blue = (1 - MEAN[0]) / STD[0], (1 - MEAN[2]) / STD[2]
    assert whole[0, :, 0].min() == pytest.approx(red, abs=1e-4)  # both ends of the wide image survive
    assert whole[2, :, -1].min() == pytest.approx(blue, abs=1e-4)
    crop = eval_transform(32)(img)  # the centre square holds the green band only
    assert crop.shape == (3, 32, 32) and float(crop[0, :, 0].max()) < red - 1


def test_probe_reads_the_source_when_the_cache_is_too_small(tmp_path: Path) -> None:
    from clic.data.table import Record
    from clic.evaluation.features import input_paths

    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    (tmp_path / "cache").mkdir()
    Image.new("RGB", (50, 25)).save(tmp_path / "cache" / "big.png")
    (tmp_path / "meta.json").write_text(json.dumps({"cache_size": 25}))
    rec = Record("big", "big.png", 0.5, "train", width=200, height=100, cache="cache/big.png")
    assert input_paths([rec], tmp_path, 16) == ([tmp_path / "cache" / "big.png"], False)
    assert input_paths([rec], tmp_path, 64) == ([tmp_path / "big.png"], True)


def test_icnet_probe_config() -> None:
    icnet = ProbeConfig(protocol="icnet")
    assert icnet.whole and icnet.input_size(64) == 512  # ICNet's whole image at 512 px by default
    assert ProbeConfig(protocol="icnet", image_size=256).input_size(64) == 256
    assert ProbeConfig(protocol="icnet", input="crop").whole is False
    assert not ProbeConfig().whole and ProbeConfig().input_size(64) == 64
    assert ProbeConfig(input="whole").whole  # the linear protocols can see whole images too
    cfg = from_dict(ProbeConfig, {"protocol": "icnet", "icnet": {"epochs": 5, "milestones": [2, 4]}}, "probe")
    assert cfg.icnet.epochs == 5 and cfg.icnet.milestones == (2, 4) and cfg.icnet.lr == 0.05
    for bad, match in [({"protocol": "icnet2"}, "probe.protocol"), ({"input": "half"}, "probe.input"),
                       ({"icnet": {"kernel": 2}}, "kernel"), ({"icnet": {"milestones": [20, 10]}}, "milestones"),
                       ({"icnet": {"map_weight": 1.5}}, "map_weight"), ({"icnet": {"epochs": 0}}, "epochs"),
                       ({"icnet": {"size": 3}}, "unknown key")]:
        with pytest.raises(ValueError, match=match):
            from_dict(ProbeConfig, bad, "probe")


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


ICNET_TINY = {"epochs": 3, "milestones": [2], "channels": 8, "kernel": 1, "hidden": 8, "batch_size": 16}


def test_icnet_protocol_reports_and_saves_a_scorer_that_reproduces_it(tiny_encoder: Path, tiny_prepared: Path,
                                                                      tmp_path: Path, photos: list[Path]) -> None:
    cfg = from_dict(ProbeConfig, {"protocol": "icnet", "image_size": 64, "bootstrap": 0, "workers": 0,
                                  "icnet": ICNET_TINY}, "probe")
    report = evaluate_encoder(tiny_encoder, tiny_prepared, cfg, tmp_path, cache_dir=tmp_path / "cache")
    assert report["n"] == 16 and report["protocol"] == "icnet" and report["input"] == "whole"
    assert report["feature_dim"] == 512 and report["feature_grid"] == [2, 2]  # ResNet-18 at 64 px: 64 / 32
    cached = [np.load(f, mmap_mode="r").shape for f in (tmp_path / "cache").glob("features-*.npy")]
    assert sorted(cached) == [(16, 512, 2, 2), (48, 512, 2, 2), (48, 512, 2, 2)]  # test, train, flipped train
    scorer = load_scorer(tmp_path / "scorer.pt", "cpu")
    assert isinstance(scorer.head, ICNetHead) and scorer.whole and scorer.cfg.image_size == 64
    paths = [r.image_path(tiny_prepared) for r in read_table(tiny_prepared, ["test"])]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    saved = [float(r.split(",")[3]) for r in rows]
    np.testing.assert_allclose(scorer(paths), saved, atol=2e-5)
    scores, kept, errors = scorer.score_files(paths, 4, 0, progress=False)  # what `clic score` runs
    np.testing.assert_allclose(scores, saved, atol=2e-5)
    assert kept == list(range(16)) and not errors
    cmap = scorer.map(photos[0])
    assert cmap.shape == (2, 2) and cmap.min() >= 0 and cmap.max() <= 1
    wide = Image.open(photos[0]).convert("RGB").crop((0, 0, 300, 100))
    assert scorer.view(wide).size == (300, 100)  # the map covers the whole image


def test_icnet_protocol_in_cv_mode(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = from_dict(ProbeConfig, {"protocol": "icnet", "mode": "cv", "image_size": 32, "bootstrap": 0,
                                  "workers": 0, "icnet": {**ICNET_TINY, "flip": False}}, "probe")
    arch = from_dict(PretrainConfig, {"method": "moco", **tiny_overrides("moco")})
    first = evaluate_random(arch, tiny_prepared, cfg, tmp_path / "a")
    assert first["n"] == 64 and first["mode"] == "cv" and first["feature_grid"] == [1, 1]
    again = evaluate_random(arch, tiny_prepared, cfg, tmp_path / "b")  # deterministic given the seed
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()
    assert again["srcc"] == first["srcc"]


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
