"""The synthetic generator is physically consistent: every check recomputes independently."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cta_model.data.lines import LineSpec, load_lines_config
from cta_model.data.synthetic import (
    CLASS_IDS,
    CLASS_NAMES,
    DEFECT_CLASSES,
    normals_from_height,
    render_sample,
)
from cta_model.data.synthetic_dataset import presence_for

pytestmark = pytest.mark.unit

SEED = 7
PART_TOP_CLASSES = [CLASS_IDS["part_surface"], CLASS_IDS["boss_top"]]  # bright metal
N_STAT_SAMPLES = 200  # per line, at 32 x 32, for the prevalence and drop-out statistics


@pytest.fixture(scope="module")
def lines() -> list[LineSpec]:
    return list(load_lines_config().lines)


@pytest.fixture(scope="module")
def small_samples(lines: list[LineSpec]) -> dict[str, list]:
    return {
        line.id: [render_sample(line, i, SEED, 32, 32) for i in range(N_STAT_SAMPLES)]
        for line in lines
    }


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def test_class_names() -> None:
    assert CLASS_NAMES[:5] == ("conveyor", "part_surface", "hole", "boss_top", "slot")
    assert DEFECT_CLASSES == ("scratch", "dent", "bump", "crack", "stain")
    assert [CLASS_IDS[name] for name in DEFECT_CLASSES] == [5, 6, 7, 8, 9]


def test_types_shapes_and_ranges(lines: list[LineSpec]) -> None:
    sample = render_sample(lines[1], 3, SEED, 40, 56)  # non-square on purpose
    assert sample.image.dtype == np.uint8 and sample.image.shape == (40, 56, 3)
    assert sample.semseg.dtype == np.int64 and sample.semseg.shape == (40, 56)
    assert sample.height.dtype == np.float32 and sample.height_clean.dtype == np.float32
    assert sample.normals.dtype == np.float32 and sample.normals.shape == (40, 56, 3)
    assert set(np.unique(sample.semseg)) <= set(range(len(CLASS_NAMES)))
    np.testing.assert_allclose(np.linalg.norm(sample.normals, axis=-1), 1.0, atol=1e-5)
    assert (sample.normals[..., 2] > 0).all(), "a height field faces the camera"
    assert np.isnan(sample.height).sum() == sample.dropout_mask.sum() > 0
    valid = ~sample.dropout_mask
    np.testing.assert_array_equal(sample.height[valid], sample.height_clean[valid])
    # Conveyor at 0, the part 5-15 mm above it (plus bosses).
    assert (sample.height_clean[sample.semseg == CLASS_IDS["conveyor"]] == 0).all()
    top = sample.height_clean[sample.semseg == CLASS_IDS["part_surface"]]
    assert 5 <= np.median(top) <= 15
    assert sample.pitch_mm_per_px == pytest.approx(lines[1].field_of_view_mm / 40)


def test_same_seed_same_arrays_any_order(lines: list[LineSpec]) -> None:
    forward = [render_sample(lines[0], i, SEED, 32, 32) for i in range(4)]
    backward = [render_sample(lines[0], i, SEED, 32, 32) for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert a.image.tobytes() == b.image.tobytes()
        assert np.array_equal(a.height, b.height, equal_nan=True)
        assert a.features == b.features
    other = render_sample(lines[0], 0, SEED + 1, 32, 32)
    assert other.image.tobytes() != forward[0].image.tobytes()


def test_normals_match_height_gradient_within_1_degree(lines: list[LineSpec]) -> None:
    for line in lines:
        sample = render_sample(line, 1, SEED, 64, 64)
        h = sample.height_clean.astype(np.float64)
        pitch = sample.pitch_mm_per_px
        # Independent central differences on the interior: x = columns, y = rows.
        dh_dx = (h[1:-1, 2:] - h[1:-1, :-2]) / (2 * pitch)
        dh_dy = (h[2:, 1:-1] - h[:-2, 1:-1]) / (2 * pitch)
        expected = np.stack([-dh_dx, -dh_dy, np.ones_like(dh_dx)], axis=-1)
        error = angle_deg(sample.normals[1:-1, 1:-1].astype(np.float64), expected)
        assert error.max() < 1.0, (line.id, error.max())


def test_normal_convention_on_a_ramp() -> None:
    # Height rising towards image right and towards image down: the surface faces -x and -y.
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64)
    normals = normals_from_height(0.5 * cols + 0.25 * rows, pitch_mm_per_px=0.5)
    expected = np.array([-1.0, -0.5, 1.0]) / math.sqrt(1 + 1 + 0.25)
    np.testing.assert_allclose(normals, np.broadcast_to(expected, normals.shape), atol=1e-6)


def photometric_stereo(sample, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel 3x3 solve with the known lights, colours, albedo and vignetting.

    Diffuse model: I_c = V * A_c * (ambient_c + sum_k C[k, c] max(0, n . l_k)). On pixels lit by
    all three lights the max is inactive, so s = n @ L^T and I / (V A) - ambient = s @ C.
    """
    radiance = image.astype(np.float64) / 255.0
    shading = radiance / (sample.vignette[..., None] * sample.albedo) - sample.lighting.ambient_rgb
    per_light = shading @ np.linalg.inv(sample.light_colors)  # s_k = n . l_k
    normals = per_light @ np.linalg.inv(sample.light_directions.T)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True), per_light


