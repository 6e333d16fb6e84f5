"""configs/lines.yaml and its pydantic models: the shipped fleet, and every rejection."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cta_model.data.lines import (
    DEFAULT_LINES_CONFIG,
    LINE_ID_PATTERN,
    LinesConfig,
    load_lines_config,
    validate_line_id,
)
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shipped_yaml() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_LINES_CONFIG.read_text())


def write_config(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rejected(tmp_path: Path, data: Any) -> str:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_lines_config(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_default_path_is_the_repository_configs_file() -> None:
    repository = Path(__file__).resolve().parents[2]
    assert repository / "configs" / "lines.yaml" == DEFAULT_LINES_CONFIG


def test_default_inventory_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CTA_LINES_CONFIG", raising=False)
    assert load_lines_config().source == str(DEFAULT_LINES_CONFIG)
    copy = tmp_path / "fleet.yaml"
    copy.write_text(DEFAULT_LINES_CONFIG.read_text())
    monkeypatch.setenv("CTA_LINES_CONFIG", str(copy))
    assert load_lines_config().source == str(copy)


def test_shipped_fleet_covers_what_the_demo_needs() -> None:
    config = load_lines_config(DEFAULT_LINES_CONFIG)
    assert len(config.lines) >= 4
    assert config.ids[:4] == ["press-a", "press-b", "mill-c", "mill-d"]
    assert sum(line.pilot for line in config.lines) == 1
    first_three = config.first(3)
    # `--lines 3` must already exercise a line without height and one with partial labels.
    assert any(not line.has_height_sensor for line in first_three)
    assert any(line.synthetic.segmentation_label_fraction < 1 for line in first_three)
    assert {line.synthetic.part_type for line in first_three} == {"bracket", "flange", "plate"}
    for line in config.lines:
        assert 0.005 <= line.defect_prevalence <= 0.05, "production prevalence is rare"
        assert 0.3 <= line.synthetic.defect_prevalence <= 0.7, "synthetic data is enriched"
        assert 0.0 < line.synthetic.dropout_rate <= 0.1
        assert line.serving_target in {"local", "kubernetes", "gitops"}
        # the narrowest reject defect of the synthetic twin: its cracks, 0.8 % of the view
        assert line.min_defect_width_mm == pytest.approx(0.008 * line.field_of_view_mm, rel=0.05)


def test_get_and_first(shipped_yaml: dict[str, Any]) -> None:
    config = load_lines_config(DEFAULT_LINES_CONFIG)
    assert config.get("mill-c").id == "mill-c"
    assert config.pilot.id == "press-a"
    with pytest.raises(ConfigError) as info:
        config.get("press-z")
    message = str(info.value)
    assert "press-z" in message and str(DEFAULT_LINES_CONFIG) in message
    assert "press-a, press-b, mill-c" in message
    with pytest.raises(ConfigError, match="asked for 9 lines"):
        config.first(9)


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ((), "fleet_name"),
        (("lines", 1), "colour"),
        (("lines", 2, "synthetic"), "light_colours"),
    ],
)
def test_unknown_key_is_rejected_naming_its_path(
    tmp_path: Path, shipped_yaml: dict[str, Any], where: tuple, key: str
) -> None:
    data = copy.deepcopy(shipped_yaml)
    target = data
    for step in where:
        target = target[step]
    target[key] = 1
    message = rejected(tmp_path, data)
    expected_path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in where)
    expected_path = (expected_path + f".{key}").lstrip(".")
    assert f"{expected_path}: unknown key" in message, message


def test_bare_number_id_is_rejected_with_advice(tmp_path: Path, shipped_yaml: dict) -> None:
    path = tmp_path / "lines.yaml"
    text = DEFAULT_LINES_CONFIG.read_text().replace("- id: mill-c", "- id: 123", 1)
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_lines_config(path)
    message = str(info.value)
    assert f"{path}: lines[2].id:" in message
    assert "number" in message and "'line-123'" in message


@pytest.mark.parametrize(
    "bad_id", ["Press-A", "press_a", "-press", "press-", "7press", "a" * 32, "", "line 1"]
)
def test_malformed_id_is_rejected(tmp_path: Path, shipped_yaml: dict, bad_id: str) -> None:
    data = copy.deepcopy(shipped_yaml)
    data["lines"][3]["id"] = bad_id
    message = rejected(tmp_path, data)
    assert "lines[3].id:" in message and "malformed" in message


def test_duplicate_id_names_both_entries(tmp_path: Path, shipped_yaml: dict) -> None:
    data = copy.deepcopy(shipped_yaml)
    data["lines"][3]["id"] = "press-b"
    message = rejected(tmp_path, data)
    assert "lines: " in message and "lines[1]" in message and "lines[3]" in message


def test_exactly_one_pilot(tmp_path: Path, shipped_yaml: dict) -> None:
    data = copy.deepcopy(shipped_yaml)
    data["lines"][2]["pilot"] = True
    assert "exactly one line must have pilot" in rejected(tmp_path, data)


@pytest.mark.parametrize(
    ("mutate", "key_path"),
    [
        (lambda line: line.update(sensors=["height"]), "lines[0].sensors"),
        (lambda line: line.update(serving_target="helm"), "lines[0].serving_target"),
        (lambda line: line.update(resolution=[0, 10]), "lines[0].resolution"),
        (lambda line: line.update(pitch_mm_per_px=-1), "lines[0].pitch_mm_per_px"),
        (lambda line: line.update(defect_prevalence=1.5), "lines[0].defect_prevalence"),
        (lambda line: line["synthetic"].update(part_type="gear"), "lines[0].synthetic.part_type"),
        (
            lambda line: line["synthetic"]["defect_mix"].update(rust=1.0),
            "lines[0].synthetic.defect_mix",
        ),
        (
            lambda line: line["synthetic"].update(light_colors=[[1, 1, 1], [1, 1, 1], [1, 1, 0.9]]),
            "lines[0].synthetic.light_colors",
        ),
        (
            lambda line: line["synthetic"].update(light_azimuths_deg=[0, 10, 180]),
            "lines[0].synthetic.light_azimuths_deg",
        ),
        (lambda line: line["synthetic"].pop("noise_std"), "lines[0].synthetic.noise_std"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, shipped_yaml: dict, mutate, key_path) -> None:
    data = copy.deepcopy(shipped_yaml)
    mutate(data["lines"][0])
    assert f"{key_path}:" in rejected(tmp_path, data)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_lines_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lines: [\n")
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: not valid YAML")):
        load_lines_config(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("lines: []\nlines: []\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_lines_config(twice)
    assert "expected a mapping" in rejected(tmp_path, ["press-a"])
    assert "lines:" in rejected(tmp_path, {"lines": []})


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_A.", min_size=0, max_size=34))
def test_id_validation_agrees_with_the_pattern(candidate: str) -> None:
    matches = re.fullmatch(LINE_ID_PATTERN, candidate) is not None
    try:
        validate_line_id(candidate)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == matches


def test_models_round_trip(shipped_yaml: dict) -> None:
    config = LinesConfig.from_dict(shipped_yaml, source="x.yaml")
    again = LinesConfig.from_dict(config.model_dump(mode="json"), source="x.yaml")
    assert again == config and again.source == "x.yaml"
