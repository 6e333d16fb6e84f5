"""Research-format loaders: tiny fixtures in each exact on-disk layout, values and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cta_model.data.formats import FORMATS, open_format
from cta_model.data.formats.mvtec_3d_ad import normals_from_point_map
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

H, W = 8, 12
ALL_TASKS = {"semseg", "height", "depth", "normals"}


# --- fixture writers ---


def mtan_arrays(index: int, rng: np.random.Generator, num_classes: int) -> dict[str, np.ndarray]:
    image = rng.uniform(0, 1, size=(H, W, 3)).astype(np.float32)
    label = rng.integers(0, num_classes, size=(H, W)).astype(np.float32)
    label[0, :] = -1  # MTAN's ignore value
    depth = rng.uniform(0.5, 9, size=(H, W, 1)).astype(np.float32)  # MTAN: (H, W, 1)
    depth[1, 1] = 0.0
    normal = rng.normal(size=(H, W, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[2, 2] = 0.0
    image[0, 0] = index / 10  # tells samples apart
    return {"image": image, "label": label, "depth": depth, "normal": normal}


def write_mtan(
    root: Path, split: str, indices=(0, 1, 2), folders=("image", "label", "depth", "normal")
) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    written = {}
    for index in indices:
        arrays = mtan_arrays(index, rng, 7)
        arrays["label_7"] = arrays["label"]
        arrays["label_19"] = np.where(arrays["label"] >= 0, arrays["label"] + 10, -1).astype(
            np.int64
        )
        for folder in folders:
            path = root / split / folder / f"{index}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, arrays[folder])
        written[index] = arrays
    return written


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_mvtec_ad(root: Path, grayscale: bool = False) -> Path:
    category = root / "metal_nut"
    rng = np.random.default_rng(1)

    def image() -> np.ndarray:
        shape = (H, W) if grayscale else (H, W, 3)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    for n in range(2):
        save_png(category / "train" / "good" / f"{n:03d}.png", image())
    save_png(category / "test" / "good" / "000.png", image())
    for defect, rows in (("scratch", slice(1, 3)), ("bent", slice(4, 6)), ("color", slice(6, 8))):
        save_png(category / "test" / defect / "000.png", image())
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[rows, 2:5] = 255
        save_png(category / "ground_truth" / defect / "000_mask.png", mask)
    return category


def plane_point_map(
    slope_x: float = 0.0,
    slope_y: float = 0.0,
    z0: float = 500.0,
    pitch: float = 0.25,
    x_sign: float = 1.0,
) -> np.ndarray:
    """Points of the plane z = z0 + slope_x * x + slope_y * y, orthographic grid, mm."""
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float64)
    x = x_sign * (cols - W / 2) * pitch
    y = (rows - H / 2) * pitch
    z = z0 + slope_x * x + slope_y * y
    return np.stack([x, y, z], axis=-1).astype(np.float32)


def write_mvtec_3d(root: Path) -> Path:
    """cable_gland: train/good 3 parts (z0 = 500, 502, 504), validation/good 1, test good+crack."""
    category = root / "cable_gland"
    rng = np.random.default_rng(2)

    def part(split: str, kind: str, stem: str, xyz: np.ndarray, gt: np.ndarray | None) -> None:
        folder = category / split / kind
        save_png(folder / "rgb" / f"{stem}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        (folder / "xyz").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz, photometric="rgb")
        if gt is not None:
            save_png(folder / "gt" / f"{stem}.png", gt)

    for n, z0 in enumerate((500.0, 502.0, 504.0)):
        xyz = plane_point_map(z0=z0)
        xyz[0, 0] = 0.0  # an invalid point (ignored by the datum)
        part("train", "good", f"{n:03d}", xyz, None)
    part("validation", "good", "000", plane_point_map(z0=501.0), None)
    part("test", "good", "000", plane_point_map(z0=503.0), np.zeros((H, W), dtype=np.uint8))
    crack = plane_point_map(slope_x=math.tan(math.radians(30)), z0=505.0)
    crack[3, 4] = 0.0
    gt = np.zeros((H, W), dtype=np.uint8)
    gt[2:4, 6:9] = 255
    part("test", "crack", "000", crack, gt)
    return category


# --- registry ---


def test_registry_and_unknown_names(tmp_path: Path) -> None:
    assert set(FORMATS) == {"nyuv2", "cityscapes", "mvtec-ad", "mvtec-3d-ad"}
    with pytest.raises(ConfigError, match="unknown format 'coco'"):
        open_format("coco", tmp_path, "train")
    write_mtan(tmp_path, "train")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        open_format("nyuv2", tmp_path, "test")
    with pytest.raises(ConfigError, match="nyuv2.*unexpected keyword argument 'classes'"):
        open_format("nyuv2", tmp_path, "train", classes=19)


# --- NYUv2 ---


@pytest.mark.parametrize("depth_shape", ["HW1", "HW"])
def test_nyuv2_maps_values(tmp_path: Path, depth_shape: str) -> None:
    written = write_mtan(tmp_path, "val")
    if depth_shape == "HW":
        for index, arrays in written.items():
            np.save(tmp_path / "val" / "depth" / f"{index}.npy", arrays["depth"][..., 0])
    dataset = open_format("nyuv2", tmp_path, "val")
    assert len(dataset) == 3 and dataset.tasks == ("semseg", "depth", "normals")
    assert dataset.num_classes == 13 and dataset.class_names[0] == "bed"
    sample = dataset[1]
    arrays = written[1]
    assert sample["sample_id"] == "val-1" and sample["line_id"] == "nyuv2"
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(sample["image"], np.round(arrays["image"] * 255).astype(np.uint8))
    assert sample["semseg"].dtype == np.int64
    assert (sample["semseg"][0] == -1).all()
    np.testing.assert_array_equal(sample["semseg"], arrays["label"].astype(np.int64))
    assert sample["depth"].dtype == np.float32 and sample["depth"].shape == (H, W)
    assert sample["depth"][1, 1] == 0.0
    np.testing.assert_array_equal(sample["depth"], arrays["depth"][..., 0])
    np.testing.assert_array_equal(sample["normals"], arrays["normal"])
    assert sample["present"] == {"semseg": True, "depth": True, "normals": True, "height": False}
    assert np.isnan(sample["height"]).all() and sample["height"].shape == (H, W)
    assert math.isnan(sample["pitch_mm_per_px"])


def test_nyuv2_orders_by_integer_index(tmp_path: Path) -> None:
    write_mtan(tmp_path, "train", indices=(10, 2, 0))
    dataset = open_format("nyuv2", tmp_path, "train")
    assert dataset.sample_ids == ["train-0", "train-2", "train-10"]
    assert dataset[2]["image"][0, 0, 0] == round(1.0 * 255)  # index 10 -> 10 / 10


def test_nyuv2_missing_file_names_file_and_field(tmp_path: Path) -> None:
    write_mtan(tmp_path, "train")
    missing = tmp_path / "train" / "label" / "1.npy"
    missing.unlink()
    with pytest.raises(DataError, match=rf"{missing}: semseg: file missing"):
        open_format("nyuv2", tmp_path, "train")


def test_nyuv2_missing_folder(tmp_path: Path) -> None:
    write_mtan(tmp_path, "train", folders=("image", "label", "depth"))
    with pytest.raises(DataError, match=r"train/normal: normals: folder missing"):
        open_format("nyuv2", tmp_path, "train")


@pytest.mark.parametrize(
    ("folder", "field", "bad", "message"),
    [
        ("depth", "depth", np.ones((H, W + 1), np.float32), "shape"),
        ("normal", "normals", np.ones((H, W, 3), np.int32), "dtype int32"),
        ("label", "semseg", np.full((H, W), 13.0, np.float32), "class ids"),
        ("label", "semseg", np.full((H, W), 0.5, np.float32), "whole numbers"),
        ("image", "image", np.full((H, W, 3), 200.0, np.float32), r"expected \[0, 1\]"),
    ],
)
def test_nyuv2_bad_arrays(
    tmp_path: Path, folder: str, field: str, bad: np.ndarray, message: str
) -> None:
    write_mtan(tmp_path, "train")
    path = tmp_path / "train" / folder / "0.npy"
    np.save(path, bad)
    dataset = open_format("nyuv2", tmp_path, "train")
    with pytest.raises(DataError, match=rf"{path}: {field}: .*{message}"):
        dataset[0]


def test_nyuv2_corrupt_npy(tmp_path: Path) -> None:
    write_mtan(tmp_path, "train")
    path = tmp_path / "train" / "depth" / "2.npy"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"{path}: depth: truncated or corrupt"):
        open_format("nyuv2", tmp_path, "train")[2]


# --- Cityscapes ---


@pytest.mark.parametrize("classes", [7, 19])
def test_cityscapes_label_sets_and_disparity(tmp_path: Path, classes: int) -> None:
    written = write_mtan(tmp_path, "train", folders=("image", "label_7", "label_19", "depth"))
    dataset = open_format("cityscapes", tmp_path, "train", classes=classes)
    assert dataset.tasks == ("semseg", "depth") and dataset.depth_is_disparity
    assert dataset.num_classes == classes and len(dataset.class_names) == classes
    sample = dataset[0]
    np.testing.assert_array_equal(sample["semseg"], written[0][f"label_{classes}"])
    np.testing.assert_array_equal(sample["depth"], written[0]["depth"][..., 0])
    assert sample["present"] == {"semseg": True, "depth": True, "height": False, "normals": False}
    assert (sample["normals"] == 0).all() and sample["line_id"] == "cityscapes"


def test_cityscapes_bad_option(tmp_path: Path) -> None:
    write_mtan(tmp_path, "train", folders=("image", "label_7", "label_19", "depth"))
    with pytest.raises(ConfigError, match="classes must be 7 or 19"):
        open_format("cityscapes", tmp_path, "train", classes=13)


# --- MVTec AD ---


def test_mvtec_ad_class_ids_from_sorted_defect_folders(tmp_path: Path) -> None:
    write_mvtec_ad(tmp_path)
    dataset = open_format("mvtec-ad", tmp_path, "test", category="metal_nut")
    assert dataset.class_names == ("good", "bent", "color", "scratch")
    assert dataset.sample_ids == [
        "test/bent/000",
        "test/color/000",
        "test/good/000",
        "test/scratch/000",
    ]
    by_id = {sample["sample_id"]: sample for sample in (dataset[i] for i in range(len(dataset)))}
    expected_rows = {"bent": slice(4, 6), "color": slice(6, 8), "scratch": slice(1, 3)}
    for defect, rows in expected_rows.items():
        semseg = by_id[f"test/{defect}/000"]["semseg"]
        expected = np.zeros((H, W), dtype=np.int64)
        expected[rows, 2:5] = dataset.class_names.index(defect)
        np.testing.assert_array_equal(semseg, expected)
    assert (by_id["test/good/000"]["semseg"] == 0).all()
    sample = by_id["test/bent/000"]
    assert sample["line_id"] == "mvtec-ad-metal-nut"
    assert sample["present"] == {"semseg": True, "height": False, "depth": False, "normals": False}


def test_mvtec_ad_binary_and_train_split(tmp_path: Path) -> None:
    write_mvtec_ad(tmp_path)
    dataset = open_format("mvtec-ad", tmp_path, "test", category="metal_nut", binary=True)
    assert dataset.class_names == ("good", "defect") and dataset.num_classes == 2
    values = set()
    for i in range(len(dataset)):
        values |= set(np.unique(dataset[i]["semseg"]).tolist())
    assert values == {0, 1}
    train = open_format("mvtec-ad", tmp_path, "train", category="metal_nut")
    assert len(train) == 2 and train.num_classes == 4  # same classes as test
    assert all((train[i]["semseg"] == 0).all() for i in range(2))


def test_mvtec_ad_grayscale_becomes_rgb(tmp_path: Path) -> None:
    category = write_mvtec_ad(tmp_path, grayscale=True)
    gray = np.asarray(Image.open(category / "train" / "good" / "000.png"))
    image = open_format("mvtec-ad", tmp_path, "train", category="metal_nut")[0]["image"]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_mvtec_ad_errors(tmp_path: Path) -> None:
    category = write_mvtec_ad(tmp_path)
    with pytest.raises(ConfigError, match="category is required.*metal_nut"):
        open_format("mvtec-ad", tmp_path, "test")
    with pytest.raises(DataError, match="screw: category: folder missing"):
        open_format("mvtec-ad", tmp_path, "test", category="screw")
    dataset = open_format("mvtec-ad", tmp_path, "test", category="metal_nut")
    mask = category / "ground_truth" / "bent" / "000_mask.png"
    save_png(mask, np.zeros((H, W + 2), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{mask}: semseg: shape"):
        dataset[0]
    mask.unlink()
    with pytest.raises(DataError, match=rf"{mask}: semseg: file missing"):
        dataset[0]
    image = category / "test" / "color" / "000.png"
    image.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{image}: image: corrupt"):
        dataset[1]


# --- MVTec 3D-AD ---


def test_mvtec_3d_height_is_datum_minus_z(tmp_path: Path) -> None:
    write_mvtec_3d(tmp_path)
    dataset = open_format("mvtec-3d-ad", tmp_path, "test", category="cable_gland")
    assert dataset.tasks == ("semseg", "height", "normals")
    # Pooled median of the valid z of the three training parts (500, 502, 504 + 0 slope).
    assert dataset.datum_mm == pytest.approx(502.0)
    sample = dataset[0]  # test/crack/000
    assert (
        sample["sample_id"] == "test/crack/000" and sample["line_id"] == "mvtec-3d-ad-cable-gland"
    )
    xyz = tifffile.imread(tmp_path / "cable_gland" / "test" / "crack" / "xyz" / "000.tiff")
    valid = xyz[..., 2] != 0
    assert np.isnan(sample["height"][3, 4]) and np.isnan(sample["height"]).sum() == 1
    np.testing.assert_allclose(sample["height"][valid], 502.0 - xyz[..., 2][valid], atol=1e-4)
    assert sample["height"].dtype == np.float32
    # Surface further from the camera on the right -> lower height on the right.
    assert sample["height"][5, 10] < sample["height"][5, 1]
    assert sample["pitch_mm_per_px"] == pytest.approx(0.25)
    expected_mask = np.zeros((H, W), dtype=np.int64)
    expected_mask[2:4, 6:9] = 1
    np.testing.assert_array_equal(sample["semseg"], expected_mask)
    assert sample["present"] == {"semseg": True, "height": True, "normals": True, "depth": False}
    assert (sample["depth"] == 0).all()


def test_mvtec_3d_splits_share_the_datum_and_datum_override(tmp_path: Path) -> None:
    write_mvtec_3d(tmp_path)
    validation = open_format("mvtec-3d-ad", tmp_path, "validation", category="cable_gland")
    train = open_format("mvtec-3d-ad", tmp_path, "train", category="cable_gland")
    assert validation.datum_mm == train.datum_mm == pytest.approx(502.0)
    sample = validation[0]
    assert (sample["semseg"] == 0).all()  # good without gt: all 0
    np.testing.assert_allclose(sample["height"], 1.0, atol=1e-4)  # 502 - 501
    fixed = open_format(
        "mvtec-3d-ad", tmp_path, "validation", category="cable_gland", datum_mm=510.0
    )
    np.testing.assert_allclose(fixed[0]["height"], 9.0, atol=1e-4)
    one_part = open_format(
        "mvtec-3d-ad", tmp_path, "train", category="cable_gland", datum_max_parts=1
    )
    assert one_part.datum_mm == pytest.approx(500.0)  # the first part only


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_mvtec_3d_normals_of_a_plane_tilted_about_y(tmp_path: Path) -> None:
    write_mvtec_3d(tmp_path)
    dataset = open_format("mvtec-3d-ad", tmp_path, "test", category="cable_gland")
    normals = dataset[0]["normals"]  # z = 505 + tan(30 deg) x: recedes to the right
    tilt = math.radians(30)
    # Height falls to the right, so the surface faces right (+x) and the camera (+z).
    analytic = np.array([math.sin(tilt), 0.0, math.cos(tilt)])
    interior = np.zeros((H, W), dtype=bool)
    interior[1:-1, 1:-1] = True
    near_hole = np.zeros((H, W), dtype=bool)
    near_hole[2:5, 3:6] = True
    good = interior & ~near_hole
    assert (angle_deg(normals[good], analytic) < 1.0).all()
    np.testing.assert_allclose(np.linalg.norm(normals[good], axis=-1), 1.0, atol=1e-5)
    # Undefined: border and the 4-neighbourhood of the invalid point (3, 4).
    for row, col in ((0, 5), (7, 5), (4, 0), (4, 11), (3, 4), (2, 4), (4, 4), (3, 3), (3, 5)):
        assert (normals[row, col] == 0).all(), (row, col)


@pytest.mark.parametrize(
    ("slope_x", "slope_y", "x_sign", "expected"),
    [
        (0.0, 0.0, 1.0, (0.0, 0.0, 1.0)),
        (
            math.tan(math.radians(20)),
            0.0,
            1.0,
            (math.sin(math.radians(20)), 0.0, math.cos(math.radians(20))),
        ),
        (
            0.0,
            math.tan(math.radians(20)),
            1.0,
            (0.0, math.sin(math.radians(20)), math.cos(math.radians(20))),
        ),
        # A sensor whose x axis points left: image right is -x, the normal's image x flips.
        (
            math.tan(math.radians(20)),
            0.0,
            -1.0,
            (-math.sin(math.radians(20)), 0.0, math.cos(math.radians(20))),
        ),
    ],
)
def test_normals_from_point_map_sign_conventions(
    slope_x: float, slope_y: float, x_sign: float, expected: tuple[float, float, float]
) -> None:
    normals = normals_from_point_map(plane_point_map(slope_x, slope_y, x_sign=x_sign))
    inner = normals[1:-1, 1:-1]
    assert (angle_deg(inner, np.array(expected)) < 1.0).all()


def test_normals_from_a_perspective_point_map() -> None:
    """Pinhole camera looking at a tilted plane: the exact plane normal, facing the camera."""
    focal, cx, cy = 20.0, (W - 1) / 2, (H - 1) / 2
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(cols - cx) / focal, (rows - cy) / focal, np.ones_like(cols)], axis=-1)
    plane_normal = np.array([0.3, -0.2, -1.0])  # camera frame, pointing at the camera (-z)
    plane_normal /= np.linalg.norm(plane_normal)
    offset = plane_normal @ np.array([0.0, 0.0, 400.0])  # the plane passes through z = 400
    xyz = (rays * (offset / (rays @ plane_normal))[..., None]).astype(np.float32)
    normals = normals_from_point_map(xyz)
    # Registry axes: x and y as the camera's (right, down), z flipped (towards the camera).
    expected = plane_normal * np.array([1.0, 1.0, -1.0])
    assert (angle_deg(normals[1:-1, 1:-1], expected) < 1.0).all()


def test_mvtec_3d_errors(tmp_path: Path) -> None:
    category = write_mvtec_3d(tmp_path)
    dataset = open_format("mvtec-3d-ad", tmp_path, "test", category="cable_gland")
    xyz_path = category / "test" / "crack" / "xyz" / "000.tiff"
    intact = xyz_path.read_bytes()
    for corrupt in (b"II*\x00garbage-not-a-tiff", intact[:200], intact[:-100]):
        xyz_path.write_bytes(corrupt)
        with pytest.raises(DataError, match=rf"{xyz_path}: xyz: unreadable TIFF"):
            dataset[0]
    tifffile.imwrite(xyz_path, np.zeros((H, W, 3), dtype=np.float64), photometric="rgb")
    with pytest.raises(DataError, match=rf"{xyz_path}: xyz: dtype float64"):
        dataset[0]
    tifffile.imwrite(xyz_path, plane_point_map()[:-1], photometric="rgb")
    with pytest.raises(DataError, match=rf"{xyz_path}: xyz: shape \(7, 12, 3\), expected"):
        dataset[0]
    gt_path = category / "test" / "crack" / "gt" / "000.png"
    gt_path.unlink()
    with pytest.raises(DataError, match=rf"{gt_path}: gt: file missing"):
        open_format("mvtec-3d-ad", tmp_path, "test", category="cable_gland")
    train_xyz = category / "train" / "good" / "xyz"
    for path in train_xyz.iterdir():
        path.unlink()
    train_xyz.rmdir()
    with pytest.raises(DataError, match=rf"{train_xyz}: xyz: folder missing.*datum_mm"):
        open_format("mvtec-3d-ad", tmp_path, "validation", category="cable_gland")
    # An explicit datum does not need the training parts.
    assert (
        len(
            open_format(
                "mvtec-3d-ad", tmp_path, "validation", category="cable_gland", datum_mm=500.0
            )
        )
        == 1
    )
