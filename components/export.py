"""Export a model for deployment (`cta model export`): resolve the model and calibration URIs
(folder, registry, S3, dataset_ref), then `cta_model.export`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cta_model.errors import ConfigError


def resolve_model(uri: str, tracking_uri: str | None = None) -> Path:
    """A verified local model folder: a folder as is, `models:/NAME/<version>` or
    `models:/NAME@alias` downloaded from the registry."""
    if uri.startswith("models:/"):
        from components.registry.models import fetch_model_folder

        return fetch_model_folder(uri, tracking_uri=tracking_uri)
    folder = Path(uri)
    if not folder.is_dir():
        raise ConfigError(f"--model {uri}: not a folder or a models:/ URI")
    return folder


def open_calibration(uri: str | None) -> Any:
    """The `train` split of a line dataset: a folder, `s3://` prefix, or a dataset_ref.json
    (its quarantined samples are left out)."""
    if uri is None:
        return None
    from components.artifacts import read_json
    from components.storage import S3Opener, is_remote
    from cta_model.data.line_dataset import LineDataset

    root, quarantined = uri, set()
    if not is_remote(uri) and uri.endswith(".json"):
        ref = read_json(uri, schema_name="dataset_ref")
        root, quarantined = ref["uri"], set(ref["quarantine"])
    dataset = LineDataset(root, split="train", opener=S3Opener(root) if is_remote(root) else None)
    return _Without(dataset, quarantined) if quarantined else dataset


class _Without:
    """A dataset view that skips the given sample ids."""

    def __init__(self, dataset: Any, sample_ids: set[str]) -> None:
        self._dataset = dataset
        self._indices = [i for i, s in enumerate(dataset.sample_ids) if s not in sample_ids]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._dataset[self._indices[index]]


def run(
    model_uri: str,
    out_dir: str | os.PathLike,
    formats: str,
    calib_data: str | None,
    calib_samples: int,
    overwrite: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Export the model at model_uri to out_dir in the comma-separated formats (pt2, onnx,
    int8); returns the export.json content."""
    from cta_model.export import export_model, parse_formats

    chosen = parse_formats(formats)
    if "int8" in chosen and calib_data is None:
        raise ConfigError(
            "--format int8 needs --calib-data (a line dataset; its train split calibrates), "
            "or export without int8: --format pt2,onnx"
        )
    return export_model(
        resolve_model(model_uri, tracking_uri),
        out_dir,
        chosen,
        calib_data=open_calibration(calib_data) if "int8" in chosen else None,
        calib_samples=calib_samples,
        overwrite=overwrite,
    )
