"""The scorer as a user meets it: any image input decoded one way, registry URIs that fail in one
clear line, and weights that do not fit their config named as such."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic import model_uri
from clic.config import PretrainConfig
from clic.cores import torch_threads
from clic.embed import eval_transform, load_encoder
from clic.engine import checkpoint as ckpt
from clic.models.backbones import build_backbone
from clic.models.heads import LinearHead
from clic.scorer import Scorer, load_scorer

REPO = Path(__file__).resolve().parents[1]


def _save_scorer(path: Path, cfg: PretrainConfig, stored: PretrainConfig | None = None) -> Path:
    """A scorer with a fixed random head; ``stored``: the config written to the file instead of the
    one the weights were built from."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth, cfg.pool)
    dim = backbone.feature_dim
    rng = np.random.default_rng(0)
    head = LinearHead(np.zeros(dim), np.ones(dim), rng.normal(size=dim), np.array(0.0))
    Scorer(backbone, stored or cfg, head).save(path)
    return path


@pytest.fixture(scope="module")
def scorer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PretrainConfig(backbone="vit_tiny", image_size=32, patch_size=8, depth=1)
    return _save_scorer(tmp_path_factory.mktemp("scorer") / "scorer.pt", cfg)


def _gradient(w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: red across, green down, blue a checkerboard (orientation-sensitive)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x // 4 + y // 4) % 2) * 255],
                    -1).astype(np.uint8)


def _images(folder: Path) -> dict[str, Path]:
    out = {}
    y, x = np.mgrid[0:48, 0:64]
    deep = ((x * 1000 + y * 300) % 65536).astype(np.uint16)  # uses the whole 16-bit range
    out["16-bit PNG"] = folder / "deep.png"
    Image.fromarray(deep).save(out["16-bit PNG"])
    rgba = np.dstack([_gradient(64, 48), np.where(np.arange(64)[None, :] < 32, 0, 255).repeat(48, 0)])
    out["RGBA PNG"] = folder / "rgba.png"
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(out["RGBA PNG"])
    la = np.dstack([_gradient(64, 48)[..., 0], np.tile(np.linspace(0, 255, 64), (48, 1))]).astype(np.uint8)
    out["LA PNG"] = folder / "la.png"
    Image.fromarray(la, "LA").save(out["LA PNG"])
    pal = Image.fromarray(_gradient(64, 48)).quantize(16)
    out["P PNG with transparency"] = folder / "p.png"
    pal.save(out["P PNG with transparency"], transparency=0)
    for name, (w, h) in {"EXIF-rotated JPEG": (60, 40), "EXIF-rotated large JPEG": (400, 260)}.items():
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        out[name] = folder / f"{w}x{h}.jpg"
        Image.fromarray(_gradient(w, h)).save(out[name], exif=exif, quality=95)
    return out


def test_paths_pil_images_and_tensors_score_alike(scorer_file: Path, tmp_path: Path) -> None:
    scorer = load_scorer(scorer_file, "cpu")
    naive = eval_transform(32)
    images = _images(tmp_path)
    for name, path in images.items():
        by_path = scorer(path)
        with Image.open(path) as img:
            np.testing.assert_allclose(scorer(img), by_path, atol=1e-5, err_msg=name)
            assert img.size == Image.open(path).size  # the caller's image is left as it was
        loaded = Image.open(path)
        loaded.load()  # an image already decoded in full goes through the same conversion
        np.testing.assert_allclose(scorer(loaded), by_path, atol=1e-5 if "large" not in name else 0.05, err_msg=name)
        from_bytes = Image.open(io.BytesIO(path.read_bytes()))
        np.testing.assert_allclose(scorer(from_bytes), by_path, atol=1e-5 if "large" not in name else 0.05,
                                   err_msg=name)
        if name in ("16-bit PNG", "RGBA PNG", "EXIF-rotated JPEG"):  # what `img.convert("RGB")` gave
            old = float(scorer._scores(naive(Image.open(path).convert("RGB"))[None])[0])
            assert abs(old - float(by_path[0])) > 1e-3, name
    # a uint8 RGB tensor is an image: same decoding, resize and normalisation as its file
    rgb = tmp_path / "rgb.png"
    Image.fromarray(_gradient(64, 48)).save(rgb)
    as_tensor = torch.from_numpy(_gradient(64, 48)).permute(2, 0, 1)
    np.testing.assert_allclose(scorer(as_tensor), scorer(rgb), atol=1e-5)
    np.testing.assert_allclose(scorer(torch.stack([as_tensor, as_tensor])), scorer([rgb, rgb]), atol=1e-5)
    batch = torch.stack([scorer._tensor(rgb)])  # a normalised float batch is used as is
    np.testing.assert_allclose(scorer(batch), scorer(rgb), atol=1e-6)


