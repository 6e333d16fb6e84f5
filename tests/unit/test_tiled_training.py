"""Tiles at the image's pitch (Predictor and training transforms), pasted anomalies, the
defect-aware loss, and the train config's guards for inspection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cta_model.data import transforms as T
from cta_model.data.anomalies import AnomalyConfig
from cta_model.errors import ConfigError
from cta_model.export import INPUT_NAME, PredictorCalibrationReader
from cta_model.inference import TILE_BATCH, Predictor, tile_starts
from cta_model.inspection import ScoreDefinition, image_scores
from cta_model.losses import DefectAwareCrossEntropy, masked_cross_entropy
from cta_model.model_folder import (
    InputContract,
    load_model_folder,
    read_model_card,
    save_model_folder,
)
from cta_model.nn.models import ModelSpec, build_model
from cta_model.train_config import validate_train_config
from cta_model.training.loaders import DefectBalancedTiles

pytestmark = pytest.mark.unit
TASKS = ("semseg", "height", "normals")


@pytest.fixture(scope="module")
def tiled_folder(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec(
        arch="hps",
        tasks=TASKS,
        input_size=(32, 32),
        backbone="resnet18",
        num_classes=10,
        decoder_channels=16,
        affinity_channels=8,
    )
    model = build_model(spec).eval()
    folder = tmp_path_factory.mktemp("m") / "model"
    save_model_folder(
        model,
        folder,
        class_names=[f"c{i}" for i in range(10)],
        input_contract=InputContract(resize_policy="tile", tile_overlap_px=8),
        inspection=ScoreDefinition((5, 6, 7, 8), 3),
        trained_pitch_mm_per_px=(0.25, 0.3),
    )
    return folder


def test_tile_starts_cover_the_image_with_the_overlap():
    assert tile_starts(32, 32, 8) == [0]
    assert tile_starts(20, 32, 8) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:], strict=False))


def test_model_yaml_records_the_defect_score_and_the_tiles(tiled_folder):
    card = read_model_card(tiled_folder)
    assert card.input.resize_policy == "tile" and card.input.tile_overlap_px == 8
    assert card.inspection == ScoreDefinition((5, 6, 7, 8), 3)
    assert card.trained_pitch_mm_per_px == (0.25, 0.3)
    assert card.reject_class_names == ("c5", "c6", "c7", "c8")


def test_a_tile_sized_image_gives_the_plain_forward_pass(tiled_folder):
    predictor = Predictor.from_folder(tiled_folder)
    image = np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        raw = predictor.model(predictor._normalise(image)).final
    out = predictor.predict(image)
    assert np.array_equal(out["semseg"], raw["semseg"].argmax(1).numpy())
    assert np.allclose(out["height"], raw["height"][:, 0].numpy(), atol=1e-6)


def test_the_channels_last_predictor_matches_the_plain_network(tiled_folder):
    """The Predictor runs the network channels-last (faster on CPU); the values are the plain
    NCHW network's up to float rounding, tiles and blending included."""
    predictor = Predictor.from_folder(tiled_folder)
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain_model, card = load_model_folder(tiled_folder)
    plain = Predictor(plain_model, card)
    plain.model = plain_model.to(memory_format=torch.contiguous_format)
    plain.forward = lambda x: plain.model(x.contiguous())  # NCHW throughout
    images = np.random.default_rng(4).integers(0, 255, (2, 70, 58, 3), dtype=np.uint8)
    fast, reference = predictor.inspect(images), plain.inspect(images)
    assert np.allclose(fast.defect_score, reference.defect_score, atol=1e-5)
    assert np.allclose(fast.outputs["height"], reference.outputs["height"], atol=1e-4)
    assert (fast.outputs["semseg"] == reference.outputs["semseg"]).mean() > 0.999


def test_large_and_small_images_come_back_at_their_own_size(tiled_folder):
    predictor = Predictor.from_folder(tiled_folder)
    rng = np.random.default_rng(1)
    for shape in ((2, 75, 90, 3), (1, 20, 24, 3)):
        images = rng.integers(0, 255, shape, dtype=np.uint8)
        result = predictor.inspect(images)
        assert result.outputs["semseg"].shape == shape[:3]
        assert result.outputs["normals"].shape == shape
        assert result.defect_map.shape == shape[:3]
        assert np.all((result.defect_map >= 0) & (result.defect_map <= 1))
        # the score is the documented reduction of the map
        expected = image_scores(torch.from_numpy(result.defect_map), 3).numpy()
        assert np.allclose(result.defect_score, expected, atol=1e-6)
        # normals stay unit vectors after blending
        lengths = np.linalg.norm(result.outputs["normals"], axis=-1)
        assert np.allclose(lengths, 1.0, atol=1e-4)


