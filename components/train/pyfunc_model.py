"""The MLflow pyfunc of a cta model, logged as code (DESIGN 6.1): MLflow stores this file, not a
pickle of an object, so loading works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

The model folder (weights.safetensors, model.yaml, SHA256SUMS) is the pyfunc artifact
``model_dir``; ``load_context`` hands it to the one ``cta_model.inference.Predictor``, which
verifies SHA256SUMS before reading any weight, so the pyfunc and every other consumer preprocess
and decode identically.

Input: uint8 RGB images, a batch (B, H, W, 3) or one image (H, W, 3).
Output: a dict {task: numpy array}, one entry per task of the model, each with the batch axis
first (semseg int64 (B, H, W), height / depth float32 (B, H, W), normals float32 (B, H, W, 3)).
The logged signature names one output tensor per task (see logged_model.py).

This file runs inside MLflow's loader (a fresh module per load): keep it free of side effects
other than ``set_model``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from components.registry.names import MODEL_DIR_ARTIFACT


def as_uint8_images(model_input: Any) -> np.ndarray:
    """Accept an ndarray, nested lists (JSON) or a one-column mapping; return uint8 images."""
    if isinstance(model_input, dict) and len(model_input) == 1:
        # Serving with a named input tensor ({"inputs": {"images": ...}}) arrives as a dict.
        (model_input,) = model_input.values()
    images = np.asarray(model_input)
    if images.dtype != np.uint8:
        # JSON has no uint8: accept integers that fit, refuse anything else (floats are
        # ambiguous between 0..1 and 0..255).
        if not np.issubdtype(images.dtype, np.integer):
            raise TypeError(f"images must be uint8 RGB, got dtype {images.dtype}")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError("images must be uint8 RGB: values outside 0..255")
        images = images.astype(np.uint8)
    return images


class CtaPyfuncModel(PythonModel):
    """Wraps ``Predictor``; one instance per loaded model."""

    def load_context(self, context: Any) -> None:
        # Imported here: the loader executes this file before MLflow prepends any code paths.
        from cta_model.inference import Predictor

        self.predictor = Predictor.from_folder(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        # np.ndarray is a hint MLflow 3 infers no schema from, so the tensor signature logged
        # with the model stays in force (and MLflow does not warn about a missing hint).
        return self.predictor.predict(as_uint8_images(model_input))


mlflow.models.set_model(CtaPyfuncModel())
