"""Synthetic anomaly augmentation: seeded, confined to its mask and region, visible."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cta_model.config import validate_config
from cta_model.data.anomalies import (
    ANOMALY_KINDS,
    AnomalyConfig,
    fractal_noise,
    invalidate_geometry,
    label_semseg,
    paste_anomalies,
    perlin_noise,
)
from cta_model.data.lines import load_lines_config
from cta_model.data.synthetic import CLASS_IDS, render_sample
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit

SIZE = 96
SEEDS = range(40)
SURFACE_CLASSES = [CLASS_IDS["part_surface"], CLASS_IDS["boss_top"]]
ALWAYS = {"probability": 1.0, "size_px": (6.0, 24.0)}


@pytest.fixture(scope="module")
def scenes() -> list:
    lines = list(load_lines_config().lines)
    return [render_sample(lines[i % len(lines)], i, 5, SIZE, SIZE) for i in range(4)]


def surface(scene) -> np.ndarray:
    return np.isin(scene.semseg, SURFACE_CLASSES)


def one_kind(kind: str) -> AnomalyConfig:
    return AnomalyConfig(kinds=(kind,), max_per_image=1, **ALWAYS)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=-1)


def test_same_seed_same_bytes_other_seed_differs(scenes) -> None:
    scene, texture = scenes[0], scenes[1].image
    config = AnomalyConfig(max_per_image=3, **ALWAYS)
    results = [
        paste_anomalies(
            scene.image,
            np.random.default_rng(seed),
            config,
            region=surface(scene),
            texture_source=texture,
        )
        for seed in (11, 11, 12)
    ]
    first, again, other = results
    assert first.image.tobytes() == again.image.tobytes()
    assert first.mask.tobytes() == again.mask.tobytes()
    assert first.kinds == again.kinds
    assert first.image.tobytes() != other.image.tobytes()


@pytest.mark.parametrize("kind", list(ANOMALY_KINDS))
@pytest.mark.parametrize("with_texture", [False, True])
def test_changes_only_inside_mask_and_region(scenes, kind: str, with_texture: bool) -> None:
    config = one_kind(kind)
    for seed in SEEDS:
        scene = scenes[seed % len(scenes)]
        region = surface(scene)
        image_before = scene.image.copy()
        texture = scenes[(seed + 1) % len(scenes)].image if with_texture else None
        result = paste_anomalies(
            scene.image, np.random.default_rng(seed), config, region=region, texture_source=texture
        )
        assert result.kinds == [kind]
        assert result.image.dtype == np.uint8 and result.image.shape == scene.image.shape
        assert result.mask.dtype == np.bool_ and result.mask.shape == region.shape
        assert result.mask.any(), "a pasted anomaly always marks pixels"
        assert not (result.mask & ~region).any(), "the mask stays inside the region"
        outside = ~result.mask
        assert result.image[outside].tobytes() == scene.image[outside].tobytes()
        assert np.array_equal(scene.image, image_before), "the input is not modified"


@pytest.mark.parametrize("kind", list(ANOMALY_KINDS))
def test_each_kind_changes_its_mask_visibly(scenes, kind: str) -> None:
    config = one_kind(kind)
    for seed in SEEDS:
        scene = scenes[seed % len(scenes)]
        result = paste_anomalies(scene.image, np.random.default_rng(seed), config)
        difference = np.abs(result.image.astype(int) - scene.image.astype(int)).max(axis=-1)
        assert difference[result.mask].mean() > 8, f"seed {seed}: a barely visible {kind}"


def test_several_anomalies_without_region_cover_the_whole_image(scenes) -> None:
    config = AnomalyConfig(max_per_image=4, **ALWAYS)
    counts = set()
    for seed in SEEDS:
        scene = scenes[seed % len(scenes)]
        result = paste_anomalies(scene.image, np.random.default_rng(seed), config)
        assert 1 <= len(result.kinds) <= 4 and set(result.kinds) <= set(config.kinds)
        assert result.mask.any()
        assert not (changed_pixels(scene.image, result.image) & ~result.mask).any()
        counts.add(len(result.kinds))
    assert counts == {1, 2, 3, 4}


def test_empty_region_pastes_nothing(scenes) -> None:
    scene = scenes[0]
    result = paste_anomalies(
        scene.image,
        np.random.default_rng(0),
        AnomalyConfig(**ALWAYS),
        region=np.zeros(scene.image.shape[:2], dtype=bool),
    )
    assert result.image.tobytes() == scene.image.tobytes()
    assert not result.mask.any() and result.kinds == []


def test_probability_zero_never_pastes(scenes) -> None:
    config = AnomalyConfig(probability=0.0)
    for seed in SEEDS:
        result = paste_anomalies(scenes[0].image, np.random.default_rng(seed), config)
        assert result.kinds == [] and not result.mask.any()
        assert result.image.tobytes() == scenes[0].image.tobytes()


def test_probability_is_the_pasted_fraction(scenes) -> None:
    config = AnomalyConfig(probability=0.3)
    pasted = [
        bool(paste_anomalies(scenes[0].image, np.random.default_rng(seed), config).kinds)
        for seed in range(400)
    ]
    assert 0.22 < np.mean(pasted) < 0.38


@pytest.mark.parametrize("kind", list(ANOMALY_KINDS))
def test_tiny_images_regions_and_textures(kind: str) -> None:
    """Patches clipped at the borders, one-pixel regions and textures smaller than a patch."""
    rng = np.random.default_rng(3)
    image = rng.integers(40, 220, size=(9, 7, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
    config = one_kind(kind)
    for row, col in [(0, 0), (8, 6), (4, 3)]:
        region = np.zeros((9, 7), dtype=bool)
        region[row, col] = True
        result = paste_anomalies(
            image, np.random.default_rng(row), config, region=region, texture_source=texture
        )
        assert np.array_equal(result.mask, region), "the centre pixel is always covered"
        assert result.image[~region].tobytes() == image[~region].tobytes()


def test_bad_inputs_are_named() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    config = AnomalyConfig()
    with pytest.raises(ValueError, match="image: float64"):
        paste_anomalies(image.astype(float), rng, config)
    with pytest.raises(ValueError, match="region: int64"):
        paste_anomalies(image, rng, config, region=np.ones((8, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="texture_source"):
        paste_anomalies(image, rng, config, texture_source=np.zeros((4, 4), dtype=np.uint8))


def test_perlin_noise_is_seeded_smooth_and_bounded() -> None:
    noise = perlin_noise((64, 48), (4, 3), np.random.default_rng(0))
    again = perlin_noise((64, 48), (4, 3), np.random.default_rng(0))
    assert noise.shape == (64, 48) and noise.dtype == np.float32
    assert np.array_equal(noise, again)
    assert np.abs(noise).max() <= 1.0 + 1e-5 and noise.std() > 0.1
    # Neighbours differ far less than the range: a gradient noise, not white noise.
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3
    fractal = fractal_noise((64, 48), (2, 2), 3, np.random.default_rng(0))
    assert np.abs(fractal).max() <= 1.0 + 1e-5


def test_invalidate_geometry_under_the_mask_only() -> None:
    rng = np.random.default_rng(0)
    height = rng.normal(size=(5, 6)).astype(np.float32)
    normals = rng.normal(size=(5, 6, 3)).astype(np.float32)
    mask = np.zeros((5, 6), dtype=bool)
    mask[1:3, 2:5] = True
    new_height, new_normals = invalidate_geometry(height, normals, mask)
    assert np.isnan(new_height[mask]).all()
    assert np.array_equal(new_height[~mask], height[~mask])
    assert (new_normals[mask] == 0).all()
    assert np.array_equal(new_normals[~mask], normals[~mask])
    assert not np.isnan(height).any() and (normals[mask] != 0).all(), "inputs are copied"
    assert invalidate_geometry(None, None, mask) == (None, None)
    with pytest.raises(ValueError, match="height: int64"):
        invalidate_geometry(np.zeros((5, 6), dtype=np.int64), None, mask)
    with pytest.raises(ValueError, match="normals"):
        invalidate_geometry(None, normals[..., :2], mask)


def test_label_semseg_under_the_mask_only() -> None:
    semseg = np.ones((4, 4), dtype=np.int64)
    semseg[0, 0] = -1  # an unlabelled pixel under a pasted defect becomes the defect
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    labelled = label_semseg(semseg, mask, CLASS_IDS["scratch"])
    assert (labelled[mask] == CLASS_IDS["scratch"]).all()
    assert np.array_equal(labelled[~mask], semseg[~mask])
    assert semseg[0, 0] == -1, "the input is copied"
    with pytest.raises(ValueError, match="does not fit"):
        label_semseg(semseg.astype(np.uint8), mask, 300)
    with pytest.raises(ValueError, match="same shape"):
        label_semseg(semseg, mask[:2], 5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"probability": 1.5}, r"anomalies: probability: Input should be less than or equal"),
        ({"kinds": ["rust"]}, r"anomalies: kinds: unknown kind\(s\) 'rust'; known kinds: perlin"),
        ({"kinds": []}, r"anomalies: kinds: must name at least one kind"),
        ({"kinds": ["stain", "stain"]}, r"anomalies: kinds: lists a kind twice"),
        ({"max_per_image": 0}, r"anomalies: max_per_image: Input should be greater"),
        ({"size_px": [40, 8]}, r"anomalies: size_px: must be \[low, high\]"),
        ({"opacity": [0.5, 1.5]}, r"anomalies: opacity: is a fraction"),
        ({"scratch_width_px": [0, 2]}, r"anomalies: scratch_width_px: must be \[low, high\]"),
        ({"opacity": [0.1, 0.9]}, r"anomalies: opacity low 0.1 must exceed mask_threshold 0.2"),
        ({"mask_threshold": 1}, r"anomalies: mask_threshold: Input should be less than 1"),
        ({"colour": "red"}, r"anomalies: colour: unknown key"),
    ],
)
def test_config_errors_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(AnomalyConfig, settings, "anomalies")


def test_config_from_yaml_lists() -> None:
    config = validate_config(
        AnomalyConfig, {"kinds": ["scratch"], "size_px": [4, 12], "opacity": [0.5, 0.8]}, "x"
    )
    assert config.kinds == ("scratch",) and config.size_px == (4.0, 12.0)


def test_example_grid_png(scenes, tmp_path) -> None:
    """Pasted examples per kind (row) as a PNG, for a person to look at (pytest --basetemp)."""
    rows = []
    for kind in ANOMALY_KINDS:
        tiles = []
        for index, scene in enumerate(scenes):
            result = paste_anomalies(
                scene.image,
                np.random.default_rng(index),
                one_kind(kind),
                region=surface(scene),
                texture_source=scenes[index - 1].image if index % 2 else None,
            )
            outlined = result.image.copy()
            outlined[result.mask & ~np.roll(result.mask, 1, axis=1)] = (255, 0, 255)
            tiles += [result.image, outlined]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    path = tmp_path / "anomalies.png"
    Image.fromarray(grid).save(path)
    decoded = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
    assert decoded.shape == (SIZE * len(ANOMALY_KINDS), SIZE * 2 * len(scenes), 3)
