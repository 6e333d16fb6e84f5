"""Model cards rendered from the registry of the session's real `mlflow server`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

# The contract-shaped artefact builders of the gate tests (same folder, on sys.path).
from test_gate import MANIFEST, base_policy, make_dataset_ref, make_evaluation, make_roi

from components.gate.step import run as gate
from components.model_card.card import read_card
from components.register_model.step import run as register
from components.registry.names import CARD_FILE, TAG_MODEL_CARD
from components.train.logged_model import log_model_folder
from cta_cli.commands.model_card import model_card as model_card_command
from cta_model.model_folder import folder_sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]


def _register(
    tmp_path: Path, model_id: str, name: str, evaluation: dict, uri: str, roi: bool = True
) -> str:
    files = {"evaluation": evaluation, "dataset_ref": make_dataset_ref()}
    if roi:
        files["roi"] = make_roi(0.93)
    paths = {}
    for key, data in files.items():
        paths[key] = tmp_path / f"{name}-{key}.json"
        paths[key].write_text(json.dumps(data))
    return register(model_id, name, **{k: str(v) for k, v in paths.items()}, tracking_uri=uri)[
        "version"
    ]


def test_card_shows_data_metrics_limits_gate_and_rollout(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(f"cta-card-{uuid.uuid4().hex[:8]}")
    # Two LoggedModels: one per registered name (each attaches to its source run).
    with mlflow.start_run():
        model_id = log_model_folder(tiny_model_dir).model_id
    with mlflow.start_run():
        other_id = log_model_folder(tiny_model_dir).model_id
    sha = folder_sha256(tiny_model_dir)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)

    # Registration renders a first card: not gated, no roll-out, no ROI.
    name = f"cta-card-{uuid.uuid4().hex[:8]}"
    version = _register(
        tmp_path, model_id, name, make_evaluation(model_id, sha), mlflow_server, roi=False
    )
    tags = client.get_model_version(name, version).tags
    assert tags[TAG_MODEL_CARD].endswith(f"registration/v{version}/{CARD_FILE}")
    first = read_card(client, name, version)
    assert first.startswith(f"# Model card: {name} version {version}")
    assert "Not gated yet." in first and "No roll-out yet." in first
    assert "No roi.json attached." in first

    # The gate re-renders it with its verdict.
    policy = tmp_path / "gate.yaml"
    policy.write_text(yaml.safe_dump(base_policy(roi=None)))
    verdict = gate(name, version, policy, tracking_uri=mlflow_server, approver="carol")
    assert verdict["verdict"] == "pass"
    gated = read_card(client, name, version)
    gate_rows = [line for line in gated.splitlines() if "| pass |" in line]
    assert len(gate_rows) == 1 and "carol" in gate_rows[0]
    assert verdict["verdict_id"][:12] in gate_rows[0]
    assert "aliases: challenger, champion" in gated

    # Data, metrics per line, inspection, Delta_m, known limits.
    assert f"manifest sha256: `{MANIFEST}`" in gated
    assert "validation passed: yes" in gated
    assert "| press-a | 6 | 3 | 0.2 | 0.3 | 8 | 0.7 | 0.9 |" in gated
    assert "| mill-c | 6 | 3 | n/a | n/a | n/a | 0.7 | 0.9 |" in gated
    # Inspection at the operating threshold, intervals [p05, p95], threshold-free figures.
    assert (
        "| press-a | 0.42 | 0.95 | yes | 0.96 [0.91, 0.99] | 0.04 [0.01, 0.09] | "
        "0.98 [0.95, 0.99] | 0.97 | 0.93 | 0.97 | 0.88 | 3 | 3 |"
    ) in gated
    assert "F1-max is an oracle figure" in gated
    assert "| press-a | scratch | 3 | 0.96 | 0.97 | 0.96 | 0.96 | 0.85 |" in gated
    assert "## Warnings" not in gated
    assert "| delta_m_primary_pct_higher_better | 1.5 |" in gated
    assert "| height | 1 |" in gated
    assert "Training resolution: [32, 32]" in gated
    assert "- mill-c: no height labels (no height sensor on this line)" in gated
    assert "- press-a: no height labels" not in gated
    assert "No comparison: no champion." in gated

    # Roll-out: read from the line aliases and the roll-out's history tag.
    client.set_registered_model_alias(name, "line-press-a", version)
    history = [
        {
            "line": "press-a",
            "action": "live",
            "time": "2026-11-28T23:00:00+00:00",
            "decision": "wave 1 healthy",
        }
    ]
    client.set_model_version_tag(name, version, "cta.rollout.history", json.dumps(history))
    out = tmp_path / "card.md"
    result = CliRunner().invoke(
        model_card_command,
        ["--model-name", name, "--version", version, "--out", str(out)]
        + ["--tracking-uri", mlflow_server],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text == read_card(client, name, version)
    assert "Serving on line(s): press-a." in text
    assert "| press-a | live | 2026-11-28T23:00:00+00:00 | wave 1 healthy |" in text

    # A version evaluated against a champion shows the paired comparison; ROI when attached.
    other = f"cta-card-vs-{uuid.uuid4().hex[:8]}"
    champion = {"name": name, "version": version, "model_id": model_id}
    compared = make_evaluation(other_id, sha, champion=champion, semseg_p05=-0.02, delta_m=None)
    warning = "line mill-c: val cannot reach the target recall 0.95: it reaches 0.600"
    compared["warnings"] = [warning]
    compared["per_line"]["mill-c"]["inspection"]["parts"] = {
        "n_parts": 3,
        "n_defective": 2,
        "n_good": 1,
        "recall": 1.0,
        "frr": 0.0,
    }
    v_other = _register(tmp_path, other_id, other, compared, mlflow_server)
    card = read_card(client, other, v_other)
    assert f"Champion: {name} version {version}" in card
    assert "| semseg | miou | 0.7 | 0.69 | -0.02 | -0.01 | 0 |" in card
    assert "| inspection recall | recall | n/a | n/a | 0 | 0.01 | 0.03 |" in card
    assert "| inspection image_auroc | image_auroc | n/a | n/a | 0 | 0.005 | 0.01 |" in card
    assert f"## Warnings\n\n- {warning}\n" in card
    assert "| mill-c | 3 | 2 | 1 | 1 | 0 |" in card  # part verdicts
    assert "Not computed: no STL baseline registered" in card
    assert "| pilot | 0.93 |" in card
