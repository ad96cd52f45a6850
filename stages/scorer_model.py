"""MLflow pyfunc for a clic scorer (models-from-code: nothing is pickled).

The logged model carries this file, the ``clic`` package (``code_paths``) and the scorer file, and
its requirements pin PyPI packages only: it loads where the project is not installed.

Input: a DataFrame with a string column ``image`` holding base64-encoded image bytes (PNG/JPEG)
or a local file path. Output: a DataFrame with ``score`` (NaN for a row that could not be read)
and ``error`` (empty, or why that row could not be read): one bad row never fails the batch.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image


class ScorerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # type: ignore[no-untyped-def]
        from clic.scorer import load_scorer

        self.scorer = load_scorer(context.artifacts["scorer"], "cpu")

    @staticmethod
    def _image(value: str) -> str | Image.Image:
        """A path as is, or the decoded bytes; the scorer decodes both as it does files (EXIF
        orientation, 16-bit, transparency). Raises ``ValueError`` saying what the value is not."""
        if len(value) < 4096 and Path(value).is_file():
            return value
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("neither an existing file path nor base64-encoded image bytes") from None
        try:
            return Image.open(io.BytesIO(data))
        except (OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"base64 bytes that are not an image ({type(exc).__name__})") from None

    @classmethod
    def score_rows(cls, scorer: Any, values: Iterable[Any]) -> pd.DataFrame:
        """One ``score`` and ``error`` per row, in the rows' order."""
        images: list[str | Image.Image] = []
        where: list[int] = []
        errors: list[str] = []
        for i, value in enumerate(values):
            try:
                if not isinstance(value, str):
                    raise ValueError(f"expected a string, got {type(value).__name__}")
                images.append(cls._image(value))
                where.append(i)
                errors.append("")
            except ValueError as exc:
                errors.append(f"row {i}: {exc}")
        scores = np.full(len(errors), np.nan)
        try:
            if images:
                scores[where] = scorer(images)
        except (ValueError, OSError):  # an image that fails to decode: one at a time, so it is its row's error
            for i, img in zip(where, images, strict=True):
                try:
                    scores[i] = float(scorer([img])[0])
                except (ValueError, OSError) as exc:
                    errors[i] = f"row {i}: {exc}"
        return pd.DataFrame({"score": scores, "error": errors})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        if "image" not in model_input.columns:
            raise ValueError("expected a column 'image' of base64-encoded images or file paths")
        return self.score_rows(self.scorer, model_input["image"])


mlflow.models.set_model(ScorerModel())
