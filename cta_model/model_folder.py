"""The model folder (DESIGN 6.1): weights.safetensors, model.yaml, SHA256SUMS, plus what the
trainer adds (lineage.json, reference_stats.parquet).

`model.yaml` is everything needed to rebuild and feed the network: the `ModelSpec`, the class
names, and the input contract (size, normalisation, resize policy) that `Predictor` applies.
The folder is written next to its destination and renamed into place, so a reader sees either
the whole folder or none of it; SHA256SUMS is checked before any weight is loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from cta_model.config import read_yaml
from cta_model.errors import ConfigError, DataError
from cta_model.inspection import ScoreDefinition
from cta_model.nn.models import ModelSpec, MultiTaskNet, build_model

MODEL_YAML = "model.yaml"
WEIGHTS = "weights.safetensors"
CHECKSUMS = "SHA256SUMS"
SCHEMA_VERSION = 1
RESIZE_POLICIES = ("resize", "exact", "tile")
PRECISIONS = ("fp32", "bf16")

# ImageNet statistics: the backbones' pretrained checkpoints expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputContract:
    """How raw uint8 RGB images become the network's input."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # resize: any image is resized to the model's input size and outputs back to the image's;
    # exact: images must already have the model's input size;
    # tile: images keep their pitch and are cut into tiles of the input size that overlap by
    #   tile_overlap_px; the tiles' outputs are blended back into full-image maps.
    resize_policy: str = "resize"
    tile_overlap_px: int = 0

    def __post_init__(self) -> None:
        if self.resize_policy not in RESIZE_POLICIES:
            raise ConfigError(
                f"resize_policy {self.resize_policy!r} is not one of {', '.join(RESIZE_POLICIES)}"
            )
        if self.tile_overlap_px < 0:
            raise ConfigError(f"tile_overlap_px must be >= 0, got {self.tile_overlap_px}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"input mean/std need 3 values, std > 0: {self.mean}, {self.std}")


@dataclass(frozen=True)
class ModelCard:
    """The parsed model.yaml."""

    spec: ModelSpec
    class_names: tuple[str, ...] = ()
    input: InputContract = field(default_factory=InputContract)
    # The model's own defect score (reject classes, window); None for models without a
    # segmentation task and for folders written before it existed (then the inspection
    # config's defaults apply).
    inspection: ScoreDefinition | None = None
    # The range of pitches (mm/px) of the images it was trained on, when known.
    trained_pitch_mm_per_px: tuple[float, float] | None = None
    # The arithmetic its outputs (and so its defect scores and operating threshold) are
    # defined in: "bf16" for a model trained under bf16 autocast, which the Predictor then
    # also runs under it; "fp32" otherwise and for older folders.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": self.spec.to_dict(),
            "class_names": list(self.class_names),
            "input": {
                "size": list(self.spec.input_size),
                "mean": list(self.input.mean),
                "std": list(self.input.std),
                "resize_policy": self.input.resize_policy,
            },
        }
        if self.input.resize_policy == "tile":
            out["input"]["tile_overlap_px"] = self.input.tile_overlap_px
        if self.inspection is not None:
            out["inspection"] = {
                "reject_classes": list(self.inspection.reject_classes),
                "score_window_px": self.inspection.score_window_px,
            }
        if self.trained_pitch_mm_per_px is not None:
            out["trained_pitch_mm_per_px"] = list(self.trained_pitch_mm_per_px)
        out["precision"] = self.precision
        return out

    @property
    def reject_class_names(self) -> tuple[str, ...]:
        if self.inspection is None:
            return ()
        names = self.class_names
        return tuple(
            names[c] if c < len(names) else f"class_{c}" for c in self.inspection.reject_classes
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = MODEL_YAML) -> ModelCard:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ConfigError(
                    f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}"
                )
            known = {
                "schema_version",
                "model",
                "class_names",
                "input",
                "inspection",
                "trained_pitch_mm_per_px",
                "precision",
            }
            unknown = set(data) - known
            if unknown:
                raise ConfigError(f"unknown keys {sorted(unknown)}")
            spec = ModelSpec.from_dict(data["model"])
            contract = dict(data.get("input", {}))
            size = contract.pop("size", None)
            if size is not None and tuple(size) != spec.input_size:
                raise ConfigError(f"input.size {size} != model.input_size {spec.input_size}")
            contract = InputContract(
                mean=tuple(contract.pop("mean", IMAGENET_MEAN)),
                std=tuple(contract.pop("std", IMAGENET_STD)),
                **contract,
            )
            inspection = data.get("inspection")
            if inspection is not None:
                extra = set(inspection) - {"reject_classes", "score_window_px"}
                if extra:
                    raise ConfigError(f"inspection: unknown keys {sorted(extra)}")
                inspection = ScoreDefinition(
                    tuple(int(c) for c in inspection["reject_classes"]),
                    int(inspection.get("score_window_px", 3)),
                )
            pitch = data.get("trained_pitch_mm_per_px")
            return cls(
                spec,
                tuple(data.get("class_names", ())),
                contract,
                inspection,
                None if pitch is None else (float(pitch[0]), float(pitch[1])),
                str(data.get("precision", "fp32")),
            )
        except (ConfigError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUMS).write_text("".join(lines))


