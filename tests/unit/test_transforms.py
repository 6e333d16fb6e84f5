"""Joint transforms: every task label follows the image by the registry's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cta_model.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    ToTensors,
    collate,
    hflip,
    sample_generator,
    to_tensors,
)
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

TASK_NAMES = ("semseg", "height", "depth", "normals")
H, W = 16, 24
# A rectangle where the image is bright and every label has its "inside" value.
ROWS, COLS = slice(4, 11), slice(7, 19)
INSIDE = {"semseg": 2, "height": 5.0, "depth": 3.0}
OUTSIDE = {"semseg": 0, "height": -1.0, "depth": 6.0}


def random_numpy_sample(seed: int = 0, sample_id: str = "s-0") -> dict:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(H, W, 3)).astype(np.float32)
    normals[..., 2] = np.abs(normals[..., 2]) + 0.5
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[0, 0] = 0.0  # one invalid normal
    height = rng.normal(size=(H, W)).astype(np.float32)
    height[1, 2] = np.nan
    depth = rng.uniform(1, 4, size=(H, W)).astype(np.float32)
    depth[2, 3] = 0.0
    semseg = rng.integers(-1, 4, size=(H, W)).astype(np.int64)
    return {
        "sample_id": sample_id,
        "line_id": "line-a",
        "image": rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8),
        "semseg": semseg,
        "height": height,
        "depth": depth,
        "normals": normals,
        "present": {task: True for task in TASK_NAMES},
        "pitch_mm_per_px": 0.12,
    }


def band_numpy_sample(orientation: str) -> dict:
    """Image edges and every label boundary coincide: a band of rows ROWS or columns COLS.

    Bands, not a box: at a box corner bilinear mixing of two edges can fall below 0.5 where
    each edge on its own is inside, which says nothing about alignment.
    """
    band = (ROWS, slice(None)) if orientation == "rows" else (slice(None), COLS)
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[band] = 255
    labels = {
        task: np.full((H, W), OUTSIDE[task], dtype=np.int64 if task == "semseg" else np.float32)
        for task in INSIDE
    }
    for task, value in INSIDE.items():
        labels[task][band] = value
    normals = np.zeros((H, W, 3), dtype=np.float32)
    normals[..., 2] = 1.0
    normals[band] = np.array([0.6, 0.0, 0.8], dtype=np.float32)
    return {
        "sample_id": f"band-{orientation}",
        "line_id": "line-a",
        "image": image,
        **labels,
        "normals": normals,
        "present": {task: True for task in TASK_NAMES},
        "pitch_mm_per_px": 0.1,
    }


def tensor_sample(seed: int = 0) -> dict:
    return to_tensors(random_numpy_sample(seed), TASK_NAMES)


def assert_same(a: dict, b: dict) -> None:
    for key in ("image", *TASK_NAMES):
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0)


# --- to_tensors / collate ---


def test_to_tensors_layout_dtypes_and_values() -> None:
    numpy_sample = random_numpy_sample()
    sample = to_tensors(numpy_sample, TASK_NAMES)
    assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    torch.testing.assert_close(
        sample["image"][:, 3, 4], torch.tensor(numpy_sample["image"][3, 4] / 255.0).float()
    )
    assert sample["semseg"].shape == (H, W) and sample["semseg"].dtype == torch.int64
    for task, channels in (("height", 1), ("depth", 1), ("normals", 3)):
        assert sample[task].shape == (channels, H, W) and sample[task].dtype == torch.float32
    torch.testing.assert_close(
        sample["normals"][:, 5, 6], torch.from_numpy(numpy_sample["normals"][5, 6])
    )
    assert all(flag.dtype == torch.bool and bool(flag) for flag in sample["present"].values())
    assert sample["pitch_mm_per_px"] == pytest.approx(0.12)


def test_to_tensors_fills_a_missing_task_as_absent() -> None:
    numpy_sample = random_numpy_sample()
    del numpy_sample["depth"]
    sample = to_tensors(numpy_sample, ("semseg", "depth"))
    assert not sample["present"]["depth"]
    assert torch.equal(sample["depth"], torch.zeros(1, H, W))
    assert "height" not in sample and set(sample["present"]) == {"semseg", "depth"}


def test_to_tensors_rejects_a_label_of_the_wrong_shape() -> None:
    numpy_sample = random_numpy_sample()
    numpy_sample["height"] = numpy_sample["height"][:, :-1]
    with pytest.raises(DataError, match=r"s-0: height: shape"):
        to_tensors(numpy_sample, TASK_NAMES)


def test_collate_stacks_tensors_and_lists_ids() -> None:
    samples = [to_tensors(random_numpy_sample(i, f"s-{i}"), TASK_NAMES) for i in range(3)]
    samples[1]["present"]["depth"] = torch.tensor(False)
    batch = collate(samples)
    assert batch["sample_id"] == ["s-0", "s-1", "s-2"]
    assert batch["image"].shape == (3, 3, H, W)
    assert batch["semseg"].shape == (3, H, W) and batch["normals"].shape == (3, 3, H, W)
    assert batch["present"]["depth"].tolist() == [True, False, True]
    assert batch["pitch_mm_per_px"].dtype == torch.float64 and batch["pitch_mm_per_px"].shape == (
        3,
    )


def test_collate_names_samples_with_different_shapes() -> None:
    samples = [tensor_sample(0), Resize((8, 12))(tensor_sample(1))]
    with pytest.raises(DataError, match=r"collate: image: shapes differ"):
        collate(samples)


# --- flip ---


def test_flip_mirrors_positions_and_negates_normal_x() -> None:
    sample = tensor_sample()
    flipped = hflip(sample)
    for row, col in ((0, 0), (3, 7), (15, 23)):
        mirrored = W - 1 - col
        n = sample["normals"][:, row, mirrored]
        torch.testing.assert_close(
            flipped["normals"][:, row, col], torch.stack([-n[0], n[1], n[2]])
        )
        torch.testing.assert_close(flipped["image"][:, row, col], sample["image"][:, row, mirrored])
        assert flipped["semseg"][row, col] == sample["semseg"][row, mirrored]
        torch.testing.assert_close(
            flipped["height"][:, row, col], sample["height"][:, row, mirrored], equal_nan=True
        )
        assert flipped["depth"][0, row, col] == sample["depth"][0, row, mirrored]
    assert flipped["pitch_mm_per_px"] == sample["pitch_mm_per_px"]


def test_flip_twice_is_the_identity() -> None:
    sample = tensor_sample()
    assert_same(hflip(hflip(sample)), sample)


def test_random_flip_probability_and_determinism() -> None:
    sample = tensor_sample()
    assert_same(RandomHorizontalFlip(0.0)(sample, torch.Generator().manual_seed(1)), sample)
    assert_same(RandomHorizontalFlip(1.0)(sample, torch.Generator().manual_seed(1)), hflip(sample))
    outcomes = [
        torch.equal(
            RandomHorizontalFlip(0.5)(sample, sample_generator(7, 0, i))["image"], sample["image"]
        )
        for i in range(40)
    ]
    assert 5 < sum(outcomes) < 35  # both outcomes occur
    again = [
        torch.equal(
            RandomHorizontalFlip(0.5)(sample, sample_generator(7, 0, i))["image"], sample["image"]
        )
        for i in range(40)
    ]
    assert outcomes == again


# --- scale-crop ---


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_scale_crop_label_rules(scale: float) -> None:
    sample = tensor_sample()
    out = RandomScaleCrop(scales=(scale,))(sample, torch.Generator().manual_seed(3))
    assert out["image"].shape == (3, H, W)
    # depth divided by s (0 stays invalid)
    original_depth = set(sample["depth"].flatten().tolist())
    for value in out["depth"].flatten().tolist():
        assert value == 0.0 or any(
            math.isclose(value, d / scale, rel_tol=1e-6) for d in original_depth
        )
    assert (out["depth"] != 0).any()
    # height values unchanged (nearest, no arithmetic)
    original_height = {v for v in sample["height"].flatten().tolist() if not math.isnan(v)}
    assert {v for v in out["height"].flatten().tolist() if not math.isnan(v)} <= original_height
    # normals stay unit vectors where valid
    length = out["normals"].norm(dim=0)
    valid = (out["normals"] != 0).any(dim=0)
    torch.testing.assert_close(length[valid], torch.ones_like(length[valid]))
    # semseg ids stay in the original set
    assert set(out["semseg"].unique().tolist()) <= set(sample["semseg"].unique().tolist())
    assert out["pitch_mm_per_px"] == pytest.approx(sample["pitch_mm_per_px"] / scale)


def test_scale_crop_of_disparity_multiplies() -> None:
    sample = tensor_sample()
    out = RandomScaleCrop(scales=(1.5,), depth_is_disparity=True)(
        sample, torch.Generator().manual_seed(3)
    )
    original = set(sample["depth"].flatten().tolist())
    values = [v for v in out["depth"].flatten().tolist() if v != 0]
    assert values and all(
        any(math.isclose(v, d * 1.5, rel_tol=1e-6) for d in original) for v in values
    )


def test_scale_crop_to_a_smaller_size_and_padding() -> None:
    sample = tensor_sample()
    out = RandomScaleCrop(scales=(1.0, 1.5), size=(8, 12))(sample, torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 8, 12) and out["semseg"].shape == (8, 12)
    padded = RandomScaleCrop(scales=(1.0,), size=(20, 24))(sample, torch.Generator().manual_seed(0))
    assert padded["image"].shape == (3, 20, 24)
    assert (padded["semseg"][16:] == -1).all() and torch.isnan(padded["height"][:, 16:]).all()
    assert (padded["depth"][:, 16:] == 0).all() and (padded["normals"][:, 16:] == 0).all()


def test_scale_crop_is_deterministic_given_the_generator() -> None:
    sample = tensor_sample()
    transform = Compose([RandomScaleCrop(), RandomHorizontalFlip()])
    first = transform(sample, sample_generator(1, 2, 3))
    assert_same(first, transform(sample, sample_generator(1, 2, 3)))
    others = [transform(sample, sample_generator(1, 2, i)) for i in range(8)]
    assert any(not torch.equal(o["image"], first["image"]) for o in others)


def assert_aligned(out: dict) -> None:
    """Where the image is clearly inside / outside the box, every label says the same."""
    brightness = out["image"][0]
    inside, outside = brightness > 0.5 + 1e-4, brightness < 0.5 - 1e-4
    assert inside.any() and outside.any()
    # Each label's own "inside the box" test (depth is rescaled and normals may be flipped).
    label_inside = {
        "semseg": out["semseg"] == INSIDE["semseg"],
        "height": out["height"][0] == INSIDE["height"],
        "depth": out["depth"][0] < out["depth"][0].max() * 0.75,
        "normals": out["normals"][0].abs() > 0.5,
    }
    for task, mask in label_inside.items():
        assert mask[inside].all(), f"{task}: a pixel inside the image box is outside in the label"
        assert not mask[outside].any(), f"{task}: a pixel outside the box is inside in the label"


@pytest.mark.parametrize(
    "scale",
    [
        1.0,
        1.5,
        2.0,
        1.2,
    ],
)
def test_scale_crop_keeps_image_and_labels_aligned(scale: float) -> None:
    transform = Compose([RandomScaleCrop(scales=(scale,)), RandomHorizontalFlip()])
    for orientation in ("rows", "columns"):
        sample = to_tensors(band_numpy_sample(orientation), TASK_NAMES)
        for seed in range(6):
            assert_aligned(transform(sample, torch.Generator().manual_seed(seed)))


def test_resize_keeps_alignment_and_scales_pitch() -> None:
    for orientation in ("rows", "columns"):
        sample = to_tensors(band_numpy_sample(orientation), TASK_NAMES)
        out = Resize((H // 2, W // 2))(sample)
        assert_aligned(out)
    assert out["image"].shape == (3, H // 2, W // 2) and out["height"].shape == (1, H // 2, W // 2)
    assert out["pitch_mm_per_px"] == pytest.approx(0.2)
    assert set(out["depth"].unique().tolist()) <= {3.0, 6.0}  # whole view kept: depth unchanged


def test_normalize_touches_only_the_image() -> None:
    sample = tensor_sample()
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(sample)
    torch.testing.assert_close(out["image"], (sample["image"] - 0.5) / 0.25)
    assert out["semseg"] is sample["semseg"] and out["normals"] is sample["normals"]
    with pytest.raises(ConfigError):
        Normalize((0.5,), (0.0,))


def test_compose_with_to_tensors_and_a_dataloader_style_batch() -> None:
    pipeline = Compose(
        [
            ToTensors(TASK_NAMES),
            RandomScaleCrop(size=(8, 8)),
            RandomHorizontalFlip(),
            Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    batch = collate(
        [pipeline(random_numpy_sample(i, f"s-{i}"), sample_generator(0, 0, i)) for i in range(4)]
    )
    assert batch["image"].shape == (4, 3, 8, 8) and batch["depth"].shape == (4, 1, 8, 8)


def test_transforms_refuse_numpy_samples() -> None:
    with pytest.raises(TypeError, match="to_tensors"):
        RandomHorizontalFlip(1.0)(random_numpy_sample())
