"""The register_model step against a sqlite store and (once) the session's `mlflow server`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from dataset_refs import validated_dataset_ref
from mlflow import MlflowClient

from components.evaluate.step import run as evaluate
from components.register_model.step import run
from components.registry.names import CHALLENGER_ALIAS, COMPLETE, TAG_COMPLETE
from components.registry.versions import complete_versions
from components.train.logged_model import log_model_folder
from cta_cli.commands.register_model import register_model as register_command
from cta_model.errors import DataError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]

TASKS = ("semseg", "height", "normals")


@pytest.fixture
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # shared, read-only (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def dataset_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return validated_dataset_ref(tmp_path_factory.mktemp("data"), n_lines=2, samples_per_line=8)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


def _log(model_dir: Path, uri: str) -> tuple[str, str]:
    """(model_id, run_id) of the folder logged as a LoggedModel in a new run."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"cta-register-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as active:
        info = log_model_folder(model_dir)
    return info.model_id, active.info.run_id


def _evaluation(model_dir: Path, ref: Path, out: Path, model_id: str) -> Path:
    evaluate(str(model_dir), str(ref), str(out), model_id=model_id)
    return out / "evaluation.json"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_register_sets_alias_tags_artifacts_and_is_idempotent(
    model_dir: Path, dataset_ref: Path, sqlite_uri: str, tmp_path: Path
) -> None:
    model_id, run_id = _log(model_dir, sqlite_uri)
    evaluation = _evaluation(model_dir, dataset_ref, tmp_path / "eval", model_id)
    name = f"cta-{uuid.uuid4().hex[:8]}"
    first = run(
        model_id,
        name,
        evaluation=str(evaluation),
        dataset_ref=str(dataset_ref),
        tracking_uri=sqlite_uri,
    )
    assert first["created"] and first["version"] == "1" and first["run_id"] == run_id

    client = _client(sqlite_uri)
    version = client.get_model_version_by_alias(name, CHALLENGER_ALIAS)
    assert str(version.version) == first["version"]
    tags = version.tags
    ref = json.loads(dataset_ref.read_text())
    assert tags[TAG_COMPLETE] == COMPLETE
    assert tags["cta.model_id"] == model_id
    assert tags["cta.data_manifest_sha256"] == ref["manifest_sha256"]
    evaluated = json.loads(evaluation.read_text())
    for key in ("semseg.miou", "height.abs_err_mm", "normals.mean"):
        value = evaluated["overall"]["metrics"][key]
        assert tags[f"cta.evaluation.{key}"] == ("nan" if value is None else repr(value))
    assert tags["cta.model_sha256"] == evaluated["model"]["sha256"]
    # Lineage: the LoggedModel lists its version and holds the held-out figures. (MLflow's SQL
    # registry stores no model_id column: ModelVersion.model_id reads None on sqlite.)
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert linked == [{"name": name, "version": "1"}]
    split = evaluated["data"]["split"]
    on_model = {m.key: m for m in client.get_logged_model(model_id).metrics}
    for key, value in evaluated["overall"]["metrics"].items():
        if value is not None:
            assert on_model[f"{split}/{key}"].value == pytest.approx(value), key
            assert on_model[f"{split}/{key}"].dataset_name == split
    inspection = evaluated["overall"]["inspection"]
    for key in ("image_auroc", "recall"):
        if inspection[key] is not None:
            assert on_model[f"{split}/inspection.{key}"].value == pytest.approx(inspection[key])

    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=tags["cta.artifacts.evaluation"].rsplit("/", 1)[0],
            dst_path=str(tmp_path / "dl"),
            tracking_uri=sqlite_uri,
        )
    )
    attached = json.loads((folder / "evaluation.json").read_text())
    assert attached["model"]["name"] == name and attached["model"]["version"] == "1"
    assert attached["overall"] == evaluated["overall"]
    assert json.loads((folder / "dataset_ref.json").read_text()) == ref
    assert tags["cta.artifacts.dataset_ref"].endswith("registration/v1/dataset_ref.json")

    second = run(
        model_id,
        name,
        evaluation=str(evaluation),
        dataset_ref=str(dataset_ref),
        tracking_uri=sqlite_uri,
    )
    assert not second["created"] and second["version"] == first["version"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert [str(v.version) for v in complete_versions(client, name)] == ["1"]
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == linked


def test_incomplete_version_is_ignored_until_a_rerun_completes_it(
    model_dir: Path, sqlite_uri: str
) -> None:
    name = f"cta-{uuid.uuid4().hex[:8]}"
    done_id, _ = _log(model_dir, sqlite_uri)
    run(done_id, name, evaluation=None, dataset_ref=None, tracking_uri=sqlite_uri)
    # A registration that died after creating the version: no complete tag, no alias move.
    half_id, half_run = _log(model_dir, sqlite_uri)
    client = _client(sqlite_uri)
    half = client.create_model_version(
        name,
        f"models:/{half_id}",
        run_id=half_run,
        tags={"cta.model_id": half_id},
        model_id=half_id,
    )
    assert [str(v.version) for v in complete_versions(client, name)] == ["1"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER_ALIAS).version) == "1"

    result = run(half_id, name, evaluation=None, dataset_ref=None, tracking_uri=sqlite_uri)
    assert not result["created"] and result["version"] == str(half.version)
    assert [str(v.version) for v in complete_versions(client, name)] == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER_ALIAS).version) == "2"