def _refuse_paths_outside(folder: Path) -> None:
    """DataError naming the first entry of ``folder`` (SHA256SUMS included) that resolves
    outside it: a symlink there would let the checked sha256 vouch for a file the folder's
    owner does not control."""
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise DataError(
                f"{path}: resolves outside the model folder (to {path.resolve()}); refusing it"
            )


def verify_checksums(folder: str | os.PathLike) -> None:
    """Raise DataError naming every file whose sha256 differs from SHA256SUMS (or is missing),
    a SHA256SUMS that does not list the weights and model.yaml, and any file that resolves
    outside the folder (symlinks)."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    _refuse_paths_outside(folder)
    if not sums.is_file():
        raise DataError(f"{sums}: missing; refusing to load an unverified model folder")
    problems = []
    listed = set()
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        listed.add(name)
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: not a path inside the folder")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif file_sha256(path) != expected:
            problems.append(f"{name}: sha256 differs from {CHECKSUMS}")
    problems += [
        f"{name}: not listed in {CHECKSUMS}" for name in (WEIGHTS, MODEL_YAML) if name not in listed
    ]
    if problems:
        raise DataError(f"{folder}: " + "; ".join(problems))


def folder_sha256(folder: str | os.PathLike) -> str:
    """One digest for the whole folder: the sha256 of its SHA256SUMS file."""
    return file_sha256(Path(folder) / CHECKSUMS)


def save_model_folder(
    model: MultiTaskNet,
    folder: str | os.PathLike,
    *,
    class_names: Sequence[str] = (),
    input_contract: InputContract | None = None,
    inspection: ScoreDefinition | None = None,
    trained_pitch_mm_per_px: tuple[float, float] | None = None,
    precision: str = "fp32",
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the folder atomically: build it in a sibling temp dir, then rename into place."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    card = ModelCard(
        model.spec,
        tuple(class_names),
        input_contract or InputContract(),
        inspection,
        trained_pitch_mm_per_px,
        precision,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS, metadata={"format": "pt"})
        (staging / MODEL_YAML).write_text(yaml.safe_dump(card.to_dict(), sort_keys=False))
        for name, data in (extra_files or {}).items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        write_checksums(staging)
        _fsync_tree(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_model_card(folder: str | os.PathLike) -> ModelCard:
    path = Path(folder) / MODEL_YAML
    if not path.is_file():
        raise DataError(f"{path}: missing; not a model folder")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return ModelCard.from_dict(data, source=str(path))


def load_model_folder(
    folder: str | os.PathLike, verify: bool = True
) -> tuple[MultiTaskNet, ModelCard]:
    """Rebuild the network from model.yaml and load its weights (safetensors: no pickle)."""
    folder = Path(folder)
    if verify:
        verify_checksums(folder)
    card = read_model_card(folder)
    # The weights replace any initial values, so a backbone checkpoint is not needed here.
    model = build_model(card.spec.replace(backbone_weights=None))
    state = load_file(folder / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{folder / WEIGHTS}: does not fit {MODEL_YAML}: {exc}") from exc
    model.eval()
    return model, card


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite_weights(weights: str | os.PathLike) -> None:
    """DataError naming the file and its first non-finite tensors (a diverged training)."""
    bad = nonfinite_tensors(load_file(Path(weights)))
    if bad:
        raise DataError(
            f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values "
            f"(e.g. {', '.join(bad[:3])}); refusing a diverged model"
        )


__all__ = [
    "CHECKSUMS",
    "MODEL_YAML",
    "WEIGHTS",
    "InputContract",
    "ModelCard",
    "check_finite_weights",
    "folder_sha256",
    "load_model_folder",
    "nonfinite_tensors",
    "read_model_card",
    "save_model_folder",
    "verify_checksums",
]
