"""The data-validation suite (DESIGN 4.5), run with Great Expectations 1.x on statistics tables.

GX 1.x chain: an ephemeral Data Context -> a pandas Data Source -> one dataframe Asset per
table -> a whole-dataframe Batch Definition -> an Expectation Suite -> a Validation Definition
-> a Checkpoint, run with ``batch_parameters={"dataframe": frame}``. Two tables are validated:

- ``samples``: the per-sample statistics (cta_model.data.statistics), one row per sample;
  unexpected rows are reported by ``sample_id``.
- ``lines``: one row per line aggregated with pandas (split sizes, presence fractions against
  the line's sensors, image sizes); unexpected rows are reported by ``line_id``.

A Checkpoint passes one set of batch parameters to all its Validation Definitions, so each
table gets its own Checkpoint. Every expectation is strict (no ``mostly``): a bad sample is
named, and the user either fixes it or quarantines it. Thresholds live in ``Thresholds``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from cta_model.data.line_dataset import SPLITS
from cta_model.data.lines import LinesConfig
from cta_model.data.synthetic import NUM_CLASSES

SAMPLES_TABLE = "samples"
LINES_TABLE = "lines"
ID_COLUMNS = {SAMPLES_TABLE: "sample_id", LINES_TABLE: "line_id"}
MAX_IDS_PER_EXPECTATION = 50


@dataclass(frozen=True)
class Thresholds:
    """Bounds of the suite. Absolute sanity bounds, loose enough for real lines; the
    cross-task bounds are calibrated on the synthetic lines (see cta_model.data.statistics)."""

    brightness: tuple[float, float] = (15.0, 240.0)  # mean luma, 0-255: not black, not blown
    min_contrast: float = 3.0  # luma std: a flat frame is a capture fault
    colour_ratio: tuple[float, float] = (0.33, 3.0)  # mean R/G and B/G: white balance sanity
    image_dtypes: tuple[str, ...] = ("uint8",)
    semseg_dtypes: tuple[str, ...] = ("uint8", "uint16")
    float_dtypes: tuple[str, ...] = ("float32",)
    min_semseg_valid_frac: float = 0.5
    min_height_valid_frac: float = 0.5  # the sensor loses at most half the pixels
    min_normals_valid_frac: float = 0.5
    height_range_mm: tuple[float, float] = (-500.0, 500.0)  # catches unit mistakes (um, m)
    max_normal_length_err: float = 0.01
    max_normals_vs_height_deg: float = 5.0
    max_normals_vs_height_tilted_deg: float = 10.0
    min_defect_height_anomaly: float = 0.5  # clean synthetic data: >= 0.73
    min_split_samples: dict[str, int] = field(
        default_factory=lambda: {"train": 1, "val": 1, "test": 1}
    )
    min_semseg_presence: float = 0.1  # a line without labels cannot be scored on semseg
    max_presence_gap: float = 0.1  # |presence of height/normals - (1 if sensor else 0)|


@dataclass
class ExpectationOutcome:
    """One expectation's result, in the terms the report and validation_result.json use."""

    name: str
    table: str
    type: str
    column: str | None
    success: bool
    unexpected_count: int
    unexpected_ids: list[str]  # sample ids (samples) or line ids (lines), in table order
    observed: Any = None  # for aggregate expectations (row count, uniqueness of a table)
    error: str | None = None  # GX raised instead of evaluating

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "table": self.table,
            "type": self.type,
            "column": self.column,
            "success": self.success,
            "unexpected_count": self.unexpected_count,
            "unexpected_ids": self.unexpected_ids[:MAX_IDS_PER_EXPECTATION],
            "observed": _json_value(self.observed),
            "error": self.error,
        }


@dataclass
class SuiteOutcome:
    expectations: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(outcome.success for outcome in self.expectations)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.expectations if not outcome.success]

    def bad_ids(self, table: str) -> list[str]:
        """Ids named by any failed expectation of ``table``, first-seen order, no repeats."""
        seen: dict[str, None] = {}
        for outcome in self.failed:
            if outcome.table == table:
                seen.update(dict.fromkeys(outcome.unexpected_ids))
        return list(seen)


# --- derived columns ---

#: The samples a leak message names (the rest are counted).
MAX_LEAK_PARTNERS = 5


def split_leaks(samples: pd.DataFrame) -> pd.Series:
    """Per sample, the samples of other splits whose image file has the same sha256 (the model
    would be scored on, or tuned with, an image it trained on), as one text; null when none.

    Only the image counts: identical label files (an empty mask) are normal across samples.
    """
    leaks = pd.Series(pd.NA, index=samples.index, dtype="string")
    hashed = samples[samples["image_sha256"].notna()]
    for _, group in hashed.groupby("image_sha256", sort=False):
        if group["split"].nunique() < 2:
            continue
        for index, split in group["split"].items():
            others = group[group["split"] != split]
            names = [
                f"{other} ({where})"
                for other, where in zip(others["sample_id"], others["split"], strict=True)
            ]
            shown = ", ".join(names[:MAX_LEAK_PARTNERS])
            more = len(names) - MAX_LEAK_PARTNERS
            leaks.at[index] = f"same image file (sha256) as {shown}" + (
                f" and {more} more" if more > 0 else ""
            )
    return leaks


