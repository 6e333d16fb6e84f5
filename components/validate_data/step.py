"""The validate_data step: statistics table -> GX suite -> report -> dataset_ref.json.

``run()`` is the one home of the step: ``cta validate-data`` and the KFP component both call it.
Outputs in ``out_dir`` (every run writes all of them, also when validation fails):

- ``statistics.parquet``: per-sample statistics (cta_model.data.statistics) plus the columns
  ``quarantined`` and ``split_leak`` (the samples of other splits with the same image file);
- ``validation_result.json``: every expectation with its table, column, success and up to 50
  unexpected ids, and the warnings;
- ``validation_report.html``: the self-contained report;
- ``dataset_ref.json``: {uri, manifest_sha256, dvc_rev, passed, quarantine}, checked against
  ``schemas/dataset_ref.schema.json``.

Classes are the dataset's own (``LineDataset.class_names``; the synthetic ``CLASS_NAMES`` when
it names none): the class-id range check and the report's class-frequency chart use them. The
check that defect masks show in the height knows the synthetic classes only (scratch, dent,
bump, crack on the part's top faces): for a dataset with other classes its columns are left
empty. Warnings (stderr, the report, ``validation_result.json``) never fail validation: a
train split without reject-class pixels (reject classes: the dataset's own, else
configs/inspection.yaml) cannot teach a model what a defect is.

A failed validation raises ValidationFailed after writing them; its message names the failed
expectations and the bad samples, e.g. an image file (same sha256) in two splits: a leak.
Problems that leave nothing to validate (no manifest, a bad manifest row or column type, a
presence flag that disagrees with the paths, a ``features.parquet`` off its schema, an unknown
line, an unknown quarantined id) raise DataError / ConfigError first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from components.artifacts import write_json_atomic
from components.storage import is_remote, local_path, opener_for
from components.validate_data.expectations import (
    LINES_TABLE,
    SAMPLES_TABLE,
    SuiteOutcome,
    Thresholds,
    split_leaks,
    validate,
)
from components.validate_data.report import ReportInputs, render_report
from cta_model.atomic import write_bytes_atomic
from cta_model.data.dataset_ref import DATASET_REF_NAME
from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, Opener
from cta_model.data.statistics import SEMSEG_FRACTION_COLUMNS, compute_statistics
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.errors import ConfigError, DataError
from cta_model.inspection import load_inspection_config

_log = logging.getLogger("cta.validate_data")

STATISTICS_NAME = "statistics.parquet"
RESULT_NAME = "validation_result.json"
REPORT_NAME = "validation_report.html"
DATASET_REF_SCHEMA = "dataset_ref"
DVC_REV_ENV = "DVC_REV"
# How much of the failure a message (an exception, a terminal line) carries; the report and
# validation_result.json have the rest.
MAX_SAMPLES_IN_MESSAGE = 20
MAX_IDS_IN_MESSAGE = 10
MAX_BAD_SAMPLES_IN_RESULT = 1000
# Columns whose value is already the explanation of a failure.
_TEXT_COLUMNS = ("read_error", "shape_mismatch", "split_leak")
# Statistics that assume the synthetic classes (cta_model.data.statistics.defect_height_anomaly).
_SYNTHETIC_CLASS_COLUMNS = ("defect_pixels", "defect_height_anomaly")


class ValidationFailed(DataError):
    """The data broke expectations; every output was written (passed=false)."""

    def __init__(
        self,
        message: str,
        *,
        dataset_ref: dict[str, Any],
        report_path: Path,
        failed_expectations: list[str],
        bad_samples: list[str],
    ) -> None:
        super().__init__(message)
        self.dataset_ref = dataset_ref
        self.report_path = report_path
        self.failed_expectations = failed_expectations
        self.bad_samples = bad_samples


def run(
    data_uri: str,
    out_dir: str,
    lines_config: str | None = None,
    quarantine: str | None = None,
    opener: Opener | None = None,
    *,
    progress: bool = True,
    workers: int = 1,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """Validate the line dataset at ``data_uri``; returns the dataset_ref dict.

    ``opener`` reads root-relative paths (default: components.storage.opener_for(data_uri), a
    local folder, ``file://`` or ``s3://``). ``quarantine`` is a file of sample ids to exclude
    (one per line, ``#`` comments, or a JSON list). ``workers`` processes compute the statistics.
    """
    started = time.perf_counter()
    uri = dataset_uri(data_uri)
    thresholds = thresholds or Thresholds()
    opener = opener if opener is not None else opener_for(data_uri)
    out = Path(out_dir)
    dataset = LineDataset(uri, lines_config, verify_checksums=True, opener=opener)
    dataset.check_features()
    manifest_sha256 = hashlib.sha256(_read_manifest(opener, uri)).hexdigest()
    quarantined = (
        read_quarantine(quarantine, dataset.sample_ids, uri) if quarantine is not None else []
    )

    class_names = dataset.class_names or CLASS_NAMES
    statistics = compute_statistics(dataset, progress=progress, workers=workers)
    if tuple(class_names) != CLASS_NAMES:
        for column in _SYNTHETIC_CLASS_COLUMNS:  # every value null, the dtype kept
            statistics[column] = statistics[column].mask(statistics[column].notna())
    statistics["quarantined"] = statistics["sample_id"].isin(set(quarantined))
    # Among the validated samples: quarantining one of a leaking pair ends the leak.
    statistics["split_leak"] = split_leaks(statistics[~statistics["quarantined"]]).reindex(
        statistics.index
    )
    validated = statistics[~statistics["quarantined"]].reset_index(drop=True)
    outcome, lines = validate(validated, dataset.lines_config, thresholds, len(class_names))
    warnings = data_warnings(validated, dataset.reject_classes)
    for warning in warnings:
        print(warning, file=sys.stderr)

    passed = outcome.success
    bad_samples = _reasons(outcome, validated, SAMPLES_TABLE, "sample_id")
    bad_lines = _reasons(outcome, lines, LINES_TABLE, "line_id")
    dataset_ref = {
        "uri": uri,
        "manifest_sha256": manifest_sha256,
        "dvc_rev": os.environ.get(DVC_REV_ENV) or None,
        "passed": passed,
        "quarantine": quarantined,
    }

    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / STATISTICS_NAME, _parquet_bytes(statistics))
    write_json_atomic(
        out / RESULT_NAME,
        {
            "uri": uri,
            "manifest_sha256": manifest_sha256,
            "passed": passed,
            "n_samples": len(statistics),
            "n_validated": len(validated),
            "n_quarantined": len(quarantined),
            "n_bad_samples": len(bad_samples),
            "bad_samples": list(bad_samples)[:MAX_BAD_SAMPLES_IN_RESULT],
            "bad_lines": list(bad_lines),
            "class_names": list(class_names),
            "warnings": warnings,
            "expectations": [item.as_dict() for item in outcome.expectations],
        },
    )
    report_path = out / REPORT_NAME
    report = render_report(
        ReportInputs(
            uri=uri,
            manifest_sha256=manifest_sha256,
            passed=passed,
            statistics=statistics,
            lines=lines,
            outcome=outcome,
            quarantine=quarantined,
            bad_samples=bad_samples,
            bad_lines=bad_lines,
            thresholds=thresholds,
            class_names=tuple(class_names),
            warnings=warnings,
        )
    )
    write_bytes_atomic(report_path, report.encode("utf-8"))
    # Last: a dataset_ref.json next to the other outputs means the step finished.
    write_json_atomic(out / DATASET_REF_NAME, dataset_ref, DATASET_REF_SCHEMA)
    _log.info(
        "validate-data: %s (%d samples, %d quarantined) %s in %.1f s",
        uri,
        len(statistics),
        len(quarantined),
        "passed" if passed else "FAILED",
        time.perf_counter() - started,
    )

    if not passed:
        raise ValidationFailed(
            failure_message(uri, outcome, bad_samples, bad_lines, report_path),
            dataset_ref=dataset_ref,
            report_path=report_path,
            failed_expectations=[item.name for item in outcome.failed],
            bad_samples=list(bad_samples),
        )
    return dataset_ref


def data_warnings(validated: pd.DataFrame, dataset_rejects: Sequence[int] | None) -> list[str]:
    """What deserves a loud word without failing validation: lines whose train split shows no
    reject-class pixel (reject classes: the dataset's own, else configs/inspection.yaml).

    The statistics pool the shares of class ids past the synthetic ones (``semseg_frac_unknown``);
    that pool counts as reject pixels when any reject class lies in it.
    """
    if dataset_rejects is not None:
        rejects, source = tuple(dataset_rejects), "the dataset's reject_classes"
    else:
        rejects, source = load_inspection_config().reject_classes, "configs/inspection.yaml"
    train = validated[validated["split"] == "train"]
    if train.empty:
        return []  # the split-size expectation names it
    known = len(SEMSEG_FRACTION_COLUMNS)
    columns = [SEMSEG_FRACTION_COLUMNS[c] for c in rejects if 0 <= c < known]
    if any(c >= known for c in rejects):
        columns.append("semseg_frac_unknown")
    shares = train[columns].fillna(0.0).sum(axis=1)
    with_defects = set(train.loc[shares > 0, "line_id"].astype(str))
    without = sorted(set(train["line_id"].astype(str)) - with_defects)
    if not without:
        return []
    return [
        f"WARNING: the train split of line(s) {', '.join(without)} has no reject-class pixel "
        f"(reject classes {list(rejects)}, from {source}): training needs data.anomalies or "
        "labelled defects, else the model can only learn that every part is good"
    ]


def dataset_uri(data_uri: str | os.PathLike[str]) -> str:
    """The dataset's one name in artefacts: an absolute local path or the ``s3://`` prefix."""
    if is_remote(data_uri):
        return os.fspath(data_uri).rstrip("/")
    return str(local_path(data_uri).resolve())


def read_quarantine(
    path: str | os.PathLike[str], known_ids: Collection[str], uri: str
) -> list[str]:
    """Sample ids from a quarantine file, in file order without repeats.

    The file is a JSON list of strings, or text with one sample id per line (blank lines and
    lines starting with ``#`` are ignored). Every id must be in the manifest: a typo would
    otherwise quarantine nothing, silently.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: quarantine file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read quarantine file: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{source}: not a valid JSON list: line {exc.lineno}: {exc.msg}"
            ) from None
        for index, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{source}: [{index}]: {item!r} is not a sample id (a string)")
        ids = [item.strip() for item in items]
    else:
        ids = [line.strip() for line in text.splitlines()]
        ids = [line for line in ids if line and not line.startswith("#")]
    ids = list(dict.fromkeys(ids))
    known = set(known_ids)
    unknown = [sample_id for sample_id in ids if sample_id not in known]
    if unknown:
        raise ConfigError(
            f"{source}: {len(unknown)} unknown sample id(s), not in {uri}/{MANIFEST_NAME}: "
            f"{_listed(unknown, MAX_IDS_IN_MESSAGE)}"
        )
    return ids


def failure_message(
    uri: str,
    outcome: SuiteOutcome,
    bad_samples: dict[str, list[str]],
    bad_lines: dict[str, list[str]],
    report_path: Path,
) -> str:
    """Every failed expectation (with its first ids) and the first bad samples with reasons."""
    failed = outcome.failed
    lines = [
        f"data validation failed for {uri}: {len(failed)} of {len(outcome.expectations)} "
        f"expectation(s) failed, {len(bad_samples)} bad sample(s)"
        + (f", {len(bad_lines)} bad line(s)" if bad_lines else ""),
        "failed expectations:",
    ]
    for item in failed:
        where = f" [{item.column}]" if item.column else ""
        if item.error:
            detail = f"GX error: {item.error}"
        elif item.unexpected_ids:
            kind = "sample" if item.table == SAMPLES_TABLE else "line"
            detail = (
                f"{item.unexpected_count} {kind}(s): "
                f"{_listed(item.unexpected_ids, MAX_IDS_IN_MESSAGE, item.unexpected_count)}"
            )
        else:
            detail = f"observed {item.observed}"
        lines.append(f"  - {item.name}{where}: {detail}")
    if bad_samples:
        lines.append(f"bad samples ({len(bad_samples)}):")
        for sample_id, reasons in list(bad_samples.items())[:MAX_SAMPLES_IN_MESSAGE]:
            lines.append(f"  - {sample_id}: {'; '.join(reasons)}")
        if len(bad_samples) > MAX_SAMPLES_IN_MESSAGE:
            lines.append(f"  ... and {len(bad_samples) - MAX_SAMPLES_IN_MESSAGE} more")
    for line_id, reasons in bad_lines.items():
        lines.append(f"bad line {line_id}: {'; '.join(reasons)}")
    lines.append(f"report: {report_path}")
    lines.append("fix the data, or exclude samples knowingly with --quarantine FILE")
    return "\n".join(lines)


# --- helpers ---


def _read_manifest(opener: Opener, uri: str) -> bytes:
    try:
        return opener(MANIFEST_NAME)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}/{MANIFEST_NAME}: cannot read: {exc}") from None


def _reasons(
    outcome: SuiteOutcome, frame: pd.DataFrame, table: str, id_column: str
) -> dict[str, list[str]]:
    """id -> "expectation: column=value" for every failed expectation naming that id."""
    indexed = frame.drop_duplicates(id_column).set_index(id_column)
    reasons: dict[str, list[str]] = {}
    for item in outcome.failed:
        if item.table != table:
            continue
        for identifier in dict.fromkeys(item.unexpected_ids):
            value = None
            if item.column and item.column in indexed.columns and identifier in indexed.index:
                value = indexed.at[identifier, item.column]
            if item.column in _TEXT_COLUMNS and value is not None:
                text = f"{item.name}: {value}"
            elif item.column and item.column != id_column:
                text = f"{item.name}: {item.column}={_format(value)}"
            else:
                text = item.name
            reasons.setdefault(identifier, []).append(text)
    return reasons


def _format(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _listed(ids: Sequence[str], limit: int, total: int | None = None) -> str:
    total = len(ids) if total is None else total
    shown = ", ".join(ids[:limit])
    return shown + (f" ... and {total - limit} more" if total > limit else "")


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
