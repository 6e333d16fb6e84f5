"""Bad input never crashes a parser (issue 9): every config model and the manifest parser,
fed generated data, either accept it or raise the package's own error naming the source.

Each config file is mutated from its shipped version: a key dropped, a value replaced by a
generated one, an unknown key added. Accepting the mutation is fine (many are valid); any
exception other than ConfigError / DataError is a defect.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cta_model.config import validate_config
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


def _mutate(data: Any, draw) -> Any:
    mutated = copy.deepcopy(data)
    paths = _paths(mutated)
    path = draw(st.sampled_from(paths))
    parent = mutated
    for part in path[:-1]:
        parent = parent[part]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(values)
    elif action == "drop":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return mutated


def _config_models() -> list[tuple[str, type, Path]]:
    from components.monitor.config import MonitorConfig
    from components.roi_report.config import RoiConfig
    from cta_model.data.lines import LinesConfig
    from cta_model.inspection import InspectionConfig
    from cta_model.train_config import TrainConfig

    return [
        ("train", TrainConfig, ROOT / "configs" / "demo.yaml"),
        ("lines", LinesConfig, ROOT / "configs" / "lines.yaml"),
        ("inspection", InspectionConfig, ROOT / "configs" / "inspection.yaml"),
        ("monitor", MonitorConfig, ROOT / "configs" / "monitor.yaml"),
        ("roi", RoiConfig, ROOT / "configs" / "roi.yaml"),
    ]


@pytest.mark.parametrize(
    "name, model, path",
    _config_models(),
    ids=lambda v: getattr(v, "name", v) if isinstance(v, Path) else v,
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_config_models_accept_or_name_the_problem(name, model, path, data):
    shipped = yaml.safe_load(path.read_text())
    candidate = _mutate(shipped, data.draw)
    try:
        validate_config(model, candidate, str(path))
    except ConfigError as exc:
        assert str(path) in str(exc)


_MANIFEST_FIELDS = {
    "sample_id": st.one_of(st.text(max_size=10), st.just("press-a-000001")),
    "line_id": st.one_of(
        st.sampled_from(["press-a", "press-b", "Press A", "123", ""]), st.text(max_size=6)
    ),
    "split": st.sampled_from(["train", "val", "test", "qa", "holdout", ""]),
    "image_path": st.one_of(
        st.just("images/a.png"),
        st.just("../../etc/passwd"),
        st.just("/abs.png"),
        st.text(max_size=10),
    ),
}


def _manifest_row(**fields) -> dict:
    """A manifest row with every column of the three-task schema valid (no label files), the
    fuzzed fields laid over it: the parser's row checks are reached, not only its schema check."""
    from cta_model.data.line_dataset import manifest_schema

    row = {field.name: None for field in manifest_schema(("semseg", "height", "normals"))}
    row.update(
        sample_id="press-a-000001",
        line_id="press-a",
        split="train",
        image_path="images/a.png",
        sha256_image="0" * 64,
        has_semseg=False,
        has_height=False,
        has_normals=False,
        camera="cam-0",
        pitch_mm_per_px=0.27,
        image_height=32,
        image_width=32,
        has_defect=False,
        n_defects=0,
    )
    return {**row, **fields}


def _write_manifest(root, rows: list[dict]) -> None:
    from cta_model.data.line_dataset import MANIFEST_NAME, manifest_schema

    schema = manifest_schema(("semseg", "height", "normals"))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / MANIFEST_NAME)


def test_the_fuzz_template_row_is_accepted(tmp_path):
    from cta_model.data.line_dataset import LineDataset

    _write_manifest(tmp_path, [_manifest_row()])
    assert [row["sample_id"] for row in LineDataset(tmp_path).rows] == ["press-a-000001"]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(st.fixed_dictionaries(_MANIFEST_FIELDS), min_size=0, max_size=4))
def test_manifest_parser_refuses_bad_rows_naming_the_manifest(rows, tmp_path_factory):
    from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset

    root = tmp_path_factory.mktemp("manifest")
    _write_manifest(root, [_manifest_row(**row) for row in rows])
    try:
        dataset = LineDataset(root)
    except DataError as exc:
        assert MANIFEST_NAME in str(exc)
        return
    # Accepted: every row names a known line, a known split and a path inside the root.
    for row in dataset.rows:
        assert row["line_id"] in ("press-a", "press-b")
        assert not row["image_path"].startswith(("/", ".."))