def expected_lights(line: LineSpec) -> np.ndarray:
    spec = line.synthetic
    elevation = math.radians(spec.light_elevation_deg)
    return np.array(
        [
            [
                math.cos(elevation) * math.cos(math.radians(a)),
                math.cos(elevation) * math.sin(math.radians(a)),
                math.sin(elevation),
            ]
            for a in spec.light_azimuths_deg
        ]
    )


def usable_pixels(sample, per_light: np.ndarray, image: np.ndarray) -> np.ndarray:
    lit_by_all = (sample.normals @ sample.light_directions.T > 0.1).all(-1)
    return lit_by_all & (per_light > 0.05).all(-1) & (image < 255).all(-1) & (image > 12).all(-1)


def test_photometric_stereo_recovers_normals_from_rgb(lines: list[LineSpec]) -> None:
    for line in lines:
        spec = line.synthetic
        sample = render_sample(line, 2, SEED, 64, 64, noise_std=0.0, specular=0.0)
        np.testing.assert_allclose(sample.light_directions, expected_lights(line), atol=1e-12)
        # Documented exposure: a flat white surface reaches 0.8 in its brightest channel.
        raw = np.asarray(spec.light_colors)
        flat = spec.ambient + raw.sum(0) * math.sin(math.radians(spec.light_elevation_deg))
        np.testing.assert_allclose(sample.light_colors, raw * 0.8 / flat.max(), rtol=1e-12)

        recovered, per_light = photometric_stereo(sample, sample.image)
        usable = usable_pixels(sample, per_light, sample.image)
        assert usable.mean() > 0.8, (line.id, usable.mean())
        error = angle_deg(recovered, sample.normals.astype(np.float64))
        bright = usable & np.isin(sample.semseg, PART_TOP_CLASSES)
        # Reached (noise 0, highlight 0, only 8-bit quantisation), per line at 64 x 64:
        # all usable pixels median 0.3-0.8 deg, p90 0.8-1.6 deg (the dark conveyor dominates);
        # bright part pixels median 0.25-0.5 deg, p90 0.4-0.8 deg.
        assert np.median(error[usable]) < 1.0, (line.id, np.median(error[usable]))
        assert np.percentile(error[usable], 90) < 2.0, line.id
        assert np.median(error[bright]) < 0.6, (line.id, np.median(error[bright]))
        assert np.percentile(error[bright], 90) < 1.0, line.id
        # Steep pixels too (walls, chamfers, defects): the RGB encodes the true tilt there.
        steep = usable & (sample.normals[..., 2] < math.cos(math.radians(15)))
        assert steep.sum() >= 10, (line.id, steep.sum())
        assert np.median(error[steep]) < 1.0, (line.id, np.median(error[steep]))


