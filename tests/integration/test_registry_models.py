"""fetch_model_folder / resolve_version against the session's real `mlflow server`."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from components.register_model.step import run as register
from components.registry.models import fetch_logged_model, fetch_model_folder, resolve_version
from components.train.logged_model import log_model_folder
from cta_model.errors import DataError
from cta_model.model_folder import folder_sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]


def _log(model_dir: Path, uri: str) -> tuple[str, str]:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"cta-fetch-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as active:
        info = log_model_folder(model_dir)
    return info.model_id, active.info.run_id


@pytest.fixture(scope="module")
def registered(tiny_model_dir: Path, mlflow_server: str) -> dict:
    """A model with version 1 complete (alias challenger) and version 2 half-registered."""
    previous = mlflow.get_tracking_uri()
    name = f"cta-fetch-{uuid.uuid4().hex[:8]}"
    model_id, _ = _log(tiny_model_dir, mlflow_server)
    result = register(model_id, name, tracking_uri=mlflow_server)
    half_id, half_run = _log(tiny_model_dir, mlflow_server)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    half = client.create_model_version(
        name, f"models:/{half_id}", run_id=half_run, model_id=half_id
    )
    mlflow.set_tracking_uri(previous)
    return {"name": name, "version": result["version"], "half": str(half.version), "id": model_id}


def test_fetch_by_version_and_alias(
    registered: dict, tiny_model_dir: Path, mlflow_server: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CTA_MODEL_CACHE", str(tmp_path / "cache"))
    expected = folder_sha256(tiny_model_dir)
    by_version = fetch_model_folder(
        f"models:/{registered['name']}/{registered['version']}", tracking_uri=mlflow_server
    )
    assert by_version == (tmp_path / "cache" / expected).resolve()
    assert folder_sha256(by_version) == expected
    assert (by_version / "weights.safetensors").read_bytes() == (
        tiny_model_dir / "weights.safetensors"
    ).read_bytes()

    by_alias = fetch_model_folder(
        f"models:/{registered['name']}@challenger",
        dest=tmp_path / "alias",
        tracking_uri=mlflow_server,
        expected_sha256=expected,
    )
    assert by_alias == (tmp_path / "alias").resolve()
    assert folder_sha256(by_alias) == expected

    info = resolve_version(f"models:/{registered['name']}@challenger", mlflow_server)
    assert info == {
        "name": registered["name"],
        "version": registered["version"],
        "sha256": expected,
        "model_id": registered["id"],
    }


def test_tampered_cache_is_fetched_again(
    registered: dict, mlflow_server: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CTA_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"models:/{registered['name']}/{registered['version']}"
    folder = fetch_model_folder(uri, tracking_uri=mlflow_server)
    good = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(b"tampered")
    again = fetch_model_folder(uri, tracking_uri=mlflow_server)
    assert again == folder
    assert (again / "weights.safetensors").read_bytes() == good


def test_wrong_sha_and_incomplete_versions_are_refused(
    registered: dict, mlflow_server: str, tmp_path: Path
) -> None:
    uri = f"models:/{registered['name']}/{registered['version']}"
    with pytest.raises(DataError, match=f"{uri}.*expected sha256 0{{64}}"):
        fetch_model_folder(
            uri, dest=tmp_path / "x", tracking_uri=mlflow_server, expected_sha256="0" * 64
        )
    assert not (tmp_path / "x").exists()
    half = f"models:/{registered['name']}/{registered['half']}"
    with pytest.raises(DataError, match="registration unfinished"):
        fetch_model_folder(half, dest=tmp_path / "y", tracking_uri=mlflow_server)
    with pytest.raises(DataError, match="not found"):
        fetch_model_folder(f"models:/{registered['name']}@nosuchalias", tracking_uri=mlflow_server)


def test_version_whose_tag_disagrees_with_the_bytes_is_refused(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    """The registry says one digest, the stored folder has another: never served."""
    previous = mlflow.get_tracking_uri()
    name = f"cta-fetch-{uuid.uuid4().hex[:8]}"
    model_id, _ = _log(tiny_model_dir, mlflow_server)
    version = register(model_id, name, tracking_uri=mlflow_server)["version"]
    mlflow.set_tracking_uri(previous)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.set_model_version_tag(name, version, "cta.model_sha256", "f" * 64)
    with pytest.raises(DataError, match=f"models:/{name}/{version}.*!= expected f{{64}}"):
        fetch_model_folder(
            f"models:/{name}/{version}", dest=tmp_path / "m", tracking_uri=mlflow_server
        )
    assert not (tmp_path / "m").exists()


def test_local_folder_is_verified_in_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert fetch_model_folder(str(tiny_model_dir)) == tiny_model_dir.resolve()
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "model.yaml").write_text((copy / "model.yaml").read_text() + "\n# edited\n")
    with pytest.raises(DataError, match="model.yaml: sha256 differs"):
        fetch_model_folder(str(copy))
    with pytest.raises(DataError, match="expected 0{64}"):
        fetch_model_folder(str(tiny_model_dir), expected_sha256="0" * 64)
    with pytest.raises(DataError, match="no such folder"):
        fetch_model_folder(str(tmp_path / "missing"))


def test_a_verified_folder_in_place_is_kept_not_replaced(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two servers fetching the same digest at once: the second must not pull the folder
    from under the first one, which may be loading it."""
    from components.registry.models import _move_into_place

    digest = folder_sha256(tiny_model_dir)
    target = Path(shutil.copytree(tiny_model_dir, tmp_path / digest))
    marker = target / "weights.safetensors"
    inode = marker.stat().st_ino
    late = Path(shutil.copytree(tiny_model_dir, tmp_path / "late"))
    _move_into_place(late, target, "models:/m/1", digest)
    assert marker.stat().st_ino == inode  # the first folder stayed

    (target / "model.yaml").write_text("damaged")
    _move_into_place(late, target, "models:/m/1", digest)
    assert folder_sha256(target) == digest and not late.exists()
    fetch_model_folder(str(target), expected_sha256=digest)  # verifies again


def test_an_unregistered_logged_model_is_fetched_by_id_and_verified(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    """The pipeline's evaluate step: the LoggedModel train logged, before any registration."""
    model_id, _ = _log(tiny_model_dir, mlflow_server)
    fetched = fetch_logged_model(model_id, tmp_path / "model", tracking_uri=mlflow_server)
    assert fetched.folder == (tmp_path / "model").resolve()
    assert fetched.sha256 == folder_sha256(tiny_model_dir)
    assert (fetched.model_id, fetched.name, fetched.version) == (model_id, None, None)

    # A LoggedModel whose recorded digest disagrees with its bytes is refused.
    client = MlflowClient(mlflow_server)
    client.set_logged_model_tags(model_id, {"cta.model_sha256": "0" * 64})
    with pytest.raises(DataError, match="sha256"):
        fetch_logged_model(model_id, tmp_path / "other", tracking_uri=mlflow_server)
    assert not (tmp_path / "other").exists()
    with pytest.raises(DataError, match="no such LoggedModel"):
        fetch_logged_model("m-" + "0" * 32, tmp_path / "none", tracking_uri=mlflow_server)
