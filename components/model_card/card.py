"""The model card of a registered version: Markdown rendered from the registry alone.

Sources: the version (tags, aliases, source), the files register_model attached under
``registration/v<N>/`` (dataset_ref.json, evaluation.json, roi.json), the gate's audit records
under ``gate/v<N>/``, the version's ``line-<id>`` aliases and the roll-out's
``cta.rollout.history`` tag (a JSON list of {line, action, time, decision}), and the training
resolution from the model folder's ``model.yaml``. ``publish_card`` logs the card as
``registration/v<N>/model_card.md`` (replaced on every render: it is derived, not a record) and
sets the version tag ``cta.model_card`` to its ``runs:/`` URI.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.registry.attachments import (
    Registration,
    quiet_downloads,
    read_registration,
    run_of_version,
)
from components.registry.client import mlflow_client
from components.registry.names import (
    CARD_FILE,
    TAG_MODEL_CARD,
    TAG_MODEL_ID,
    TAG_MODEL_SHA256,
    TAG_ROLLOUT_HISTORY,
    TAG_VERDICT,
    line_of_alias,
    registration_dir,
)
from components.registry.records import gate_records

_CLASS_KEYS = ("n_images", "recall", "image_auroc", "image_ap", "pixel_auroc", "aupro")
_PART_KEYS = ("n_parts", "n_defective", "n_good", "recall", "frr")
_DIMENSION_KEYS = ("n_features", "mae_mm", "p95_mm", "in_tol_acc")
_ROI_KEYS = ("p_roi_positive", "npv", "payback_label", "roi_pct_p10", "roi_pct_p50", "roi_pct_p90")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Money and counts in full (230,000), small figures to 4 significant digits.
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def _pick(mapping: Mapping[str, Any], keys: Sequence[str]) -> list[Any]:
    return [mapping.get(key) for key in keys]


def _with_interval(inspection: Mapping[str, Any], key: str) -> str:
    """``0.91 [0.85, 0.96]``: the figure and its bootstrap p05-p95, when evaluate gave one."""
    value = inspection.get(key)
    interval = (inspection.get("intervals") or {}).get(key) or {}
    if value is None or interval.get("p05") is None or interval.get("p95") is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(interval['p05'])}, {_fmt(interval['p95'])}]"


def _inspection_rows(inspection: Sequence[tuple[str, Mapping[str, Any]]]) -> list[list[Any]]:
    rows = []
    for line, i in inspection:
        f1 = i.get("f1_max_oracle") or {}
        rows.append(
            [
                line,
                i.get("threshold"),
                i.get("target_recall"),
                (i.get("threshold_choice") or {}).get("reached"),
                _with_interval(i, "recall"),
                _with_interval(i, "frr"),
                _with_interval(i, "image_auroc"),
                i.get("image_ap"),
                f1.get("f1"),
                i.get("pixel_auroc"),
                i.get("aupro"),
                i.get("n_defective"),
                i.get("n_good"),
            ]
        )
    return rows


def _inspection_section(
    evaluation: Mapping[str, Any], inspection: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[str]:
    max_fpr = (evaluation.get("metric_settings") or {}).get("aupro_max_fpr", 0.3)
    out = ["", "### Inspection (threshold chosen on val, applied to this split)", ""]
    out += _table(
        [
            "line",
            "threshold",
            "target recall",
            "reached on val",
            "recall [p05, p95]",
            "false-reject rate [p05, p95]",
            "image AUROC [p05, p95]",
            "image AP",
            "F1-max (oracle)",
            "pixel AUROC",
            f"AUPRO (FPR <= {_fmt(max_fpr)})",
            "defective",
            "good",
        ],
        _inspection_rows(inspection),
    )
    out += [
        "",
        "Scores are the model's own defect scores; recall and false-reject rate are at the "
        "operating threshold, intervals from the bootstrap. F1-max is an oracle figure: its "
        "threshold is picked on this split itself.",
    ]
    per_class = [
        [line, name, *_pick(figures, _CLASS_KEYS)]
        for line, i in inspection
        for name, figures in sorted((i.get("per_class") or {}).items())
    ]
    if per_class:
        out += ["", "### Per defect class", ""]
        out += _table(
            ["line", "class", "images", "recall", "image AUROC", "image AP", "pixel AUROC"]
            + ["AUPRO"],
            per_class,
        )
    parts = [[line, *_pick(i["parts"], _PART_KEYS)] for line, i in inspection if i.get("parts")]
    if parts:
        out += ["", "### Part verdicts (a part's score: the max of its images')", ""]
        out += _table(["line", "parts", "defective", "good", "recall", "false-reject rate"], parts)
    return out


def _warnings_section(evaluation: Mapping[str, Any]) -> list[str]:
    warnings = evaluation.get("warnings") or []
    if not warnings:
        return []
    return ["## Warnings", "", *[f"- {warning}" for warning in warnings], ""]


def _scored_sets(evaluation: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [*sorted(evaluation["per_line"].items()), ("overall", evaluation["overall"])]


def _metrics_section(evaluation: Mapping[str, Any]) -> list[str]:
    sets = _scored_sets(evaluation)
    keys = sorted({key for _, scored in sets for key in scored["metrics"]})
    rows = [
        [line, *_pick(scored, ["n_images", "n_defective"]), *_pick(scored["metrics"], keys)]
        for line, scored in sets
    ]
    out = [f"## Metrics per line ({evaluation['data']['split']} split)", ""]
    out += _table(["line", "images", "defective", *keys], rows)
    inspection = [(line, s["inspection"]) for line, s in sets if s.get("inspection")]
    if inspection:
        out += _inspection_section(evaluation, inspection)
    dimensions = [(line, s["dimensions"]) for line, s in sets if s.get("dimensions")]
    if dimensions:
        out += ["", "### Dimensions", ""]
        out += _table(
            ["line", "features", "MAE mm", "p95 mm", "in-tolerance"],
            [[line, *_pick(d, _DIMENSION_KEYS)] for line, d in dimensions],
        )
    return out


def _delta_m_section(evaluation: Mapping[str, Any]) -> list[str]:
    out = ["## Delta_m vs single-task baselines", ""]
    delta_m = evaluation.get("delta_m")
    if delta_m is None:
        return [*out, f"Not computed: {evaluation.get('delta_m_reason') or 'no reason given'}."]
    scalars = [(k, v) for k, v in sorted(delta_m.items()) if k.startswith("delta_m_")]
    out += _table(["figure", "%"], scalars)
    per_task = delta_m.get("per_task_pct") or {}
    if per_task:
        out += ["", *_table(["task", "% vs STL (higher = better)"], sorted(per_task.items()))]
    return out


def _champion_section(evaluation: Mapping[str, Any]) -> list[str]:
    out = ["## Versus the champion", ""]
    comparison = evaluation.get("vs_champion")
    if comparison is None:
        reason = evaluation.get("vs_champion_reason") or "no champion at evaluation time"
        return [*out, f"No comparison: {reason}."]
    out.append(
        f"Champion: {comparison.get('name')} version {comparison.get('version')}; paired "
        "bootstrap over the same test images, differences oriented so positive = candidate "
        "better."
    )
    rows = [
        [task, *_pick(m, ["metric", "candidate", "champion", "p05", "p50", "p95"])]
        for task, m in sorted((comparison.get("metrics") or {}).items())
    ]
    rows += [
        [f"inspection {figure}", figure, None, None, q.get("p05"), q.get("p50"), q.get("p95")]
        for figure, q in sorted((comparison.get("inspection") or {}).items())
    ]
    return [
        *out,
        "",
        *_table(["task", "metric", "candidate", "champion", "p05", "p50", "p95"], rows),
    ]


def _roi_section(roi: Mapping[str, Any] | None) -> list[str]:
    out = ["## ROI", ""]
    if roi is None:
        return [*out, "No roi.json attached."]
    rows = [[scope, *_pick(roi.get(scope) or {}, _ROI_KEYS)] for scope in ("pilot", "fleet")]
    return [
        *out,
        f"Pilot line: {roi.get('pilot_line')}; currency {roi.get('currency')}.",
        "",
        *_table(["scope", *_ROI_KEYS], rows),
    ]


def _known_limits(evaluation: Mapping[str, Any] | None, input_size: Any) -> list[str]:
    out = ["## Known limits", ""]
    out.append(
        f"- Training resolution: {_fmt(input_size)} (height, width); images are resized "
        "to it, so defects smaller than a few pixels there are not resolvable."
    )
    if evaluation is None:
        return [*out, "- No evaluation attached: nothing is known about its quality."]
    from cta_model.tasks import TASKS, get_task, metric_key

    tasks = evaluation["model"]["tasks"]
    for line, scored in _scored_sets(evaluation):
        metrics = scored["metrics"]
        keys = {task: [metric_key(task, m.name) for m in get_task(task).metrics] for task in tasks}
        unscored = [task for task in tasks if all(metrics.get(k) is None for k in keys[task])]
        # A task measured by a line sensor is unscored because the line lacks the sensor: one
        # note per sensor, naming every registered task it measures.
        sensors = dict.fromkeys(get_task(t).sensor for t in unscored if get_task(t).sensor)
        for sensor in sensors:
            measured = " and ".join(name for name, spec in TASKS.items() if spec.sensor == sensor)
            out.append(
                f"- {line}: no {sensor} labels (no {sensor} sensor on this line); {measured} "
                "there are unmeasured."
            )
        for task in unscored:
            if get_task(task).sensor is None:
                out.append(f"- {line}: no {task} labels, so {task} is not scored there.")
        unscored_keys = {key for task in unscored for key in keys[task]}
        partly = [k for k, v in sorted(metrics.items()) if v is None and k not in unscored_keys]
        if partly:
            out.append(
                f"- {line}: null metric(s) {', '.join(partly)}: nothing valid to score "
                "(e.g. no pixels of a class, or no valid label pixels)."
            )
        if "inspection" in scored and scored["inspection"] is None:
            out.append(f"- {line}: no defect figures (no segmentation labels).")
    if evaluation.get("delta_m") is None:
        out.append(f"- Delta_m unknown: {evaluation.get('delta_m_reason') or 'no reason given'}.")
    return out


def _gate_section(client: Any, reg: Registration) -> list[str]:
    out = ["## Gate verdicts", ""]
    records = list(gate_records(client, reg).values())
    if not records:
        return [*out, "Not gated yet."]
    rows = []
    for record in records:
        failed = [c["name"] for c in record["checks"] if not c["passed"]]
        champion = (record["inputs"].get("champion") or {}).get("version")
        approver = (record.get("approver") or {}).get("name")
        rows.append(
            [
                record["decided_at"],
                record["verdict"],
                record["policy"]["sha256"][:12],
                champion,
                approver,
                ", ".join(failed) or "-",
                record["verdict_id"][:12],
            ]
        )
    return [
        *out,
        *_table(
            ["time", "verdict", "policy", "vs champion", "approver", "failed checks", "record"],
            rows,
        ),
    ]


def _rollout_section(reg: Registration, aliases: Sequence[str]) -> list[str]:
    out = ["## Roll-out", ""]
    lines = sorted(line for line in map(line_of_alias, aliases) if line is not None)
    raw = reg.tags.get(TAG_ROLLOUT_HISTORY)
    history: list[Any] = []
    if raw:
        try:
            history = json.loads(raw)
        except json.JSONDecodeError:
            out.append(f"(tag {TAG_ROLLOUT_HISTORY} is not valid JSON; shown raw: `{raw}`)")
    if lines:
        out.append(f"Serving on line(s): {', '.join(lines)}.")
    if isinstance(history, list) and history:
        out += [
            "",
            *_table(
                ["line", "action", "time", "decision"],
                [
                    [h.get("line"), h.get("action"), h.get("time"), h.get("decision")]
                    for h in history
                    if isinstance(h, Mapping)
                ],
            ),
        ]
    elif not lines:
        out.append("No roll-out yet.")
    return out


def _input_size(client: Any, source: str | None) -> Any:
    """[height, width] from the model folder's model.yaml; None when it cannot be read.

    The folder is the pyfunc's ``model_dir`` artefact: its place is in the MLmodel file.
    """
    if not source:
        return None
    import mlflow

    from components.registry.models import model_dir_path  # imports torch: only when needed
    from cta_model.config import parse_yaml

    def fetch(relative: str, staging: str) -> Path:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{relative}",
                dst_path=staging,
                tracking_uri=client.tracking_uri,
            )
        )

    try:
        with tempfile.TemporaryDirectory(prefix="cta-card-") as staging, quiet_downloads():
            folder = model_dir_path(fetch("MLmodel", staging).parent)
            model_yaml = fetch(f"{folder}/model.yaml", staging).read_text(encoding="utf-8")
            return parse_yaml(model_yaml, "model.yaml")["model"]["input_size"]
    except Exception:  # noqa: BLE001 - the card says "n/a" rather than failing
        return None


def render_card(client: Any, model_name: str, version: str | int) -> str:
    """The Markdown card of one complete registered version."""
    reg = read_registration(client, model_name, version)
    found = client.get_model_version(model_name, reg.version)
    aliases = sorted(getattr(found, "aliases", None) or [])
    evaluation, ref = reg.evaluation, reg.dataset_ref
    created = dt.datetime.fromtimestamp(found.creation_timestamp / 1000, dt.UTC)
    out = [
        f"# Model card: {model_name} version {reg.version}",
        "",
        f"- model id: `{reg.tags.get(TAG_MODEL_ID)}`",
        f"- model folder sha256: `{reg.tags.get(TAG_MODEL_SHA256)}`",
        f"- registered: {created.isoformat(timespec='seconds')}; source run `{reg.run_id}`",
        f"- aliases: {', '.join(aliases) or 'none'}",
        f"- gate verdict (latest): {reg.tags.get(TAG_VERDICT, 'not gated')}",
    ]
    if evaluation is not None:
        out.append(f"- tasks: {', '.join(evaluation['model'].get('tasks') or []) or 'n/a'}")
    out += ["", "## Data", ""]
    if ref is not None:
        out += [
            f"- dataset: `{ref['uri']}`",
            f"- manifest sha256: `{ref['manifest_sha256']}`; DVC revision: {_fmt(ref['dvc_rev'])}",
            f"- validation passed: {_fmt(ref['passed'])}; quarantined samples: "
            f"{len(ref['quarantine'])}",
        ]
    else:
        out.append("- No dataset_ref.json attached.")
    if evaluation is not None:
        data = evaluation["data"]
        out.append(
            f"- evaluated on split `{data['split']}` of {len(evaluation['per_line'])} line(s) "
            f"({', '.join(sorted(evaluation['per_line']))}), {evaluation['overall']['n_images']} "
            "image(s)"
        )
        out += [
            "",
            *_warnings_section(evaluation),
            *_metrics_section(evaluation),
            "",
            *_delta_m_section(evaluation),
            "",
            *_champion_section(evaluation),
        ]
    out += ["", *_roi_section(reg.roi)]
    out += ["", *_known_limits(evaluation, _input_size(client, reg.source))]
    out += ["", *_gate_section(client, reg), "", *_rollout_section(reg, aliases), ""]
    return "\n".join(out)


def publish_card(client: Any, model_name: str, version: str | int) -> str:
    """Render, attach as ``registration/v<N>/model_card.md`` and tag; returns its runs:/ URI."""
    text = render_card(client, model_name, version)
    reg_version = str(version)
    found = client.get_model_version(model_name, reg_version)
    run_id = run_of_version(found)
    artifact_path = registration_dir(reg_version)
    with tempfile.TemporaryDirectory(prefix="cta-card-") as staging:
        path = Path(staging) / CARD_FILE
        path.write_text(text, encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}/{CARD_FILE}"
    if found.tags.get(TAG_MODEL_CARD) != uri:
        client.set_model_version_tag(model_name, reg_version, TAG_MODEL_CARD, uri)
    return uri


def run(
    model_name: str,
    version: str | int,
    tracking_uri: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Publish the card of a version (and write it to ``out`` too); returns {uri, path, text}."""
    from cta_model.atomic import write_bytes_atomic

    client = mlflow_client(tracking_uri)
    uri = publish_card(client, model_name, version)
    text = read_card(client, model_name, version)
    if out is not None:
        write_bytes_atomic(Path(out), text.encode("utf-8"))
    return {"uri": uri, "path": str(out) if out is not None else None, "text": text}


def read_card(client: Any, model_name: str, version: str | int) -> str:
    """The attached card's text (what is in the registry, not a fresh render)."""
    found = client.get_model_version(model_name, str(version))
    uri = found.tags[TAG_MODEL_CARD]
    run_id, path = uri.removeprefix("runs:/").split("/", 1)
    with tempfile.TemporaryDirectory(prefix="cta-card-") as staging, quiet_downloads():
        local = Path(client.download_artifacts(run_id, path, staging))
        return local.read_text(encoding="utf-8")


__all__ = ["publish_card", "read_card", "render_card", "run"]
