"""Export a model folder for deployment (DESIGN 6.1, 6.2): `torch.export` (.pt2), ONNX, int8.

    export_model("runs/demo/model", "exports/demo", formats=("pt2", "onnx", "int8"),
                 calib_data="data/lines", calib_samples=32)

What is exported is the Predictor's network on its normalised input at the model's input size
(B, 3, h, w), returning the final prediction of every task as a tuple in task order (the ONNX
graph names them after the tasks); the batch dimension is dynamic. Preprocessing and decoding
stay in `Predictor`: `OnnxPredictor` is a Predictor whose network is an ONNX Runtime session.

int8 is static post-training quantization with ONNX Runtime (QDQ format, per-channel weights,
MinMax calibration over `train` images of a line dataset, fed through `Predictor.preprocess`).
The CTAL affinity block stays in float: every ONNX node whose torch module scope lies under the
network's `refinement` module is excluded (the cosine affinities and the grouped fusion conv are
sensitive to rounding, and their matrix products dominate the block's cost only at large grids).

The output folder holds model.yaml (the input contract), the exported files, `export.json`
(files with sha256, max abs error vs eager per format and task, quantized layers) and, with
int8, `quantization.json` (quantized and excluded nodes with their modules).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cta_model.atomic import write_bytes_atomic
from cta_model.errors import ConfigError, DataError
from cta_model.inference import Predictor
from cta_model.model_folder import (
    MODEL_YAML,
    ModelCard,
    file_sha256,
    folder_sha256,
    read_model_card,
)
from cta_model.nn.models import MultiTaskNet, MultiTaskOutput

FORMATS = ("pt2", "onnx", "int8")
PT2_NAME = "model.pt2"
ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
EXPORT_JSON = "export.json"
QUANTIZATION_JSON = "quantization.json"
INPUT_NAME = "image"
SCHEMA_VERSION = 1
# The wrapper's attribute holding the network: ONNX name scopes start with it.
WRAPPED = "network"
REFINEMENT_SCOPE = f"{WRAPPED}.refinement"
MAX_EXPORT_BATCH = 1024


class ExportWrapper(nn.Module):
    """The network with a tuple output (final predictions in task order), as exporters need."""

    def __init__(self, network: MultiTaskNet) -> None:
        super().__init__()
        setattr(self, WRAPPED, network)
        self.tasks = tuple(network.tasks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        final = getattr(self, WRAPPED)(images).final
        return tuple(final[t] for t in self.tasks)


def freeze_affinity_mode(network: nn.Module) -> str | None:
    """Fix the CTAL block's `auto` mode to what it picks at batch 1 (dense, or blocked on a
    large grid). `auto` decides per call from the batch and the free memory; an exported graph
    holds one computation, and that decision would otherwise become a guard on the batch."""
    block = getattr(network, "refinement", None)
    resolve = getattr(block, "resolve_mode", None)
    if resolve is None:
        return None
    block.mode = resolve(1, torch.float32, torch.device("cpu"))
    return block.mode


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "pt2,onnx" -> ("pt2", "onnx"); int8 needs the fp32 ONNX graph, so it implies onnx."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    unknown = sorted(set(items) - set(FORMATS))
    if unknown or not items:
        raise ConfigError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    if "int8" in items and "onnx" not in items:
        items.append("onnx")
    return tuple(f for f in FORMATS if f in items)


def _max_abs_errors(
    tasks: Sequence[str], reference: Sequence[torch.Tensor], outputs: Sequence[Any]
) -> dict[str, float]:
    return {
        task: float((ref - torch.as_tensor(np.asarray(out))).abs().max())
        for task, ref, out in zip(tasks, reference, outputs, strict=True)
    }


def _worst(*errors: dict[str, float]) -> dict[str, float]:
    return {task: max(e[task] for e in errors) for task in errors[0]}


def verification_inputs(predictor: Predictor, batches: Sequence[int] = (2, 1), seed: int = 0):
    """Normalised inputs from random uint8 images at the model's input size, one per batch
    size: the dynamic batch is checked at a size other than the traced one."""
    rng = np.random.default_rng(seed)
    h, w = predictor.input_size
    return [
        predictor.preprocess(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)) for b in batches
    ]


# --------------------------------------------------------------------------------- ONNX graph
def _name_scopes(node: Any) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return list(ast.literal_eval(prop.value))
    return []


def node_module(node: Any) -> str:
    """The innermost torch module a node of a dynamo-exported graph came from ('' if unknown)."""
    scopes = [s for s in _name_scopes(node)[:-1] if s]  # the last scope is the op itself
    return scopes[-1] if scopes else ""


def node_layer(node: Any, initializers: set[str]) -> str | None:
    """The torch layer owning a node's weight (``...conv1`` for a Conv whose BatchNorm the
    exporter folded in), or None for a node without a weight."""
    for name in node.input[1:2]:
        if name in initializers and name.endswith(".weight"):
            return name.removesuffix(".weight")
    return None


def affinity_block_nodes(onnx_model: Any) -> list[str]:
    """Names of the nodes under the CTAL refinement module (empty for models without one)."""
    return [
        node.name
        for node in onnx_model.graph.node
        if any(
            s == REFINEMENT_SCOPE or s.startswith(REFINEMENT_SCOPE + ".")
            for s in _name_scopes(node)
        )
    ]


def quantized_nodes(int8_model: Any) -> list[str]:
    """Nodes of a QDQ graph that ONNX Runtime runs in int8: their first input comes through a
    DequantizeLinear and every consumer of their outputs is a QuantizeLinear. (A float node
    next to a quantized one also reads a DequantizeLinear, but its output stays float.)"""
    nodes = int8_model.graph.node
    dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    return [
        node.name
        for node in nodes
        if node.op_type not in qdq
        and node.input
        and node.input[0] in dequantized
        and all(consumers.get(out) for out in node.output)
        and all(op == "QuantizeLinear" for out in node.output for op in consumers[out])
    ]


# --------------------------------------------------------------------------------- calibration
def calibration_images(dataset: Any, count: int) -> Iterator[np.ndarray]:
    """``count`` images spread evenly over the dataset (all of them when it is smaller)."""
    if len(dataset) == 0:
        raise DataError("calibration data: the train split has no samples")
    n = min(count, len(dataset))
    for index in np.linspace(0, len(dataset) - 1, n).round().astype(int):
        yield np.array(dataset[int(index)]["image"])  # a writable copy for torch


class PredictorCalibrationReader:
    """ONNX Runtime CalibrationDataReader: images through the Predictor's own preprocessing
    (a tiling model's calibration batches are tiles at the image's pitch, not the resized
    image, so the int8 ranges are those of the activations it serves)."""

    def __init__(self, predictor: Predictor, images: Iterator[np.ndarray]) -> None:
        self._predictor = predictor
        self._images = images
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        if image is None:
            return None
        self.count += 1
        return {INPUT_NAME: self._predictor.network_inputs(image).cpu().numpy()}


def _open_calibration(calib_data: Any, lines_config: Any) -> Any:
    if calib_data is None:
        raise ConfigError("int8 export needs calibration data: pass --calib-data (a line dataset)")
    if isinstance(calib_data, str | os.PathLike):
        from cta_model.data.line_dataset import LineDataset

        return LineDataset(calib_data, lines_config=lines_config, split="train")
    return calib_data  # already a dataset of `train` samples


# --------------------------------------------------------------------------------- exporters
def _export_pt2(wrapper: ExportWrapper, inputs: list[torch.Tensor], path: Path) -> dict:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(wrapper, (inputs[0],), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        errors = [_max_abs_errors(wrapper.tasks, wrapper(x), loaded(x)) for x in inputs]
    return _worst(*errors)


def _export_onnx(wrapper: ExportWrapper, inputs: list[torch.Tensor], path: Path) -> dict:
    import warnings

    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours
        torch.onnx.export(
            wrapper,
            (inputs[0],),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=[INPUT_NAME],
            output_names=list(wrapper.tasks),
            external_data=False,
            verbose=False,
        )
    return _worst(*_ort_errors(wrapper, inputs, path))


def _ort_errors(wrapper: ExportWrapper, inputs: list[torch.Tensor], path: Path) -> list[dict]:
    session = ort_session(path)
    with torch.no_grad():
        return [
            _max_abs_errors(wrapper.tasks, wrapper(x), session.run(None, {INPUT_NAME: x.numpy()}))
            for x in inputs
        ]


def _quantize_int8(
    predictor: Predictor,
    fp32_path: Path,
    int8_path: Path,
    dataset: Any,
    calib_samples: int,
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = onnx.load(str(fp32_path))
    excluded = affinity_block_nodes(fp32)
    reader = PredictorCalibrationReader(predictor, calibration_images(dataset, calib_samples))
    quantize_static(
        str(fp32_path),
        str(int8_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=excluded,
    )
    initializers = {init.name for init in fp32.graph.initializer}
    origin = {
        node.name: {
            "op_type": node.op_type,
            "module": node_module(node),
            "layer": node_layer(node, initializers),
        }
        for node in fp32.graph.node
    }
    quantized = quantized_nodes(onnx.load(str(int8_path)))
    leaked = sorted(set(quantized) & set(excluded))
    if leaked:
        raise RuntimeError(f"affinity-block nodes were quantized despite exclusion: {leaked}")

    def describe(names: list[str]) -> list[dict[str, Any]]:
        return [{"node": n, **origin.get(n, {})} for n in names]

    return {
        "schema_version": SCHEMA_VERSION,
        "method": "static post-training quantization (ONNX Runtime quantize_static)",
        "settings": {
            "quant_format": "QDQ",
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "per_channel": True,
            "calibrate_method": "MinMax",
        },
        "calibration": {"split": "train", "n_images": reader.count},
        "excluded_scope": REFINEMENT_SCOPE,
        "quantized": describe(quantized),
        "excluded": describe(excluded),
        # Layers with weights (conv, transposed conv) whose weights and inputs are int8.
        "quantized_layers": sorted(
            {origin[n]["layer"] for n in quantized if origin.get(n, {}).get("layer")}
        ),
        "float_layers": sorted(
            {e["layer"] for e in origin.values() if e["layer"]}
            - {origin[n]["layer"] for n in quantized if n in origin}
        ),
    }


def ort_session(path: str | os.PathLike, intra_op_threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not ours to fix
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: str | Sequence[str] = FORMATS,
    *,
    calib_data: Any = None,
    calib_samples: int = 32,
    lines_config: Any = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export ``model_dir`` into ``out_dir`` (written beside it and renamed into place);
    returns the export.json content. ``calib_data``: a line dataset folder (its `train`
    split) or a dataset object of train samples; required for int8."""
    chosen = parse_formats(formats)
    if calib_samples < 1:
        raise ConfigError(f"--calib-samples must be >= 1, got {calib_samples}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} exists; choose another --out or pass overwrite")
    calibration = _open_calibration(calib_data, lines_config) if "int8" in chosen else None
    predictor = Predictor.from_folder(model_dir)
    # The exported graphs are plain NCHW with contiguous weights (the Predictor's channels-last
    # layout is a CPU speed choice; torch.export's archive expects contiguous tensors).
    network = predictor.model.to(memory_format=torch.contiguous_format)
    affinity_mode = freeze_affinity_mode(network)
    wrapper = ExportWrapper(network).eval()
    inputs = verification_inputs(predictor)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copyfile(Path(model_dir) / MODEL_YAML, staging / MODEL_YAML)
        errors: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        quantization = None
        for fmt in chosen:
            started = time.perf_counter()
            log(f"export: {fmt} ...")
            if fmt == "pt2":
                errors["pt2"] = _export_pt2(wrapper, inputs, staging / PT2_NAME)
            elif fmt == "onnx":
                errors["onnx"] = _export_onnx(wrapper, inputs, staging / ONNX_NAME)
            else:
                quantization = _quantize_int8(
                    predictor, staging / ONNX_NAME, staging / INT8_NAME, calibration, calib_samples
                )
                errors["int8"] = _worst(*_ort_errors(wrapper, inputs, staging / INT8_NAME))
                write_bytes_atomic(
                    staging / QUANTIZATION_JSON,
                    (json.dumps(quantization, indent=2) + "\n").encode(),
                )
            seconds[fmt] = round(time.perf_counter() - started, 2)
            log(f"export: {fmt} done in {seconds[fmt]} s, max abs error vs eager {errors[fmt]}")
        card = predictor.card
        result = {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "folder": str(Path(model_dir).resolve()),
                "sha256": folder_sha256(model_dir),
                "arch": card.spec.arch,
                "tasks": list(card.spec.tasks),
                "input_size": list(card.spec.input_size),
            },
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, *card.spec.input_size]},
            "outputs": list(card.spec.tasks),
            "dynamic_batch": True,
            "affinity_mode": affinity_mode,
            "formats": list(chosen),
            "versions": _versions(),
            "files": {
                p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                for p in sorted(staging.iterdir())
                if p.is_file()
            },
            "max_abs_error_vs_eager": errors,
            "verification": {"batches": [int(x.shape[0]) for x in inputs], "seed": 0},
            "seconds": seconds,
            "quantized_layers": quantization["quantized_layers"] if quantization else None,
            "excluded_nodes": [e["node"] for e in quantization["excluded"]]
            if quantization
            else None,
        }
        write_bytes_atomic(staging / EXPORT_JSON, (json.dumps(result, indent=2) + "\n").encode())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def verify_export(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file listed in export.json against its sha256; return export.json."""
    folder = Path(folder)
    path = folder / EXPORT_JSON
    if not path.is_file():
        raise DataError(f"{path}: missing; not an export folder (run `cta model export`)")
    manifest = json.loads(path.read_text())
    problems = [
        f"{name}: {'missing' if not (folder / name).is_file() else 'sha256 differs'}"
        for name, entry in manifest["files"].items()
        if not (folder / name).is_file() or file_sha256(folder / name) != entry["sha256"]
    ]
    if problems:
        raise DataError(f"{folder}: " + "; ".join(problems))
    return manifest


# --------------------------------------------------------------------------------- inference
class OnnxRuntimeNetwork(nn.Module):
    """An ONNX Runtime session behind the network interface the Predictor calls."""

    def __init__(self, path: str | os.PathLike, tasks: Sequence[str], intra_op_threads=None):
        super().__init__()
        self.path = str(path)
        self.tasks = tuple(tasks)
        self.session = ort_session(path, intra_op_threads)

    def forward(self, images: torch.Tensor) -> MultiTaskOutput:
        array = images.detach().cpu().float().contiguous().numpy()  # NCHW, as exported
        outputs = self.session.run(None, {INPUT_NAME: array})
        return MultiTaskOutput(
            {t: torch.from_numpy(o) for t, o in zip(self.tasks, outputs, strict=True)}, {}
        )


class OnnxPredictor(Predictor):
    """The Predictor with an ONNX Runtime network: same preprocessing and decoding (CPU)."""

    def __init__(self, path: str | os.PathLike, card: ModelCard, intra_op_threads=None) -> None:
        super().__init__(OnnxRuntimeNetwork(path, card.spec.tasks, intra_op_threads), card, "cpu")
        self.bf16 = False  # the graph computes in its own arithmetic (fp32, or int8)

    @classmethod
    def from_export(
        cls,
        folder: str | os.PathLike,
        *,
        quantized: bool = False,
        verify: bool = True,
        intra_op_threads: int | None = None,
    ) -> OnnxPredictor:
        """Load ``model.onnx`` (or ``model.int8.onnx``) of a `cta model export` folder."""
        folder = Path(folder)
        if verify:
            verify_export(folder)
        path = folder / (INT8_NAME if quantized else ONNX_NAME)
        if not path.is_file():
            raise DataError(
                f"{path}: missing; export with --format {'int8' if quantized else 'onnx'}"
            )
        return cls(path, read_model_card(folder), intra_op_threads)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> OnnxPredictor:
        """An export folder (not a model folder): its fp32 ONNX graph."""
        return cls.from_export(folder, verify=verify)


__all__ = [
    "EXPORT_JSON",
    "FORMATS",
    "ExportWrapper",
    "OnnxPredictor",
    "OnnxRuntimeNetwork",
    "affinity_block_nodes",
    "export_model",
    "parse_formats",
    "quantized_nodes",
    "verify_export",
]