def test_photometric_stereo_with_real_noise_and_highlights(lines: list[LineSpec]) -> None:
    for line in lines:
        spec = line.synthetic
        sample = render_sample(line, 2, SEED, 64, 64)
        assert sample.noise_std == spec.noise_std > 0
        # Highlight computed independently (Blinn-Phong, view along +z) to exclude its pixels.
        half = expected_lights(line) + np.array([0.0, 0.0, 1.0])
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        n = sample.normals.astype(np.float64)
        highlight = np.maximum(n @ half.T, 0) ** spec.shininess * (n @ expected_lights(line).T > 0)
        specular = spec.specular * highlight @ sample.light_colors
        np.testing.assert_allclose(specular, sample.specular, atol=1e-6)
        recovered, per_light = photometric_stereo(sample, sample.image)
        usable = usable_pixels(sample, per_light, sample.image) & (specular.max(-1) < 0.01)
        assert usable.mean() > 0.5, (line.id, usable.mean())
        error = angle_deg(recovered, n)
        bright = usable & np.isin(sample.semseg, PART_TOP_CLASSES)
        # Reached with the lines' noise (0.006-0.015 of full scale), 64 x 64: all usable pixels
        # median 3.7-5.8 deg, p90 7-11.5 deg; bright part pixels median 2.3-3.1, p90 4-5.7 deg.
        assert np.median(error[usable]) < 7.0, (line.id, np.median(error[usable]))
        assert np.percentile(error[usable], 90) < 14.0, line.id
        assert np.median(error[bright]) < 4.0, (line.id, np.median(error[bright]))
        assert np.percentile(error[bright], 90) < 7.0, line.id


