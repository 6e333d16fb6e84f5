"""Model folder round trip and the one Predictor."""

import numpy as np
import pytest
import torch
import yaml

from cta_model.errors import ConfigError, DataError
from cta_model.inference import Predictor
from cta_model.model_folder import (
    CHECKSUMS,
    MODEL_YAML,
    WEIGHTS,
    InputContract,
    folder_sha256,
    load_model_folder,
    save_model_folder,
)
from cta_model.nn.models import ModelSpec, build_model

pytestmark = pytest.mark.unit
TASKS = ("semseg", "height", "normals")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="ctal", tasks=TASKS, input_size=(32, 32), backbone="resnet18", num_classes=4
    )
    return build_model(spec).eval()


@pytest.fixture
def folder(tmp_path, model):
    return save_model_folder(model, tmp_path / "model", class_names=["a", "b", "c", "d"])


def test_round_trip_gives_identical_predictions(folder, model):
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, MODEL_YAML, CHECKSUMS])
    loaded, card = load_model_folder(folder)
    assert card.spec == model.spec and card.class_names == ("a", "b", "c", "d")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for task in TASKS:
            assert torch.equal(loaded(x).final[task], model(x).final[task])
    assert len(folder_sha256(folder)) == 64


def test_predictor_returns_one_array_per_task_at_image_size(folder):
    predictor = Predictor.from_folder(folder)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    out = predictor.predict(images)
    assert set(out) == set(TASKS)
    assert out["semseg"].shape == (2, 48, 40) and out["semseg"].dtype == np.int64
    assert out["semseg"].min() >= 0 and out["semseg"].max() < 4
    assert out["height"].shape == (2, 48, 40) and out["height"].dtype == np.float32
    assert out["normals"].shape == (2, 48, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-5)
    single = predictor.predict(images[0])
    np.testing.assert_allclose(single["height"][0], out["height"][0], rtol=1e-5, atol=1e-5)


def test_predictor_refuses_bad_images(folder):
    predictor = Predictor.from_folder(folder)
    with pytest.raises(DataError, match="uint8"):
        predictor.predict(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"\(H, W, 3\)"):
        predictor.predict(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        predictor.predict(np.zeros((0, 32, 32, 3), dtype=np.uint8))


def test_exact_resize_policy_refuses_other_sizes(tmp_path, model):
    folder = save_model_folder(
        model, tmp_path / "exact", input_contract=InputContract(resize_policy="exact")
    )
    predictor = Predictor.from_folder(folder)
    predictor.predict(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="resize_policy: exact"):
        predictor.predict(np.zeros((40, 32, 3), dtype=np.uint8))


def test_tampered_weights_are_refused_before_loading(folder):
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{WEIGHTS}: sha256 differs"):
        Predictor.from_folder(folder)


def test_model_yaml_errors_name_the_file_and_key(folder):
    card = yaml.safe_load((folder / MODEL_YAML).read_text())
    card["input"]["resize_policy"] = "stretch"
    (folder / MODEL_YAML).write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=r"model.yaml: resize_policy 'stretch'"):
        load_model_folder(folder, verify=False)


def test_the_card_records_its_precision_and_older_folders_read_as_fp32(tmp_path, model, folder):
    assert load_model_folder(folder)[1].precision == "fp32"
    bf16 = save_model_folder(model, tmp_path / "bf16", precision="bf16")
    assert yaml.safe_load((bf16 / MODEL_YAML).read_text())["precision"] == "bf16"
    assert load_model_folder(bf16)[1].precision == "bf16"
    card = yaml.safe_load((folder / MODEL_YAML).read_text())
    del card["precision"]  # a folder written before the key existed
    (folder / MODEL_YAML).write_text(yaml.safe_dump(card))
    assert load_model_folder(folder, verify=False)[1].precision == "fp32"
    card["precision"] = "fp16"
    (folder / MODEL_YAML).write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=r"model.yaml: precision 'fp16' is not one of fp32, bf16"):
        load_model_folder(folder, verify=False)


def test_a_bf16_card_runs_the_network_under_bf16_and_returns_float32(tmp_path, model):
    images = np.random.default_rng(3).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    fp32 = Predictor.from_folder(save_model_folder(model, tmp_path / "fp32"))
    bf16 = Predictor.from_folder(save_model_folder(model, tmp_path / "bf16", precision="bf16"))
    assert bf16.bf16 and not fp32.bf16
    out = bf16.forward(bf16.preprocess(images))
    assert all(v.dtype == torch.float32 for v in out.final.values())
    reference, rounded = fp32.predict(images)["height"], bf16.predict(images)["height"]
    assert not np.array_equal(reference, rounded)  # bf16 arithmetic did run
    assert np.allclose(reference, rounded, atol=0.05 * np.abs(reference).max() + 1e-3)


def test_existing_folder_is_kept_unless_overwrite(folder, model):
    before = (folder / CHECKSUMS).read_bytes()
    with pytest.raises(FileExistsError):
        save_model_folder(model, folder)
    assert (folder / CHECKSUMS).read_bytes() == before
    save_model_folder(model, folder, overwrite=True, extra_files={"lineage.json": b"{}"})
    assert (folder / "lineage.json").read_bytes() == b"{}"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_partial_folder(tmp_path, model):
    target = tmp_path / "never"
    with pytest.raises(TypeError):
        save_model_folder(model, target, extra_files={"bad": "not bytes"})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
