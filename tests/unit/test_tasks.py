"""The task registry is the one place task rules live (DESIGN 4.1)."""

import dataclasses

import numpy as np
import pytest
import torch

from cta_model import tasks
from cta_model.errors import ConfigError
from cta_model.losses import PIXEL_LOSSES

pytestmark = pytest.mark.unit


def test_registry_holds_the_four_tasks_with_primary_metrics_first():
    assert list(tasks.TASKS) == ["semseg", "height", "depth", "normals"]
    assert tasks.primary_metrics(tasks.TASKS) == {
        "semseg": "miou",
        "height": "abs_err_mm",
        "depth": "abs_err",
        "normals": "mean",
    }
    directions = tasks.metric_directions(tasks.TASKS)
    assert directions["semseg.miou"] == "higher"
    assert directions["height.rmse_mm"] == "lower"
    assert directions["normals.within_11.25"] == "higher"
    for spec in tasks.TASKS.values():
        assert spec.loss in PIXEL_LOSSES


def test_every_meter_reports_exactly_the_registry_metric_names():
    for name, spec in tasks.TASKS.items():
        meter = spec.make_meter(num_classes=4)
        assert list(meter.compute()) == [m.name for m in spec.metrics], name


def test_valid_masks_follow_each_invalid_rule():
    assert tasks.get_task("semseg").valid_mask(torch.tensor([[-1, 0, 3]])).tolist() == [
        [False, True, True]
    ]
    height = torch.tensor([[[0.0, float("nan"), -2.0]]])
    assert tasks.get_task("height").valid_mask(height).tolist() == [[True, False, True]]
    depth = torch.tensor([[[0.0, 1.5, 2.0]]])
    assert tasks.get_task("depth").valid_mask(depth).tolist() == [[False, True, True]]
    normals = torch.zeros(3, 1, 2)
    normals[2, 0, 1] = 1.0
    assert tasks.get_task("normals").valid_mask(normals).tolist() == [[False, True]]


def test_flip_negates_only_the_x_normal_component():
    normals = torch.zeros(3, 1, 2)
    normals[:, 0, 0] = torch.tensor([0.6, 0.0, 0.8])
    flipped = tasks.get_task("normals").hflip(normals)
    torch.testing.assert_close(flipped[:, 0, 1], torch.tensor([-0.6, 0.0, 0.8]))
    height = torch.tensor([[[1.0, 2.0]]])
    torch.testing.assert_close(tasks.get_task("height").hflip(height), torch.tensor([[[2.0, 1.0]]]))
    batch = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(tasks.get_task("normals").hflip(batch)[:, 1:], batch.flip(-1)[:, 1:])


def test_scale_rules():
    depth = torch.full((1, 4, 4), 2.0)
    torch.testing.assert_close(
        tasks.get_task("depth").resize(depth, (8, 8), scale=2.0), torch.full((1, 8, 8), 1.0)
    )
    height = torch.full((1, 4, 4), 3.0)
    torch.testing.assert_close(
        tasks.get_task("height").resize(height, (8, 8), scale=2.0), torch.full((1, 8, 8), 3.0)
    )
    labels = torch.tensor([[0, 1], [2, -1]])
    resized = tasks.get_task("semseg").resize(labels, (4, 4))
    assert resized.dtype == torch.int64
    assert resized[3, 3] == -1 and resized[0, 0] == 0
    normals = torch.zeros(2, 3, 2, 2)
    normals[:, 2] = 2.0  # not unit length: re-normalised, (0,0,0) stays invalid
    normals[0, :, 0, 0] = 0.0
    out = tasks.get_task("normals").resize(normals, (4, 4))
    assert out[0, :, 0, 0].abs().sum() == 0
    assert out[1, 2].eq(1.0).all()


def test_semseg_file_encoding_uses_255_and_65535_for_invalid():
    encoding = tasks.get_task("semseg").line_file
    assert encoding is not None and encoding.suffix == ".png"
    encoded = encoding.encode(np.array([[0, 3, -1]]))
    assert encoded.dtype == np.uint8 and encoded.tolist() == [[0, 3, 255]]
    wide = encoding.encode(np.array([[300, -1]]))
    assert wide.dtype == np.uint16 and wide.tolist() == [[300, 65535]]
    assert encoding.decode(np.array([[255, 2]], dtype=np.uint8)).tolist() == [[-1, 2]]
    assert encoding.decode(np.array([[65535, 2]], dtype=np.uint16)).tolist() == [[-1, 2]]


