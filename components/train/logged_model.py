"""Log a model folder as an MLflow LoggedModel (models from code, DESIGN 6.1); never registers.

The pyfunc is ``pyfunc_model.py`` (a file MLflow stores and re-executes, not a pickle); the model
folder is its artifact ``model_dir``. Nothing in the logged model is a pickle, so it loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Multiple outputs: the pyfunc returns a dict {task: numpy array}. The signature declares the
input as one uint8 tensor (-1, H, W, 3) and the output as one *named* tensor per task (dtype and
trailing shape taken from a real prediction on the input example), which MLflow 3.17 accepts for
a PythonModel: ``load_model(...).predict(batch)`` returns the dict unchanged and the scoring
server answers ``{"predictions": {task: [...]}}``. (The generic torch/pyfunc flavours allow one
output tensor only, DESIGN 6.2.)

Environment: ``pip_requirements`` are set explicitly (pinned to the installed versions of what
the Predictor imports) so MLflow never runs its slow, import-tracing requirement inference. The
``cta`` package is a requirement, not bundled with ``code_paths``: MLflow prepends code paths to
``sys.path`` for the rest of the process, which would shadow the installed package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import Schema, TensorSpec

from components.registry.names import MODEL_DIR_ARTIFACT, TAG_MODEL_SHA256
from cta_model.inference import Predictor
from cta_model.model_folder import WEIGHTS, check_finite_weights, folder_sha256, verify_checksums

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
# The distributions the pyfunc imports (cta_model.inference and its imports); mlflow itself is
# added by MLflow.
RUNTIME_DISTRIBUTIONS = ("cta", "torch", "numpy", "safetensors", "pyyaml")
# A JSON input example of a full-size image is megabytes; with resize_policy "resize" any size
# is valid, so the example is capped to this many pixels per side.
MAX_EXAMPLE_SIDE = 64


def pinned_requirements(distributions: tuple[str, ...] = RUNTIME_DISTRIBUTIONS) -> list[str]:
    """``name==installed version`` for each distribution; the bare name when not installed."""
    requirements = []
    for name in distributions:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            requirements.append(name)
    return requirements


def _example_size(predictor: Predictor, requested: tuple[int, int] | None) -> tuple[int, int]:
    if requested is not None:
        return (int(requested[0]), int(requested[1]))
    height, width = predictor.input_size
    if predictor.card.input.resize_policy == "exact":
        return (height, width)
    return (min(height, MAX_EXAMPLE_SIDE), min(width, MAX_EXAMPLE_SIDE))


def build_signature(predictor: Predictor, example: np.ndarray) -> ModelSignature:
    """Input: one uint8 image batch; output: one named tensor per task, from a real prediction."""
    if predictor.card.input.resize_policy == "exact":
        image_shape: tuple[int, ...] = (*predictor.input_size, 3)
    else:
        image_shape = (-1, -1, 3)
    outputs = predictor.predict(example)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]),
        outputs=Schema(
            [
                # Batch, height and width vary with the input; channel axes (normals: 3) do not.
                TensorSpec(array.dtype, (-1, -1, -1, *array.shape[3:]), task)
                for task, array in outputs.items()
            ]
        ),
    )


def log_model_folder(
    model_dir: str | os.PathLike,
    name: str = "model",
    input_example_size: tuple[int, int] | None = None,
    *,
    tags: Mapping[str, str] | None = None,
) -> ModelInfo:
    """Log ``model_dir`` as a LoggedModel in the active run (or standalone without one).

    ``input_example_size`` is the (H, W) of the logged input example; by default the model's
    input size, capped at MAX_EXAMPLE_SIDE per side unless resize_policy is "exact".
    A folder whose weights hold NaN or infinite values is refused (DataError). The
    LoggedModel gets ``tags`` plus ``cta.model_sha256`` (the folder digest). Returns
    MLflow's ModelInfo: ``model_id`` and ``model_uri`` (``models:/m-...``).
    """
    model_dir = Path(model_dir).resolve()
    # Refuse to publish a damaged folder or a diverged model; the pyfunc checks the checksums
    # again on every load.
    verify_checksums(model_dir)
    check_finite_weights(model_dir / WEIGHTS)
    predictor = Predictor.from_folder(model_dir, verify=False)
    height, width = _example_size(predictor, input_example_size)
    # Random pixels, not zeros: an all-constant image hides decoding errors.
    example = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        signature=build_signature(predictor, example),
        input_example=example,
        pip_requirements=pinned_requirements(),
        tags={**(tags or {}), TAG_MODEL_SHA256: folder_sha256(model_dir)},
    )


__all__ = [
    "MAX_EXAMPLE_SIDE",
    "PYFUNC_MODEL_FILE",
    "RUNTIME_DISTRIBUTIONS",
    "build_signature",
    "log_model_folder",
    "pinned_requirements",
]