def test_tiles_of_an_image_are_independent_of_its_batch(tiled_folder):
    predictor = Predictor.from_folder(tiled_folder)
    images = np.random.default_rng(2).integers(0, 255, (3, 70, 70, 3), dtype=np.uint8)
    together = predictor.inspect(images)
    alone = predictor.inspect(images[1:2])
    assert np.allclose(together.defect_map[1], alone.defect_map[0], atol=1e-5)


def test_network_inputs_of_a_tiling_model_are_tiles_at_the_images_pitch(tiled_folder):
    """What int8 calibration feeds the network: the image's own tiles (not the image shrunk
    to the input size), at most TILE_BATCH of them spread over it."""
    predictor = Predictor.from_folder(tiled_folder)
    image = np.random.default_rng(3).integers(0, 255, (70, 58, 3), dtype=np.uint8)
    tiles = predictor.network_inputs(image)
    normalised = predictor._normalise(image[None])
    starts_y, starts_x = tile_starts(70, 32, 8), tile_starts(58, 32, 8)
    assert tiles.shape == (len(starts_y) * len(starts_x), 3, 32, 32)
    assert tiles.is_contiguous()  # NCHW, as ONNX Runtime takes it
    assert torch.equal(tiles[0], normalised[0, :, :32, :32])
    assert torch.equal(tiles[-1], normalised[0, :, 70 - 32 :, 58 - 32 :])
    large = np.random.default_rng(5).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    spread = predictor.network_inputs(large)
    assert spread.shape == (TILE_BATCH, 3, 32, 32)
    assert torch.equal(spread[-1], predictor._normalise(large[None])[0, :, -32:, -32:])
    reader = PredictorCalibrationReader(predictor, iter([image]))
    feed = reader.get_next()
    assert np.array_equal(feed[INPUT_NAME], tiles.numpy()) and reader.get_next() is None


def _tensor_sample(label: np.ndarray) -> dict:
    height, width = label.shape
    raw = {
        "sample_id": "s",
        "line_id": "press-a",
        "image": np.zeros((height, width, 3), np.uint8),
        "semseg": label,
        "height": np.zeros((height, width), np.float32),
        "normals": np.dstack([np.zeros((height, width, 2)), np.ones((height, width))]).astype(
            np.float32
        ),
        "present": {t: True for t in TASKS},
        "pitch_mm_per_px": 0.25,
    }
    return T.to_tensors(raw, TASKS)


def test_random_tile_oversamples_defects_at_the_images_pitch():
    label = np.ones((96, 96), np.int64)
    label[80, 10] = 6  # one defect pixel in a corner
    sample = _tensor_sample(label)
    always = T.RandomTile((32, 32), "semseg", (5, 6, 7, 8), defect_fraction=1.0)
    never = T.RandomTile((32, 32), "semseg", (5, 6, 7, 8), defect_fraction=0.0)
    hits_always = hits_never = 0
    for seed in range(40):
        tile = always(sample, torch.Generator().manual_seed(seed))
        assert tile["image"].shape == (3, 32, 32) and tile["semseg"].shape == (32, 32)
        assert tile["pitch_mm_per_px"] == 0.25
        hits_always += bool((tile["semseg"] == 6).any())
        hits_never += bool(
            (never(sample, torch.Generator().manual_seed(seed))["semseg"] == 6).any()
        )
    assert hits_always == 40
    assert hits_never < 10


def test_defect_tiles_take_their_share_of_the_epoch_whatever_share_of_images_is_defective():
    """defect_fraction is a share of the tiles: with 1 defective image in 4, deciding per image
    would cut defect tiles 0.5 x 1/4 of the time; the plan cuts them half the time."""

    def raw(index: int) -> dict:
        label = np.ones((96, 96), np.int64)
        if index == 2:
            label[80, 10] = 6
        return {
            "sample_id": f"s{index}",
            "image": np.zeros((96, 96, 3), np.uint8),
            "semseg": label,
            "present": {"semseg": True},
        }

    base = [raw(i) for i in range(4)]
    plan = DefectBalancedTiles(base, times=5, defective=[2], defect_fraction=0.5)
    assert len(plan) == 20  # tiles per image x images, as before
    cut = T.Compose([T.ToTensors(("semseg",)), T.RandomTile((32, 32), "semseg", (5, 6, 7, 8), 0.5)])
    tiles = [cut(plan[i], torch.Generator().manual_seed(i)) for i in range(len(plan))]
    assert sum(bool((tile["semseg"] == 6).any()) for tile in tiles) == 10
    assert all(T.TILE_ON_DEFECT not in tile for tile in tiles)  # the wish does not reach a batch
    assert sorted({plan[i]["sample_id"] for i in range(len(plan))}) == ["s0", "s1", "s2", "s3"]