# --- the per-line table ---


def line_table(samples: pd.DataFrame, lines_config: LinesConfig) -> pd.DataFrame:
    """One row per line present in ``samples``: split sizes, presence, sensor agreement."""
    rows = []
    for line_id, group in samples.groupby("line_id", sort=True):
        line = lines_config.get(str(line_id))
        expected_height = 1.0 if line.has_height_sensor else 0.0
        sizes = group[["image_height", "image_width"]].dropna().drop_duplicates()
        row: dict[str, Any] = {
            "line_id": str(line_id),
            "n_samples": len(group),
            **{f"n_{split}": int((group["split"] == split).sum()) for split in SPLITS},
            "semseg_presence": float(group["has_semseg"].mean()),
            "height_presence": float(group["has_height"].mean()),
            "normals_presence": float(group["has_normals"].mean()),
            "has_height_sensor": line.has_height_sensor,
            "n_image_sizes": len(sizes),
        }
        row["height_presence_gap"] = abs(row["height_presence"] - expected_height)
        row["normals_presence_gap"] = abs(row["normals_presence"] - expected_height)
        rows.append(row)
    columns = [
        "line_id",
        "n_samples",
        *[f"n_{split}" for split in SPLITS],
        "semseg_presence",
        "height_presence",
        "normals_presence",
        "has_height_sensor",
        "n_image_sizes",
        "height_presence_gap",
        "normals_presence_gap",
    ]
    return pd.DataFrame(rows, columns=columns)


# --- the suites ---

Spec = tuple[str, Callable[[], gxe.Expectation]]


def sample_expectations(
    thresholds: Thresholds, line_ids: list[str], num_classes: int = NUM_CLASSES
) -> list[Spec]:
    """(name, factory) of every expectation on the samples table; ``num_classes``: the
    dataset's class count (NUM_CLASSES in the expectation's name)."""
    t = thresholds
    ratio_low, ratio_high = t.colour_ratio
    height_low, height_high = t.height_range_mm
    return [
        (
            "at least one sample to validate",
            partial(gxe.ExpectTableRowCountToBeBetween, min_value=1),
        ),
        ("sample ids unique", partial(gxe.ExpectColumnValuesToBeUnique, column="sample_id")),
        ("line ids in the lines config", partial(_in_set, "line_id", line_ids)),
        ("split is train/val/test/qa", partial(_in_set, "split", list(SPLITS))),
        ("files readable, checksums match", partial(_null, "read_error")),
        ("image in one split only (no leak)", partial(_null, "split_leak")),
        ("shapes match (labels vs image vs manifest)", partial(_null, "shape_mismatch")),
        ("image dtype", partial(_in_set, "image_dtype", list(t.image_dtypes))),
        ("image is RGB (3 channels)", partial(_in_set, "image_channels", [3])),
        ("brightness", partial(_between, "brightness", *t.brightness)),
        ("contrast", partial(_between, "contrast", t.min_contrast)),
        ("colour balance R/G", partial(_between, "ratio_rg", ratio_low, ratio_high)),
        ("colour balance B/G", partial(_between, "ratio_bg", ratio_low, ratio_high)),
        ("semseg dtype", partial(_in_set, "semseg_dtype", list(t.semseg_dtypes))),
        (
            "semseg valid-pixel fraction",
            partial(_between, "semseg_valid_frac", t.min_semseg_valid_frac),
        ),
        (
            "semseg class ids in [0, NUM_CLASSES)",
            partial(_between, "semseg_max_class", 0, num_classes - 1),
        ),
        ("height dtype", partial(_in_set, "height_dtype", list(t.float_dtypes))),
        (
            "height valid-pixel fraction",
            partial(_between, "height_valid_frac", t.min_height_valid_frac),
        ),
        ("height has no infinities", partial(_between, "height_inf_count", None, 0)),
        (
            "height minimum in range (mm)",
            partial(_between, "height_min_mm", height_low, height_high),
        ),
        (
            "height maximum in range (mm)",
            partial(_between, "height_max_mm", height_low, height_high),
        ),
        ("normals dtype", partial(_in_set, "normals_dtype", list(t.float_dtypes))),
        (
            "normals valid-pixel fraction",
            partial(_between, "normals_valid_frac", t.min_normals_valid_frac),
        ),
        (
            "normals are unit length",
            partial(_between, "normals_length_err", None, t.max_normal_length_err),
        ),
        (
            "normals agree with the height gradient",
            partial(_between, "normals_vs_height_deg", None, t.max_normals_vs_height_deg),
        ),
        (
            "normals agree with the height gradient on slopes",
            partial(
                _between, "normals_vs_height_tilted_deg", None, t.max_normals_vs_height_tilted_deg
            ),
        ),
        (
            "defect masks show in the height",
            partial(_between, "defect_height_anomaly", t.min_defect_height_anomaly),
        ),
    ]


