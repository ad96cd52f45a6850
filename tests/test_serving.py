"""The served scorer (stages/scorer_model.py) as a client meets it: rows are image bytes, paths on
the server are read only inside the operator's folders and are refused in one message whatever
the disk holds, a bad row is JSON null with its reason, and a request is scored one batch at a
time within a row limit (400 beyond it), through a real `mlflow models serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from clic.config import PretrainConfig
from clic.scorer import BATCH_SIZE, Scorer, load_scorer
from stages.scorer_model import NO_PATHS, REFUSED, ScorerModel, ServeLimits

from .conftest import free_port, wait_http
from .test_scorer import _gradient, _save_scorer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PretrainConfig(backbone="vit_tiny", image_size=32, patch_size=8, depth=1)
    return _save_scorer(tmp_path_factory.mktemp("scorer") / "scorer.pt", cfg)


@pytest.fixture(scope="module")
def scorer(scorer_path: Path) -> Scorer:
    return load_scorer(scorer_path, "cpu")


def _png(w: int, h: int, shift: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.roll(_gradient(w, h), shift, axis=1)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _reasons(out: pd.DataFrame, rows: list[int]) -> set[str]:
    """The errors of ``rows`` without their "row i: " prefix."""
    return {out["error"][i].removeprefix(f"row {i}: ") for i in rows}


def test_paths_are_not_read_and_are_refused_alike_whether_they_exist(scorer: Scorer, tmp_path: Path) -> None:
    """Without CLIC_SERVE_ALLOWED_DIRS no path is opened: a readable image on the server, a
    system file and a missing file get one answer (before: the image was scored, the others
    answered "cannot decode image" or "neither an existing file path ...": an existence oracle)."""
    image = tmp_path / "on-the-server.png"
    image.write_bytes(_png(40, 40))
    paths = [str(image), "/etc/hostname", "/proc/self/environ", str(tmp_path / "missing.png"), "../../etc/passwd"]
    out = ScorerModel.score_rows(scorer, [_b64(_png(40, 40)), *paths])
    assert out["score"][0] == pytest.approx(float(scorer(image)[0]), abs=1e-6) and out["error"][0] == ""
    assert list(out["score"][1:]) == [None] * len(paths)
    assert _reasons(out, list(range(1, len(paths) + 1))) == {NO_PATHS}


def test_allowed_folders_are_the_only_paths_read(scorer: Scorer, tmp_path: Path) -> None:
    """With the operator's folders, a file whose real path is inside one is scored as its bytes
    are; a symlink out of the folder, ``..`` out of it, a file outside, a missing file inside and
    the folder itself all get the same message."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(_png(40, 40))
    (outside / "secret.png").write_bytes(_png(40, 40, shift=7))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "inner").symlink_to(allowed)  # a symlink that stays inside is fine
    limits = ServeLimits.from_env({"CLIC_SERVE_ALLOWED_DIRS": f"{allowed}{os.pathsep}"})  # empty entry: skipped
    assert limits.allowed_dirs == (os.path.realpath(allowed),)
    rows = [str(allowed / "a.png"), str(allowed / "inner" / "a.png"), _b64(_png(40, 40)),
            str(allowed / "link.png"), f"{allowed}/../outside/secret.png", str(outside / "secret.png"),
            str(allowed / "missing.png"), str(allowed), "/etc/hostname"]
    out = ScorerModel.score_rows(scorer, rows, limits)
    direct = float(scorer(allowed / "a.png")[0])
    assert [out["score"][i] == pytest.approx(direct, abs=1e-6) for i in range(3)] == [True] * 3
    assert list(out["error"][:3]) == ["", "", ""]
    assert list(out["score"][3:]) == [None] * 6 and _reasons(out, list(range(3, 9))) == {REFUSED}


def test_limits_come_from_the_operators_environment_and_are_checked(tmp_path: Path) -> None:
    limits = ServeLimits.from_env({"CLIC_SERVE_MAX_ROWS": "8", "CLIC_SERVE_MAX_ROW_BYTES": "1000"})
    assert (limits.allowed_dirs, limits.max_rows, limits.max_row_bytes, limits.batch_size) == ((), 8, 1000, BATCH_SIZE)
    assert ServeLimits.from_env({}) == ServeLimits((), 1024, 32 * 2**20, BATCH_SIZE)
    with pytest.raises(ValueError, match=r"CLIC_SERVE_MAX_ROWS='lots' is not a whole number"):
        ServeLimits.from_env({"CLIC_SERVE_MAX_ROWS": "lots"})
    with pytest.raises(ValueError, match=r"CLIC_SERVE_MAX_ROW_BYTES must be at least 1, got 0"):
        ServeLimits.from_env({"CLIC_SERVE_MAX_ROW_BYTES": "0"})
    with pytest.raises(ValueError, match=rf"CLIC_SERVE_ALLOWED_DIRS: not folders: {tmp_path / 'nope'}"):
        ServeLimits.from_env({"CLIC_SERVE_ALLOWED_DIRS": str(tmp_path / "nope")})