def test_evaluation_of_another_model_is_refused(
    model_dir: Path, dataset_ref: Path, sqlite_uri: str, tmp_path: Path
) -> None:
    model_id, _ = _log(model_dir, sqlite_uri)
    evaluation = _evaluation(model_dir, dataset_ref, tmp_path, "m-someone-else")
    name = f"cta-{uuid.uuid4().hex[:8]}"
    with pytest.raises(DataError, match="m-someone-else"):
        run(model_id, name, evaluation=str(evaluation), dataset_ref=None, tracking_uri=sqlite_uri)
    assert _client(sqlite_uri).search_model_versions(f"name = '{name}'") == []


def _summary_and_json(output: str) -> tuple[str, dict]:
    """The CLI's summary line and JSON (CliRunner mixes MLflow's log lines into the output)."""
    lines = output.splitlines()
    start = lines.index("{")
    return lines[start - 1], json.loads("\n".join(lines[start:]))


def test_register_over_http_with_the_cli(
    model_dir: Path, dataset_ref: Path, mlflow_server: str
) -> None:
    model_id, _ = _log(model_dir, mlflow_server)
    name = f"cta-http-{uuid.uuid4().hex[:8]}"
    args = ["--model-id", model_id, "--name", name, "--dataset-ref", str(dataset_ref)]
    result = CliRunner().invoke(register_command, [*args, "--tracking-uri", mlflow_server])
    assert result.exit_code == 0, result.output
    summary, payload = _summary_and_json(result.output)
    assert summary.startswith(f"registered {name} version 1")
    assert payload["tags"][TAG_COMPLETE] == COMPLETE

    client = _client(mlflow_server)
    version = client.get_model_version_by_alias(name, CHALLENGER_ALIAS)
    assert version.tags[TAG_COMPLETE] == COMPLETE
    assert version.tags["cta.model_id"] == model_id
    assert [str(v.version) for v in complete_versions(client, name)] == [str(version.version)]
    again = CliRunner().invoke(register_command, [*args, "--tracking-uri", mlflow_server])
    assert again.exit_code == 0, again.output
    assert _summary_and_json(again.output)[0].startswith("completed existing")
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # The server links the version on the LoggedModel itself; the step adds no duplicate.
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(e["name"], str(e["version"])) for e in linked] == [(name, "1")]


def test_roi_is_attached_and_a_model_card_rendered(
    model_dir: Path, dataset_ref: Path, sqlite_uri: str, tmp_path: Path
) -> None:
    from test_gate import make_roi

    model_id, _ = _log(model_dir, sqlite_uri)
    roi = tmp_path / "roi.json"
    roi.write_text(json.dumps(make_roi(0.8)))
    name = f"cta-{uuid.uuid4().hex[:8]}"
    result = run(
        model_id, name, dataset_ref=str(dataset_ref), roi=str(roi), tracking_uri=sqlite_uri
    )
    tags = _client(sqlite_uri).get_model_version(name, result["version"]).tags
    assert tags["cta.artifacts.roi"].endswith("registration/v1/roi.json")
    assert tags["cta.model_card"] == result["model_card"]
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=tags["cta.artifacts.roi"].rsplit("/", 1)[0],
            dst_path=str(tmp_path / "dl"),
            tracking_uri=sqlite_uri,
        )
    )
    assert json.loads((folder / "roi.json").read_text()) == make_roi(0.8)
    card = (folder / "model_card.md").read_text()
    assert card.startswith(f"# Model card: {name} version 1") and "| pilot | 0.8 |" in card

    broken = make_roi()
    del broken["pilot"]["p_roi_positive"]
    roi.write_text(json.dumps(broken))
    other = f"cta-{uuid.uuid4().hex[:8]}"
    with pytest.raises(DataError, match=r"roi\.json: pilot\.p_roi_positive: required field"):
        run(model_id, other, roi=str(roi), tracking_uri=sqlite_uri)
    assert _client(sqlite_uri).search_model_versions(f"name = '{other}'") == []