def test_score_files_forward_threads_are_scoped_to_the_call(scorer_file: Path, tmp_path: Path) -> None:
    """``threads`` sets the CPU forward's intra-op threads for that call only; scores do not
    depend on it, and the caller's thread count is back afterwards."""
    scorer = load_scorer(scorer_file, "cpu")
    paths = list(_images(tmp_path).values())
    seen: list[int] = []
    forward = scorer.backbone.forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return forward(x)
    scorer.backbone.forward = counting  # type: ignore[method-assign]
    with torch_threads(2):
        default, kept, _ = scorer.score_files(paths, batch_size=4, workers=0, progress=False)
        one, kept_one, _ = scorer.score_files(paths, batch_size=4, workers=0, progress=False, threads=1)
        assert torch.get_num_threads() == 2
    assert seen == [2, 2, 1, 1]  # 6 images in batches of 4, per call
    assert kept == kept_one == list(range(len(paths)))
    np.testing.assert_allclose(one, default, atol=1e-5)


@pytest.mark.parametrize(("stored", "message"), [
    ({"depth": 2}, r"missing keys: vit\.blocks\.1\..*\(12 in all\)"),
    ({"patch_size": 16}, r"shape mismatches: vit\.pos_embed \(1, 17, 192\) in the file vs \(1, 5, 192\) in the model, "
                       r"vit\.patch_embed\.proj\.weight \(192, 3, 8, 8\) in the file vs \(192, 3, 16, 16\)"),
    ({"backbone": "resnet18"}, r"missing keys: .*unexpected keys: "),
])
def test_weights_that_do_not_fit_the_config_are_named(tmp_path: Path, stored: dict, message: str) -> None:
    cfg = PretrainConfig(backbone="vit_tiny", image_size=32, patch_size=8, depth=1)
    path = _save_scorer(tmp_path / "scorer.pt", cfg, PretrainConfig(**{**cfg.__dict__, **stored}))
    with pytest.raises(ValueError, match=rf"{path}: the stored weights do not fit the stored config .*{message}"):
        load_scorer(path, "cpu")
    encoder = tmp_path / "encoder.pt"  # `clic embed` reads encoders the same way
    state = ckpt.load(path)
    ckpt.save_atomic({"config": state["config"], "backbone": state["backbone"]}, encoder)
    with pytest.raises(ValueError, match=rf"{encoder}: the stored weights do not fit .*{message}"):
        load_encoder(encoder)