def test_a_request_is_scored_one_batch_at_a_time(scorer_path: Path) -> None:
    """3 batches + 1 row: four forwards of the scorer's batch size at most (before: one forward of
    all the rows), and each row's score is the one it gets alone."""
    scorer = load_scorer(scorer_path, "cpu")
    seen: list[int] = []
    forward = scorer.backbone.forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return forward(x)
    scorer.backbone.forward = counting  # type: ignore[method-assign]
    images = [_b64(_png(40, 36, shift=k)) for k in range(8)]
    rows = [images[i % 8] for i in range(3 * BATCH_SIZE + 1)]
    out = ScorerModel.score_rows(scorer, rows)
    assert seen == [BATCH_SIZE, BATCH_SIZE, BATCH_SIZE, 1]
    alone = [ScorerModel.score_rows(scorer, [image])["score"][0] for image in images]
    np.testing.assert_allclose(out["score"].astype(float), [alone[i % 8] for i in range(len(rows))], atol=1e-5)
    assert len(set(np.round(alone, 6))) == 8 and set(out["error"]) == {""}


def test_more_rows_than_the_limit_fail_the_request_with_400(scorer: Scorer) -> None:
    rows = [_b64(_png(40, 40))] * 5
    with pytest.raises(MlflowException) as caught:
        ScorerModel.score_rows(scorer, rows, ServeLimits(max_rows=4))
    assert caught.value.get_http_status_code() == 400 and caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message == ("5 rows sent; this server scores at most 4 rows per request (CLIC_SERVE_MAX_ROWS): "
                                    "send them in several requests")
    assert list(ScorerModel.score_rows(scorer, rows[:4], ServeLimits(max_rows=4))["error"]) == [""] * 4


def test_oversized_rows_and_decompression_bombs_are_their_rows_errors(scorer: Scorer, tmp_path: Path) -> None:
    """A row over the byte limit (as base64 or as an allowed file) and a small PNG that declares
    90 million pixels are refused without decoding them; the other rows are scored."""
    small, noise = _png(40, 40), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise, "PNG")
    big = noise.getvalue()
    assert len(small) < 2000 < len(big)
    bomb = io.BytesIO()
    Image.new("1", (9500, 9500)).save(bomb, "PNG")  # 11 kB of file, 90 Mpixel (Pillow's limit: 89.5)
    (tmp_path / "big.png").write_bytes(big)
    limits = ServeLimits(allowed_dirs=(str(tmp_path),), max_row_bytes=2000)
    out = ScorerModel.score_rows(scorer, [_b64(big), _b64(small), str(tmp_path / "big.png")], limits)
    assert list(out["score"].isna()) == [True, False, True]
    assert _reasons(out, [0, 2]) == {"more than 2000 bytes of image data (this server's limit per row)"}
    out = ScorerModel.score_rows(scorer, [_b64(bomb.getvalue()), _b64(small)])
    assert out["score"][0] is None and "9500x9500 = 90250000 pixels exceeds the limit" in out["error"][0]
    assert out["score"][1] == pytest.approx(float(scorer(Image.open(io.BytesIO(small)))[0]), abs=1e-6)


def test_bytes_score_as_the_same_file_does(scorer: Scorer, tmp_path: Path) -> None:
    """One decoding for bytes and files: a large EXIF-rotated JPEG sent as bytes scores as
    ``clic score`` scores its file (reduced DCT scale; before, bytes were decoded in full)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    Image.fromarray(_gradient(400, 260)).save(path, exif=exif, quality=95)
    out = ScorerModel.score_rows(scorer, [_b64(path.read_bytes())])
    assert out["score"][0] == pytest.approx(float(scorer(path)[0]), abs=1e-6)


def _strict(text: str) -> dict:
    """JSON as JavaScript, Go and Java parse it: NaN and Infinity are errors."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _post(port: int, rows: list[str]) -> tuple[int, str]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_rest_answers_strict_json_with_null_and_400_beyond_the_row_limit(
        scorer: Scorer, scorer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model as the probe stage registers it (``stages.probe.register``), served by a real
    `mlflow models serve` on 127.0.0.1 with CLIC_SERVE_MAX_ROWS=4 and stopped by its process id:
    a bad row is ``"score": null`` in strict JSON (before: ``NaN``, so the whole answer failed to
    parse), a path on the server is not read, and 5 rows are a 400 naming the limit."""
    import mlflow

    from stages.probe import register

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment = mlflow.MlflowClient().create_experiment("clic", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        version = register("serve", str(scorer_path), {"srcc": 0.5}, "fp", str(tmp_path / "validation.csv"))
    image = tmp_path / "photo.png"
    image.write_bytes(_png(48, 40))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CLIC_SERVE_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", MLFLOW_TRACKING_URI=store, CLIC_SERVE_MAX_ROWS="4")
    port = free_port()
    server = subprocess.Popen([BIN / "mlflow", "models", "serve", "-m", f"models:/clic-serve/{version}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server)
        status, text = _post(port, [_b64(image.read_bytes()), "not an image", str(image), str(tmp_path / "nope.png")])
        assert status == 200, text
        answer = _strict(text)["predictions"]
        assert answer[0]["score"] == pytest.approx(float(scorer(image)[0]), abs=1e-5) and answer[0]["error"] == ""
        assert [a["score"] for a in answer[1:]] == [None, None, None]
        assert [a["error"] for a in answer[1:]] == [f"row {i}: {NO_PATHS}" for i in (1, 2, 3)]
        status, text = _post(port, [_b64(image.read_bytes())] * 5)
        error = _strict(text)
        assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert error["message"].endswith("5 rows sent; this server scores at most 4 rows per request "
                                         "(CLIC_SERVE_MAX_ROWS): send them in several requests")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: mlflow and its uvicorn
        server.wait(timeout=30)