def binomial_band(p: float, n: int, sigmas: float = 3.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def test_enriched_defect_prevalence_matches_config(small_samples, lines) -> None:
    for line in lines:
        samples = small_samples[line.id]
        observed = np.mean([s.has_defect for s in samples])
        expected = line.synthetic.defect_prevalence
        assert abs(observed - expected) < binomial_band(expected, len(samples)), (line.id, observed)
        # has_defect is exactly "some pixel carries a defect label" (visible at 32 px, too).
        for s in samples:
            labelled = np.isin(s.semseg, [CLASS_IDS[d] for d in DEFECT_CLASSES]).any()
            assert s.has_defect == labelled == bool(s.defects)


def test_defect_mix_follows_weights(small_samples, lines) -> None:
    for line in lines:
        names = [name for s in small_samples[line.id] for name in s.defects]
        weights = np.array([line.synthetic.defect_mix.get(d, 0.0) for d in DEFECT_CLASSES])
        expected = weights / weights.sum()
        observed = np.array([names.count(d) for d in DEFECT_CLASSES]) / len(names)
        for p, q in zip(expected, observed, strict=True):
            assert abs(p - q) < binomial_band(p, len(names), 4.0), (line.id, expected, observed)


def test_dropout_fraction_matches_config(small_samples, lines) -> None:
    for line in lines:
        rate = line.synthetic.dropout_rate
        fractions = np.array([s.dropout_mask.mean() for s in small_samples[line.id]])
        assert abs(fractions.mean() - rate) < binomial_band(rate, 200 * 32 * 32), (line.id, rate)
        # Drop-out favours steep walls: dropped pixels are far steeper than the average pixel.
        sample = render_sample(line, 0, SEED, 64, 64)
        tilt = np.degrees(np.arccos(sample.normals[..., 2]))
        assert np.median(tilt[sample.dropout_mask]) > 5 * max(np.median(tilt), 1.0)


def test_segmentation_label_fraction_matches_config(lines) -> None:
    for line in lines:
        fraction = line.synthetic.segmentation_label_fraction
        present = [presence_for(line, SEED, i) for i in range(N_STAT_SAMPLES)]
        observed = np.mean([p["semseg"] for p in present])
        assert abs(observed - fraction) < binomial_band(fraction, N_STAT_SAMPLES)
        assert all(p["height"] == p["normals"] == line.has_height_sensor for p in present)


def test_defects_change_height_as_their_class_says(lines: list[LineSpec]) -> None:
    """Render each sample with and without defects (the scene stream is separate): the
    difference is where, and in the direction, the defect labels say."""
    line = lines[0]
    clean_line = line.model_copy(
        update={"synthetic": line.synthetic.model_copy(update={"defect_prevalence": 0.0})}
    )
    direction = {"scratch": -1, "dent": -1, "crack": -1, "bump": 1}
    seen = set()
    for index in range(60):
        damaged = render_sample(line, index, SEED, 64, 64)
        if len(damaged.defects) != 1:
            continue
        (name,) = damaged.defects
        clean = render_sample(clean_line, index, SEED, 64, 64)
        labelled = damaged.semseg == CLASS_IDS[name]
        delta = damaged.height_clean.astype(np.float64) - clean.height_clean
        assert not (delta[~np.isin(damaged.semseg, [1, 3]) & ~labelled] != 0).any()
        if name == "stain":
            assert (delta == 0).all(), "stains change albedo only"
            assert (damaged.albedo[labelled] < clean.albedo[labelled]).all()
        else:
            assert (np.sign(delta[labelled]) == direction[name]).mean() > 0.95, name
            # Everything the defect changed noticeably is labelled.
            big = np.abs(delta) > 0.2 * np.abs(delta).max()
            assert labelled[big].mean() > 0.9, name
            np.testing.assert_array_equal(damaged.albedo, clean.albedo)
        seen.add(name)
    assert seen == set(DEFECT_CLASSES)


def test_features_report_the_generated_geometry(lines: list[LineSpec]) -> None:
    checked = {"boss_height": 0, "hole_depth": 0, "hole_diameter": 0}
    for line in lines:
        sample = render_sample(line, 4, SEED, 128, 128)
        h, classes, pitch = sample.height_clean, sample.semseg, sample.pitch_mm_per_px
        part_top = np.median(h[classes == CLASS_IDS["part_surface"]])
        ids = [f.feature_id for f in sample.features]
        assert len(ids) == len(set(ids)) and len(ids) >= 4
        for feature in sample.features:
            x0, y0, x1, y1 = feature.box
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert feature.tolerance_mm > 0
            assert abs(feature.actual_mm - feature.nominal_mm) < 3 * feature.tolerance_mm
            region = classes[y0:y1, x0:x1]
            heights = h[y0:y1, x0:x1]
            if feature.type == "boss_height":
                boss = np.median(heights[region == CLASS_IDS["boss_top"]])
                assert boss - part_top == pytest.approx(feature.actual_mm, abs=0.05)
            elif feature.type == "hole_depth":
                floor = np.median(heights[region == CLASS_IDS["hole"]])
                assert part_top - floor == pytest.approx(feature.actual_mm, abs=0.05)
            elif feature.type == "hole_diameter" and feature.actual_mm > 6 * pitch:
                # The bore of the hole alone (no other hole shares its box).
                area = (region == CLASS_IDS["hole"]).sum() * pitch**2
                diameter = 2 * math.sqrt(area / math.pi)
                assert diameter == pytest.approx(feature.actual_mm, abs=1.5 * pitch)
            else:
                continue
            checked[feature.type] += 1
    assert all(count > 0 for count in checked.values()), checked


def test_line_without_synthetic_block_is_refused(lines: list[LineSpec]) -> None:
    real_only = lines[0].model_copy(update={"synthetic": None})
    with pytest.raises(ValueError, match="no 'synthetic' block"):
        render_sample(real_only, 0, SEED, 32, 32)
