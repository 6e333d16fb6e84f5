"""The trust chain of a served model (issue 18 finding 6): the weights are verified against the
sha256 recorded at registration, not only against the folder's own SHA256SUMS (which whoever
changes the weights can recompute); a bare folder is served but marked unverified; nothing of
the folder may resolve outside it."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient

from components.serve.process import ServerStartError, start_server
from cta_model.errors import DataError
from cta_model.model_folder import (
    CHECKSUMS,
    WEIGHTS,
    folder_sha256,
    verify_checksums,
    write_checksums,
)

pytestmark = pytest.mark.integration


def _tamper(folder: Path) -> None:
    """Change one weight byte and recompute SHA256SUMS, as someone with write access would."""
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(weights))
    write_checksums(folder)


def _register(model_dir: Path, tracking_uri: str) -> tuple[str, str, str]:
    """(name, version, model_id) of a fresh registration of ``model_dir``."""
    from components.register_model.step import run as register
    from components.train.logged_model import log_model_folder

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"cta-trust-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        model_id = log_model_folder(model_dir).model_id
    name = f"cta-trust-{uuid.uuid4().hex[:8]}"
    return name, register(model_id, name, tracking_uri=tracking_uri)["version"], model_id


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_registry_weights_changed_with_recomputed_sums_are_refused(
    tiny_model_dir: Path,
    mlflow_server: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    name, version, model_id = _register(tiny_model_dir, mlflow_server)
    # The stored copy in the server's artefact store, changed behind the registry's back.
    stored = {
        path.parent.resolve()
        for path in tmp_path_factory.getbasetemp().glob(f"mlflow_server*/artifacts/**/{CHECKSUMS}")
        if model_id in str(path)
    }  # pytest's "<name>current" links name the same folder twice
    assert len(stored) == 1, stored
    folder = stored.pop()
    _tamper(folder)
    verify_checksums(folder)  # its own SHA256SUMS holds
    with pytest.raises(
        ServerStartError, match=rf"(?s)exited with 2.*!= expected {folder_sha256(tiny_model_dir)}"
    ):
        start_server(
            f"models:/{name}@challenger",
            tracking_uri=mlflow_server,
            model_cache=tmp_path / "cache",
            ready_timeout_s=120,
        )
    assert not (tmp_path / "cache" / folder_sha256(tiny_model_dir)).exists()


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_a_registered_version_without_a_recorded_sha256_is_refused(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    name, version, _ = _register(tiny_model_dir, mlflow_server)
    MlflowClient(mlflow_server, registry_uri=mlflow_server).delete_model_version_tag(
        name, version, "cta.model_sha256"
    )
    with pytest.raises(ServerStartError, match=r"(?s)exited with 2.*records no cta.model_sha256"):
        start_server(
            f"models:/{name}/{version}",
            tracking_uri=mlflow_server,
            model_cache=tmp_path / "cache",
            ready_timeout_s=120,
        )


def test_a_bare_folder_is_served_as_unverified(tiny_model_dir: Path) -> None:
    with start_server(str(tiny_model_dir), stats_window_s=0) as handle:
        session = requests.Session()
        session.trust_env = False
        metrics = session.get(f"{handle.url}/metrics").text
    assert 'cta_model_verified{against="unverified"} 0.0' in metrics
    log = handle.log_path.read_text()
    assert f"model {tiny_model_dir} is unverified" in log and "WARNING" in log


def test_files_resolving_outside_the_folder_are_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    outside = tmp_path / "elsewhere.safetensors"
    (copy / WEIGHTS).rename(outside)
    (copy / WEIGHTS).symlink_to(outside)
    verify_message = rf"{copy / WEIGHTS}: resolves outside the model folder"
    with pytest.raises(DataError, match=verify_message):
        verify_checksums(copy)
    with pytest.raises(ServerStartError, match=rf"(?s)exited with 2.*{verify_message}"):
        start_server(str(copy), ready_timeout_s=120)


def test_sums_that_leave_out_the_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Dropping the weights' line from SHA256SUMS must not let changed weights through."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    sums = copy / CHECKSUMS
    sums.write_text(
        "".join(line + "\n" for line in sums.read_text().splitlines() if WEIGHTS not in line)
    )
    with pytest.raises(DataError, match=f"{WEIGHTS}: not listed in {CHECKSUMS}"):
        verify_checksums(copy)