def _clic(cwd: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "clic.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env={**clean, "PYTHONPATH": str(REPO), **env})
    return res, time.perf_counter() - start


def _one_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("clic: error: "), res.stderr
    return errors[0]


def test_weights_mismatch_through_the_cli(tmp_path: Path) -> None:
    cfg = PretrainConfig(backbone="vit_tiny", image_size=32, patch_size=8, depth=1)
    path = _save_scorer(tmp_path / "bad.pt", cfg, PretrainConfig(**{**cfg.__dict__, "depth": 2}))
    Image.fromarray(_gradient(40, 40)).save(tmp_path / "a.png")
    res, _ = _clic(tmp_path, "score", "--model", str(path), "--out", "s.csv", "a.png")
    assert f"{path}: the stored weights do not fit the stored config" in _one_error(res)
    assert not (tmp_path / "s.csv").exists()


def test_unreachable_tracking_server_fails_fast_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Image.fromarray(_gradient(40, 40)).save(tmp_path / "a.png")
    res, seconds = _clic(tmp_path, "score", "--model", "models:/clic-clicv2@champion", "--out", "s.csv", "a.png",
                         MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    line = _one_error(res)
    assert f"the MLflow tracking server http://127.0.0.1:{port} is unreachable" in line
    assert "Connection refused" in line and "Retrying" not in res.stderr
    assert seconds < 90  # interpreter start-up included; MLflow's own retries take minutes
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "mlflow.db").exists()


def test_unknown_model_names_fail_cleanly_without_creating_a_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    Image.fromarray(_gradient(40, 40)).save(tmp_path / "a.png")
    work = tmp_path / "work"
    work.mkdir()
    res, _ = _clic(work, "score", "--model", "models:/clic-clicv2@champion", "--out", "s.csv", str(tmp_path / "a.png"))
    assert "no MLflow store to read it from: set MLFLOW_TRACKING_URI" in _one_error(res)
    assert list(work.iterdir()) == []  # no ./mlflow.db, no CSV
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    MlflowClient(tracking_uri=store, registry_uri=store).create_registered_model("clic-moco")
    for uri, why in (("models:/clic-clicv2@champion", "Registered Model with name=clic-clicv2 not found"),
                     ("models:/clic-moco/3", "Model Version (name=clic-moco, version=3) not found")):
        res, _ = _clic(work, "score", "--model", uri, "--out", "s.csv", str(tmp_path / "a.png"),
                       MLFLOW_TRACKING_URI=store)
        assert f"{uri}: no such model in the MLflow store {store} ({why})" in _one_error(res)
        assert list(work.iterdir()) == []
    res, _ = _clic(work, "score", "--model", "models:/x/1", "--out", "s.csv", str(tmp_path / "a.png"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'nothing' / 'mlflow.db'}")
    assert "does not exist" in _one_error(res) and not (tmp_path / "nothing").exists()


def test_a_registered_scorer_loads_by_alias(scorer_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    exp = client.create_experiment("clic", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, str(scorer_file), "scorer")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("clic-t")
    mv = client.create_model_version("clic-t", f"runs:/{run.info.run_id}/scorer", run.info.run_id)
    client.set_registered_model_alias("clic-t", "champion", mv.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    img = tmp_path / "a.png"
    Image.fromarray(_gradient(40, 40)).save(img)
    np.testing.assert_allclose(load_scorer("models:/clic-t@champion", "cpu")(img),
                               load_scorer(scorer_file, "cpu")(img), atol=1e-6)


def test_what_a_uri_downloaded_leads_to_its_scorer_file_and_nowhere_else(tmp_path: Path) -> None:
    """A logged pyfunc model names its scorer in ``MLmodel`` (read as data); a name that leaves the
    model's folder, or a folder without a scorer, is refused."""
    assert model_uri.is_uri("models:/clic-clicv2@champion") and model_uri.is_uri("runs:/abc/scorer")
    assert model_uri.is_uri("s3://bucket/scorer.pt") and not model_uri.is_uri("models/clicv2/scorer.pt")
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    (model / "artifacts" / "scorer.pt").write_bytes(b"x")
    (tmp_path / "outside.pt").write_bytes(b"x")

    def names(rel: str) -> None:
        (model / "MLmodel").write_text(f"flavors:\n  python_function:\n    artifacts:\n      scorer:\n"
                                       f"        path: {rel}\n")

    names("artifacts/scorer.pt")
    assert model_uri.scorer_file(model, "models:/m/1") == (model / "artifacts" / "scorer.pt").resolve()
    names("../outside.pt")
    with pytest.raises(ValueError, match="not a file inside the model"):
        model_uri.scorer_file(model, "models:/m/1")
    (model / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ValueError, match="names no 'scorer' artifact"):
        model_uri.scorer_file(model, "models:/m/1")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "scorer.pt").write_bytes(b"x")
    assert model_uri.scorer_file(tmp_path / "run", "runs:/r/scorer") == tmp_path / "run" / "scorer.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither scorer.pt nor an MLflow model"):
        model_uri.scorer_file(tmp_path / "empty", "runs:/r/x")


def test_a_stage_pooled_scorer_round_trips(tmp_path: Path) -> None:
    """``probe.features: stages``: the saved scorer reads the same pools after loading, and a map
    (which needs the last stage's layout) is refused with the reason."""
    cfg = PretrainConfig(backbone="vit_tiny", image_size=32, patch_size=8, depth=2)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.depth)
    dim = backbone.stages_dim
    rng = np.random.default_rng(0)
    head = LinearHead(np.zeros(dim), np.ones(dim), rng.normal(size=dim), np.array(0.5))
    Scorer(backbone, cfg, head, stages=True).save(tmp_path / "s.pt")
    scorer = load_scorer(tmp_path / "s.pt", "cpu")
    img = tmp_path / "a.png"
    Image.fromarray(_gradient(40, 40)).save(img)
    with torch.no_grad():
        feats = backbone.eval().forward_pooled_stages(scorer._tensor(img)[None])[0].double().numpy()
    assert scorer.stages and float(scorer(img)[0]) == pytest.approx(float(feats @ head.weight + 0.5), abs=1e-4)
    scores, kept, _ = scorer.score_files([img], workers=0, progress=False)
    assert kept == [0] and scores[0] == pytest.approx(float(scorer(img)[0]), abs=1e-5)
    with pytest.raises(ValueError, match="per-position map needs one of the last stage"):
        scorer.map(img)


def test_score_and_embed_fail_when_no_image_could_be_read(scorer_file: Path, tmp_path: Path) -> None:
    """Nothing readable is an error (exit 2, the file named), not "scored 0 images" and exit 0;
    without --out the rows go to stdout."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    res, _ = _clic(tmp_path, "score", "--model", str(scorer_file), "--out", "s.csv", str(bad))
    assert "none of the 1 images could be read" in _one_error_or_warned(res) and not (tmp_path / "s.csv").exists()
    state = ckpt.load(scorer_file)
    encoder = tmp_path / "encoder.pt"
    ckpt.save_atomic({"config": state["config"], "backbone": state["backbone"]}, encoder)
    res, _ = _clic(tmp_path, "embed", "--model", str(encoder), "--out", "f.npz", str(bad))
    assert "none of the 1 images could be read" in _one_error_or_warned(res) and not (tmp_path / "f.npz").exists()
    good = tmp_path / "good.png"
    Image.fromarray(_gradient(40, 40)).save(good)
    res, _ = _clic(tmp_path, "score", "--model", str(scorer_file), str(good), str(bad))
    rows = res.stdout.splitlines()
    assert res.returncode == 0 and rows[0] == "path,score" and len(rows) == 2 and rows[1].startswith(f"{good},")
    assert float(rows[1].split(",")[1]) == pytest.approx(float(load_scorer(scorer_file, "cpu")(good)[0]), abs=1e-5)
    assert "bad.jpg" in res.stderr and "scored 1 images (1 unreadable, skipped)" in res.stderr


def _one_error_or_warned(res: subprocess.CompletedProcess) -> str:
    """The error line of a failed command that may also have warned about the files it skipped."""
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("clic: error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]