def line_expectations(thresholds: Thresholds) -> list[Spec]:
    """(name, factory) of every expectation on the per-line table."""
    t = thresholds
    specs: list[Spec] = [
        (
            f"{split} split has >= {minimum} sample(s) per line",
            partial(_between, f"n_{split}", minimum),
        )
        for split, minimum in t.min_split_samples.items()
    ]
    return specs + [
        (
            "semseg label presence per line",
            partial(_between, "semseg_presence", t.min_semseg_presence),
        ),
        (
            "height presence matches the line's sensors",
            partial(_between, "height_presence_gap", None, t.max_presence_gap),
        ),
        (
            "normals presence matches the line's sensors",
            partial(_between, "normals_presence_gap", None, t.max_presence_gap),
        ),
        ("one image size per line", partial(_between, "n_image_sizes", None, 1)),
    ]


def _between(column: str, low: float | None = None, high: float | None = None) -> gxe.Expectation:
    """Every non-null value in [low, high] (null = task absent, not judged here)."""
    return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high)


def _in_set(column: str, values: list[Any]) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values)


def _null(column: str) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToBeNull(column=column)


# --- running ---


def validate(
    samples: pd.DataFrame,
    lines_config: LinesConfig,
    thresholds: Thresholds | None = None,
    num_classes: int = NUM_CLASSES,
) -> tuple[SuiteOutcome, pd.DataFrame]:
    """Run both suites; returns the outcome and the per-line table that was validated.
    ``num_classes``: the dataset's class count (default: the synthetic scenes')."""
    thresholds = thresholds or Thresholds()
    lines = line_table(samples, lines_config)
    context = gx.get_context(mode="ephemeral")
    # GX draws a tqdm bar per expectation batch on stderr; the step has its own progress.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    data_source = context.data_sources.add_pandas("cta_statistics")
    outcomes = _run_table(
        context,
        data_source,
        SAMPLES_TABLE,
        _prepared(samples),
        sample_expectations(thresholds, list(lines_config.ids), num_classes),
    )
    outcomes += _run_table(
        context, data_source, LINES_TABLE, _prepared(lines), line_expectations(thresholds)
    )
    return SuiteOutcome(outcomes), lines


def _prepared(frame: pd.DataFrame) -> pd.DataFrame:
    """A fresh 0..n-1 index: GX reports unexpected rows by index and by id column."""
    return frame.reset_index(drop=True)


def _run_table(
    context: Any, data_source: Any, table: str, frame: pd.DataFrame, specs: list[Spec]
) -> list[ExpectationOutcome]:
    id_column = ID_COLUMNS[table]
    asset = data_source.add_dataframe_asset(name=table)
    batch_definition = asset.add_batch_definition_whole_dataframe(f"{table}_all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"cta_{table}"))
    for name, factory in specs:
        expectation = factory()
        expectation.meta = {"name": name, "table": table}
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"validate_{table}", data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"cta_{table}_checkpoint",
            validation_definitions=[validation],
            # COMPLETE lists every unexpected row; the id column names them.
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": [id_column],
                "partial_unexpected_count": 0,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (suite_result,) = result.run_results.values()
    outcomes = [_outcome(item, table, id_column) for item in suite_result.results]
    # GX returns results in its own order; keep the suite's order for stable reports.
    order = {name: index for index, (name, _) in enumerate(specs)}
    return sorted(outcomes, key=lambda outcome: order.get(outcome.name, len(order)))


def _outcome(item: Any, table: str, id_column: str) -> ExpectationOutcome:
    config = item.expectation_config
    meta = config.meta or {}
    result = item.result or {}
    exception = item.exception_info or {}
    error = None
    if exception.get("raised_exception"):
        error = str(exception.get("exception_message") or "GX raised an exception")
    ids = [str(entry[id_column]) for entry in result.get("unexpected_index_list") or []]
    if config.type == "expect_column_values_to_be_unique" and ids:
        ids = list(dict.fromkeys(ids))  # each duplicate id once
    return ExpectationOutcome(
        name=str(meta.get("name", config.type)),
        table=table,
        type=config.type,
        column=config.kwargs.get("column"),
        success=bool(item.success) and error is None,
        unexpected_count=int(result.get("unexpected_count") or 0),
        unexpected_ids=ids,
        observed=result.get("observed_value"),
        error=error,
    )


def _json_value(value: Any) -> Any:
    """GX observed values as plain JSON (numpy scalars -> Python, NaN -> null)."""
    if value is None or isinstance(value, bool | str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    return str(value)
