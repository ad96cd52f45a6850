"""MLflow pyfunc for a clic scorer (models-from-code: nothing is pickled).

The logged model carries this file, the ``clic`` package (``code_paths``) and the scorer file, and
its requirements pin PyPI packages only: it loads where the project is not installed.

Input: a DataFrame with a string column ``image``, one image per row as base64-encoded file bytes
(PNG, JPEG, ...), decoded as ``clic score`` decodes files (EXIF orientation, 16-bit, transparency,
the decompression-bomb pixel limit). Output: a DataFrame with ``score`` and ``error`` per row, in
the rows' order: a row that cannot be scored has ``score`` None and ``error`` saying why, and the
other rows are scored. ``score`` is an object column of floats and None, so that the scoring server
writes JSON ``null`` (a float column's NaN would be written as ``NaN``, which strict JSON parsers
reject); ``out["score"].astype(float)`` gives NaN for the failed rows.

What a request can make the server read is set by the operator, in the serving process's
environment when the model loads, never by the request (docs/operations.md, "What the scoring
server reads"):

- ``CLIC_SERVE_ALLOWED_DIRS``: folders (``os.pathsep``-separated) whose files a row may name by
  path instead of sending bytes. Unset (the default), no path is ever opened. Set, a row that is
  not a base64 image is read as a path only when its real path (symlinks followed) lies inside one
  of them; every other path gets one message, whether or not it exists.
- ``CLIC_SERVE_MAX_ROWS`` (1024): rows per request; more fail the whole request (HTTP 400).
- ``CLIC_SERVE_MAX_ROW_BYTES`` (32 MiB): image bytes per row; a bigger row is that row's error.

Rows are decoded and scored :data:`clic.scorer.BATCH_SIZE` at a time, so beyond the request
itself the server holds one batch of images.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from clic.data.imageio import ImageError, check_jpeg_data, decode_bytes
from clic.scorer import BATCH_SIZE, Scorer, load_scorer

ENV = {"allowed_dirs": "CLIC_SERVE_ALLOWED_DIRS", "max_rows": "CLIC_SERVE_MAX_ROWS",
       "max_row_bytes": "CLIC_SERVE_MAX_ROW_BYTES"}
# the one answer for a row the server will not read: it must not depend on what the disk holds
NO_PATHS = "not base64-encoded image bytes (this server reads no file paths)"
REFUSED = "neither base64-encoded image bytes nor a file this server may read"
LONGEST_PATH = 4096


@dataclass(frozen=True)
class ServeLimits:
    """What one request may make the server read. ``allowed_dirs``: folders whose files rows may
    name (kept as real paths; empty: no path is read); ``max_rows`` per request;
    ``max_row_bytes`` of image data per row; ``batch_size``: rows decoded and scored at a time."""

    allowed_dirs: tuple[str, ...] = ()
    max_rows: int = 1024
    max_row_bytes: int = 32 * 2**20
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_row_bytes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{ENV.get(name, name)} must be at least 1, got {getattr(self, name)}")
        real = tuple(os.path.realpath(d) for d in self.allowed_dirs)
        if not_dirs := [d for d, r in zip(self.allowed_dirs, real, strict=True) if not os.path.isdir(r)]:
            raise ValueError(f"{ENV['allowed_dirs']}: not folders: {', '.join(not_dirs)}")
        object.__setattr__(self, "allowed_dirs", real)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServeLimits:
        """The operator's settings (module docstring); empty entries of the folder list are
        skipped (an empty path would be the working folder)."""
        dirs = tuple(d for d in env.get(ENV["allowed_dirs"], "").split(os.pathsep) if d)
        numbers = {}
        for name in ("max_rows", "max_row_bytes"):
            raw = env.get(ENV[name], "").strip()
            if raw:
                try:
                    numbers[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{ENV[name]}={raw!r} is not a whole number") from None
        return cls(dirs, **numbers)


def row_image(value: Any, limits: ServeLimits, size: int | None = None) -> Image.Image:
    """One row's image, decoded as files are (:func:`clic.data.imageio.decode_bytes`: pixel limit,
    EXIF, any mode to RGB). ``size``: the scorer's input side; JPEGs then decode at the reduced
    DCT scale that ``clic score`` uses for files (:func:`clic.embed.load_for_model`). Raises
    ``ValueError`` saying why the row cannot be read."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string of base64-encoded image bytes, got {type(value).__name__}")
    too_big = f"more than {limits.max_row_bytes} bytes of image data (this server's limit per row)"
    if len(value) > 4 * math.ceil(limits.max_row_bytes / 3):  # refused before decoding
        raise ValueError(too_big)
    min_size = None if size is None else 2 * size
    try:
        data: bytes | None = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        data = None
    if data is not None and len(data) > limits.max_row_bytes:
        raise ValueError(too_big)
    if not limits.allowed_dirs:
        if data is None:
            raise ValueError(NO_PATHS)
        return _decode(data, "image bytes", min_size)
    if data is not None:  # a path can also be valid base64 ("/srv/img/0001"): bytes first, then the path
        with contextlib.suppress(ImageError):
            return _decode(data, "image bytes", min_size)
    return _decode(_allowed_file(value, limits), value, min_size)


