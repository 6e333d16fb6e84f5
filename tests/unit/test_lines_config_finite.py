"""lines.yaml refuses NaN, infinities and out-of-range sizes (issue 18, finding 5), naming the
file, the key and the line id; the shipped inventory and its synthetic twins are unchanged."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from cta_model.data.line_dataset import dataset_lines_config
from cta_model.data.lines import DEFAULT_LINES_CONFIG, load_lines_config
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(DEFAULT_LINES_CONFIG.read_text())


def refusal(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_lines_config(path)
    return str(caught.value)


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("index", "mutate", "key", "why"),
    [
        (
            1,
            lambda line: line["synthetic"].update(light_azimuths_deg=[NAN, 120, 240]),
            "lines[1].synthetic.light_azimuths_deg[0]",
            "must be finite",
        ),
        (
            0,
            lambda line: line["synthetic"].update(light_azimuths_deg=[0, INF, 240]),
            "lines[0].synthetic.light_azimuths_deg[1]",
            "must be finite",
        ),
        (2, lambda line: line.update(parts_per_hour=INF), "lines[2].parts_per_hour", "finite"),
        (2, lambda line: line.update(hours_per_year=NAN), "lines[2].hours_per_year", "finite"),
        (
            0,
            lambda line: line.update(resolution=[1e9, 1e9]),
            "lines[0].resolution",
            "each in [1, 65536], got [1000000000, 1000000000]",
        ),
        (3, lambda line: line.update(resolution=[65537, 10]), "lines[3].resolution", "65536"),
        (
            0,
            lambda line: line["synthetic"].update(
                light_colors=[[INF, 0.2, 0.2], [0.2, 1, 0.3], [0.25, 0.3, 1]]
            ),
            "lines[0].synthetic.light_colors[0][0]",
            "must be finite",
        ),
        (
            0,
            lambda line: line["synthetic"].update(
                light_colors=[[1e300, 0.2, 0.2], [0.2, 1, 0.3], [0.25, 0.3, 1]]
            ),
            "lines[0].synthetic.light_colors",
            "components in [0, 10]",
        ),
        (
            1,
            lambda line: line["synthetic"].update(light_elevation_deg=NAN),
            "lines[1].synthetic.light_elevation_deg",
            "finite",
        ),
        (1, lambda line: line["synthetic"].update(noise_std=NAN), "synthetic.noise_std", "finite"),
        (0, lambda line: line.update(pitch_mm_per_px=NAN), "lines[0].pitch_mm_per_px", "finite"),
        (
            0,
            lambda line: line.update(min_defect_width_mm=INF),
            "lines[0].min_defect_width_mm",
            "finite",
        ),
    ],
)
def test_non_finite_and_out_of_range_values_name_file_key_and_line(
    tmp_path, shipped, index, mutate, key, why
):
    data = copy.deepcopy(shipped)
    mutate(data["lines"][index])
    message = refusal(tmp_path, data)
    line_id = shipped["lines"][index]["id"]
    problem = next(line for line in message.splitlines() if key in line)
    assert problem.startswith(f"{tmp_path / 'lines.yaml'}: ")
    assert why in problem and problem.endswith(f"(line {line_id})")


def test_a_dataset_inventory_is_checked_alike(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["lines"][0]["synthetic"]["light_azimuths_deg"] = [NAN, 120, 240]
    (tmp_path / "lines.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def opener(relative: str) -> bytes:
        return (tmp_path / relative).read_bytes()

    with pytest.raises(ConfigError, match=r"light_azimuths_deg\[0\]: .*finite.*\(line press-a\)"):
        dataset_lines_config(opener, str(tmp_path))


def test_the_shipped_inventory_still_loads(shipped):
    config = load_lines_config(DEFAULT_LINES_CONFIG)
    assert config.ids == [line["id"] for line in shipped["lines"]]