def test_parse_tasks_errors_name_the_problem():
    assert tasks.parse_tasks("semseg, height") == ("semseg", "height")
    with pytest.raises(ConfigError, match="unknown task 'edge'"):
        tasks.parse_tasks("semseg,edge")
    with pytest.raises(ConfigError, match="twice"):
        tasks.parse_tasks(["height", "height"])
    with pytest.raises(ConfigError, match="no tasks"):
        tasks.parse_tasks("")
    with pytest.raises(ConfigError, match="num_classes"):
        tasks.out_channels(["semseg"])


def test_flatten_metrics_uses_task_dot_metric():
    assert tasks.flatten_metrics({"height": {"abs_err_mm": 1.0}}) == {"height.abs_err_mm": 1.0}


def test_scoring_layouts_follow_the_label_channels():
    semseg, height, normals = (tasks.get_task(t) for t in ("semseg", "height", "normals"))
    ids = np.array([[[0, 2], [1, 1]]])
    scores = semseg.meter_prediction(ids, num_classes=3)
    assert scores.shape == (1, 3, 2, 2) and torch.equal(scores.argmax(dim=1), torch.from_numpy(ids))
    with pytest.raises(ConfigError, match="num_classes"):
        semseg.meter_prediction(ids, num_classes=None)
    assert height.label_batch([np.zeros((2, 3), np.float32)] * 4).shape == (4, 1, 2, 3)
    assert normals.label_batch([np.zeros((2, 3, 3), np.float32)]).shape == (1, 3, 2, 3)
    keep = torch.tensor([[[True, False]]])
    masked = height.mask_label(torch.ones(1, 1, 1, 2), keep)
    assert masked[0, 0, 0, 0] == 1 and torch.isnan(masked[0, 0, 0, 1])
    assert semseg.mask_label(torch.tensor([[[4, 4]]]), keep).tolist() == [[[4, -1]]]
    assert normals.absent_label(2, 3).shape == (2, 3, 3) and not normals.absent_label(2, 3).any()
    assert semseg.absent_label(2, 2).dtype == np.int64 and (semseg.absent_label(2, 2) == -1).all()


def test_roles_and_line_dataset_tasks_come_from_the_specs():
    assert tasks.task_of_kind("classes") == "semseg"
    assert tasks.task_of_kind("surface_height") == "height"
    assert tasks.task_of_kind("classes", ["height", "normals"]) is None
    assert tasks.line_dataset_tasks() == ("semseg", "height", "normals")  # depth: formats only


def test_plugins_register_their_specs(monkeypatch, tmp_path):
    plugin = tmp_path / "extra_task_plugin.py"
    plugin.write_text(
        "import dataclasses\n"
        "from cta_model.tasks import get_task\n"
        "TASK_SPECS = (dataclasses.replace(get_task('height'), name='gloss', kind='values'),)\n"
    )
    (tmp_path / "empty_plugin.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # removed again after the test
    assert tasks.load_task_plugins(" extra_task_plugin, ") == ("gloss",)
    assert tasks.parse_tasks("semseg,gloss") == ("semseg", "gloss")
    with pytest.raises(ConfigError, match="already registered"):
        tasks.load_task_plugins("extra_task_plugin")
    with pytest.raises(ConfigError, match="defines no TASK_SPECS"):
        tasks.load_task_plugins("empty_plugin")
    with pytest.raises(ConfigError, match="cannot be imported"):
        tasks.load_task_plugins("no_such_plugin_module")
    with pytest.raises(ConfigError, match="must match"):
        tasks.register_task(dataclasses.replace(tasks.get_task("height"), name="a.b"))
    with pytest.raises(ConfigError, match="kind 'classes' is taken by 'semseg'"):
        tasks.register_task(dataclasses.replace(tasks.get_task("semseg"), name="parts"))