def _decode(data: bytes, name: str, min_size: int | None) -> Image.Image:
    """``data`` decoded as ``clic score`` decodes a file: a JPEG corrupted mid-stream refused."""
    check_jpeg_data(name, data)
    return decode_bytes(data, name, min_size=min_size)


def _allowed_file(value: str, limits: ServeLimits) -> bytes:
    """The bytes of the regular file ``value`` names when its real path lies in an allowed
    folder; anything else is one ``ValueError`` that does not say whether the path exists."""
    if len(value) > LONGEST_PATH or "\0" in value:
        raise ValueError(REFUSED)
    real = Path(os.path.realpath(value))  # relative paths resolve against the server's working folder
    if not any(real.is_relative_to(d) for d in limits.allowed_dirs):
        raise ValueError(REFUSED)
    try:  # no symlink swapped in since realpath, no FIFO to block on
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(REFUSED)
            data = fh.read(limits.max_row_bytes + 1)
    except OSError:
        raise ValueError(REFUSED) from None
    if len(data) > limits.max_row_bytes:
        raise ValueError(f"more than {limits.max_row_bytes} bytes of image data (this server's limit per row)")
    return data


class ScorerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # type: ignore[no-untyped-def]
        self.limits = ServeLimits.from_env(os.environ)  # the serving process's settings, read once
        self.scorer = load_scorer(context.artifacts["scorer"], "cpu")

    @staticmethod
    def _image(value: Any, limits: ServeLimits | None = None, size: int | None = None) -> Image.Image:
        """:func:`row_image` with the default limits (no paths)."""
        return row_image(value, limits or ServeLimits(), size)

    @classmethod
    def score_rows(cls, scorer: Scorer, values: Sequence[Any], limits: ServeLimits | None = None) -> pd.DataFrame:
        """One ``score`` (float, or None) and ``error`` per row, in the rows' order, decoded and
        scored ``limits.batch_size`` rows at a time. More than ``limits.max_rows`` rows is an
        ``MlflowException`` (INVALID_PARAMETER_VALUE: HTTP 400 from the scoring server)."""
        limits = limits or ServeLimits()
        values = list(values)
        if len(values) > limits.max_rows:
            raise MlflowException(f"{len(values)} rows sent; this server scores at most {limits.max_rows} rows per "
                                  f"request ({ENV['max_rows']}): send them in several requests",
                                  error_code=INVALID_PARAMETER_VALUE)
        scores: list[float | None] = [None] * len(values)
        errors = [""] * len(values)
        for start in range(0, len(values), limits.batch_size):
            images, where = [], []
            for i in range(start, min(start + limits.batch_size, len(values))):
                try:
                    images.append(row_image(values[i], limits, scorer.cfg.image_size))
                    where.append(i)
                except ValueError as exc:  # Pillow names the in-memory file by its address: not the client's business
                    errors[i] = f"row {i}: " + re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))
            for i, score in zip(where, scorer(images) if images else [], strict=True):
                if math.isfinite(score):
                    scores[i] = float(score)
                else:
                    errors[i] = f"row {i}: the model gave a non-finite score ({score})"
        return pd.DataFrame({"score": pd.Series(scores, dtype=object), "error": errors})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        if "image" not in model_input.columns:
            raise MlflowException("expected a column 'image' of base64-encoded images",
                                  error_code=INVALID_PARAMETER_VALUE)
        return self.score_rows(self.scorer, model_input["image"], self.limits)


mlflow.models.set_model(ScorerModel())