def test_random_tile_pads_small_images_with_invalid_labels():
    tile = T.RandomTile((32, 32), "semseg", (6,), 0.5)(
        _tensor_sample(np.ones((20, 24), np.int64)), torch.Generator().manual_seed(0)
    )
    assert tile["image"].shape == (3, 32, 32)
    assert (tile["semseg"][20:] == -1).all() and torch.isnan(tile["height"][:, 20:]).all()


def test_pasted_anomalies_are_labelled_and_void_the_geometry():
    label = np.ones((64, 64), np.int64)
    label[:, :8] = 0  # conveyor: not in the region
    raw = {
        "sample_id": "s",
        "image": np.full((64, 64, 3), 128, np.uint8),
        "semseg": label,
        "height": np.zeros((64, 64), np.float32),
        "normals": np.dstack([np.zeros((64, 64, 2)), np.ones((64, 64))]).astype(np.float32),
        "present": {t: True for t in TASKS},
    }
    paste = T.PasteAnomalies(AnomalyConfig(probability=1.0), "semseg", 8, region_classes=(1,))
    out = paste(raw, torch.Generator().manual_seed(3))
    assert out["anomalies"] >= 1
    changed = np.any(out["image"] != raw["image"], axis=-1)
    assert changed.any()
    assert (out["semseg"][changed] == 8).all()
    assert np.isnan(out["height"][changed]).all()
    assert (out["normals"][changed] == 0).all()
    assert not changed[:, :8].any()  # never on the conveyor
    assert np.array_equal(raw["semseg"], label)  # the input is untouched
    # unlabelled samples are left alone, and the count survives ToTensors
    unlabelled = dict(raw, present={"semseg": False, "height": True, "normals": True})
    assert paste(unlabelled, torch.Generator().manual_seed(3))["anomalies"] == 0
    assert T.to_tensors(out, TASKS)["anomalies"] == out["anomalies"]


def test_defect_aware_loss_reduces_to_cross_entropy_and_weighs_defects():
    torch.manual_seed(0)
    pred = torch.randn(2, 10, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8))
    target[0, 2:4, 2:4] = 6
    target[1, 0, 0] = -1
    plain = DefectAwareCrossEntropy((5, 6, 7, 8))
    assert torch.allclose(plain(pred, target)[0], masked_cross_entropy(pred, target)[0])
    weighted = DefectAwareCrossEntropy((5, 6, 7, 8), reject_weight=5.0)(pred, target)[0]
    assert weighted > plain(pred, target)[0]
    with_dice = DefectAwareCrossEntropy((6,), focal_gamma=2.0, dice_weight=1.0)
    loss, count = with_dice(pred, target, torch.tensor([True, False]))
    assert count == 64 and torch.isfinite(loss)
    loss.backward()
    assert pred.grad[1].abs().sum() == 0  # the absent sample adds nothing


def _config(**data):
    return {
        "model": {"arch": "hps", "tasks": list(TASKS), "input_size": [32, 32]},
        "data": {"path": "/x", **data},
        "max_steps": 1,
        "output": "/tmp/o",
    }


def test_config_refuses_selecting_or_training_on_test():
    with pytest.raises(ConfigError, match=r"data\.val_split.*'test'"):
        validate_train_config(_config(val_split="test"))
    with pytest.raises(ConfigError, match="train_split"):
        validate_train_config(_config(train_split="test"))
    config = validate_train_config(
        _config(tiling={"tiles_per_image": 4}, anomalies={"probability": 0.3, "class_id": 8})
    )
    assert config.data.tiling.tiles_per_image == 4 and config.data.anomalies.class_id == 8
    with pytest.raises(ConfigError, match=r"data\.anomalies\.kinds"):
        validate_train_config(_config(anomalies={"kinds": ["glitter"]}))
