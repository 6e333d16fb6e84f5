"""Export (torch.export, ONNX, int8) of a tiny untrained CTAL model, through `cta model export`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cta_cli.main import main
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError, DataError
from cta_model.export import (
    EXPORT_JSON,
    INPUT_NAME,
    INT8_NAME,
    ONNX_NAME,
    PT2_NAME,
    QUANTIZATION_JSON,
    REFINEMENT_SCOPE,
    ExportWrapper,
    OnnxPredictor,
    affinity_block_nodes,
    ort_session,
    parse_formats,
    verify_export,
)
from cta_model.inference import Predictor
from cta_model.model_folder import save_model_folder
from cta_model.nn.models import ModelSpec, build_model

pytestmark = pytest.mark.unit

TASKS = ("semseg", "height", "normals")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="ctal",
        tasks=TASKS,
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=10,
    )
    return save_model_folder(build_model(spec), tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def calib_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("export") / "lines",
        n_lines=1,
        samples_per_line=6,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )


def _cli_export(model_dir: Path, out: Path, calib_data: Path):
    """`cta model export` with every format (int8 calibrated on 3 samples); must succeed."""
    result = CliRunner().invoke(
        main,
        [
            "model", "export", "--model", str(model_dir), "--out", str(out),
            "--calib-data", str(calib_data), "--calib-samples", "3",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def exported(tiny_model: Path, calib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI export with every format, shared by the tests below (they only read it)."""
    out = tmp_path_factory.mktemp("export") / "out"
    result = _cli_export(tiny_model, out, calib_data)
    assert "int8:" in result.output
    return out


def _images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _eager(model_dir: Path, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    predictor = Predictor.from_folder(model_dir)
    x = predictor.preprocess(images)
    with torch.no_grad():
        return x, ExportWrapper(predictor.model).eval()(x)


def test_cli_writes_every_file_with_matching_checksums(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {PT2_NAME, ONNX_NAME, INT8_NAME, EXPORT_JSON, QUANTIZATION_JSON, "model.yaml"} <= names
    manifest = verify_export(exported)
    assert manifest["formats"] == ["pt2", "onnx", "int8"]
    assert manifest["affinity_mode"] == "dense"  # `auto` fixed for the graph (a 4x4 grid)
    assert set(manifest["files"]) == names - {EXPORT_JSON}
    errors = manifest["max_abs_error_vs_eager"]
    for fmt in ("pt2", "onnx"):
        assert set(errors[fmt]) == set(TASKS)
        assert max(errors[fmt].values()) < 1e-4, errors
    assert manifest["quantized_layers"], "the report lists the quantized layers"

    tampered = exported / ONNX_NAME
    original = tampered.read_bytes()
    try:
        tampered.write_bytes(original + b"\0")
        with pytest.raises(DataError, match="model.onnx: sha256 differs"):
            verify_export(exported)
    finally:
        tampered.write_bytes(original)


def test_pt2_and_onnx_equal_eager_at_another_batch_size(tiny_model: Path, exported: Path) -> None:
    x, reference = _eager(tiny_model, _images(3))
    program = torch.export.load(exported / PT2_NAME).module()
    session = ort_session(exported / ONNX_NAME)
    onnx_out = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        pt2_out = program(x)
    for ref, pt2, onx in zip(reference, pt2_out, onnx_out, strict=True):
        assert ref.shape[0] == 3
        torch.testing.assert_close(pt2, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(onx), ref, atol=1e-4, rtol=0)


def test_onnx_predictor_decodes_like_the_predictor(tiny_model: Path, exported: Path) -> None:
    images = _images(2, size=40)  # another size: the shared preprocessing resizes
    expected = Predictor.from_folder(tiny_model).predict(images)
    got = OnnxPredictor.from_export(exported).predict(images)
    assert set(got) == set(TASKS)
    for task in ("height", "normals"):
        np.testing.assert_allclose(got[task], expected[task], atol=1e-4, rtol=0)
    assert got["semseg"].shape == (2, 40, 40)
    assert (got["semseg"] == expected["semseg"]).mean() > 0.99


def test_int8_keeps_the_affinity_block_float_and_quantizes_convs(
    tiny_model: Path, exported: Path
) -> None:
    _check_int8_keeps_the_block_float(tiny_model, exported)


def _check_int8_keeps_the_block_float(model_dir: Path, exported: Path) -> None:
    report = json.loads((exported / QUANTIZATION_JSON).read_text())
    fp32 = onnx.load(str(exported / ONNX_NAME))
    block = set(affinity_block_nodes(fp32))
    assert block and {e["node"] for e in report["excluded"]} == block
    assert any(n.op_type == "MatMul" for n in fp32.graph.node if n.name in block)
    assert not block & {e["node"] for e in report["quantized"]}
    assert all(e["module"].startswith(REFINEMENT_SCOPE) for e in report["excluded"])

    int8 = onnx.load(str(exported / INT8_NAME))
    producers = {out: node.op_type for node in int8.graph.node for out in node.output}
    # Independent of the report: no affinity-block node reads a dequantized weight, and every
    # weight of a quantized conv is an int8 tensor behind a DequantizeLinear.
    block_nodes = [n for n in int8.graph.node if n.name in block]
    assert block_nodes
    for node in block_nodes:
        assert all(producers.get(name) != "DequantizeLinear" for name in node.input[1:]), node.name
    quantized_convs = [
        n
        for n in int8.graph.node
        if n.op_type == "Conv" and producers.get(n.input[1]) == "DequantizeLinear"
    ]
    assert len(quantized_convs) >= 10
    assert any("backbone" in layer for layer in report["quantized_layers"])
    assert not any(layer.startswith(REFINEMENT_SCOPE) for layer in report["quantized_layers"])
    assert report["calibration"]["n_images"] == 3

    x, reference = _eager(model_dir, _images(2))
    outputs = ort_session(exported / INT8_NAME).run(None, {INPUT_NAME: x.numpy()})
    for task, ref, out in zip(TASKS, reference, outputs, strict=True):
        error = (torch.from_numpy(out) - ref).abs().mean()
        assert error <= 0.2 * ref.abs().mean() + 1e-6, (task, float(error))


def test_a_linear_mode_model_exports_to_every_format(
    calib_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The linear block's plain-op forward traces; the same error checks as the dense export,
    on the same weights (the tiny model's spec and seed, run in linear mode)."""
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="ctal",
        tasks=TASKS,
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=10,
        affinity_mode="linear",
    )
    folder = tmp_path_factory.mktemp("export") / "linear"
    model_dir = save_model_folder(build_model(spec), folder / "model")
    out = folder / "out"
    _cli_export(model_dir, out, calib_data)
    manifest = verify_export(out)
    assert manifest["affinity_mode"] == "linear"
    for fmt in ("pt2", "onnx"):
        assert max(manifest["max_abs_error_vs_eager"][fmt].values()) < 1e-4, manifest
    x, reference = _eager(model_dir, _images(3))
    program = torch.export.load(out / PT2_NAME).module()
    with torch.no_grad():
        for ref, got in zip(reference, program(x), strict=True):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    _check_int8_keeps_the_block_float(model_dir, out)


def test_int8_without_calibration_data_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["model", "export", "--model", str(tiny_model), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert "--calib-data" in result.output
    assert not (tmp_path / "x").exists()


def test_format_list_is_checked_and_int8_implies_onnx() -> None:
    assert parse_formats("int8") == ("onnx", "int8")
    assert parse_formats("onnx, pt2") == ("pt2", "onnx")
    with pytest.raises(ConfigError, match="tflite"):
        parse_formats("pt2,tflite")
