"""MLflow pyfunc for a clic scorer (models-from-code: nothing is pickled).

Input: a DataFrame with a string column ``image`` holding base64-encoded image bytes (PNG/JPEG)
or a local file path. Output: a DataFrame with column ``score``.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image


class ScorerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # type: ignore[no-untyped-def]
        from clic.scorer import load_scorer

        self.scorer = load_scorer(context.artifacts["scorer"], "cpu")

    @staticmethod
    def _image(value: str) -> str | Image.Image:
        """A path as is, or the decoded bytes; the scorer decodes both as it does files (EXIF
        orientation, 16-bit, transparency)."""
        if len(value) < 4096 and Path(value).is_file():
            return value
        return Image.open(io.BytesIO(base64.b64decode(value)))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        if "image" not in model_input.columns:
            raise ValueError("expected a column 'image' of base64-encoded images or file paths")
        images = [self._image(str(v)) for v in model_input["image"]]
        return pd.DataFrame({"score": self.scorer(images)})


mlflow.models.set_model(ScorerModel())
