"""The register_model step: LoggedModel -> registered model version, alias ``challenger``.

``run()`` is the one home of the step: ``cta register-model`` and the KFP component call it.
In order (DESIGN 6.1, 6.2 - aliases only, no stages):

1. find the version of ``model_name`` already made from ``model_id`` (re-runs complete it), else
   register the LoggedModel (its artifact location as the source, ``model_id`` passed, its
   source run as the version's run) and wait until it is READY; then link the version on the
   LoggedModel (``mlflow.modelVersions``);
2. attach evaluation.json, dataset_ref.json and (when given) roi.json: they are logged as
   artifacts of the LoggedModel's source run under ``registration/v<version>/`` (the evaluation
   copy with ``model.name`` / ``model.version`` filled in) and the version tags
   ``cta.artifacts.*`` hold their ``runs:/`` URIs;
3. set the version tags ``cta.model_id``, ``cta.model_sha256``, ``cta.data_manifest_sha256``,
   ``cta.data_uri``, ``cta.evaluation.split``, ``cta.evaluation.n_images`` and
   ``cta.evaluation.<task>.<primary metric>`` (overall; ``nan`` when not scorable);
4. set the alias ``challenger`` to the version;
5. log the evaluation's overall figures (``<split>/<metric>``) on the LoggedModel, so the
   model page shows its held-out scores;
6. only then tag ``cta.registration=complete``. Consumers (gate, promotion, serve) go through
   components/registry, which ignores every version without that tag: a registration that died
   half-way is invisible until a re-run completes it;
7. render the version's model card (components/model_card) and attach it.

Consistency checks before anything is registered: the evaluation's model_id and sha256 must
be those of the LoggedModel, the evaluation and dataset_ref must name the same manifest, and
the LoggedModel's weights must be finite (a diverged model is never registered).
Retries of transient MLflow errors are MLflow's own, bounded by ``run()``
(``components.registry.client.bounded_http_retries``: a dead server fails the step in about
15-20 s with an error naming its URL, instead of about four minutes).
Two registrations of the same model_id racing each other can still create two versions; the
lowest version is then the one re-runs complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.model_card.card import publish_card
from components.registry.client import bounded_http_retries, mlflow_client
from components.registry.names import (
    CHALLENGER_ALIAS,
    COMPLETE,
    DATASET_REF_FILE,
    EVALUATION_FILE,
    ROI_FILE,
    TAG_COMPLETE,
    TAG_DATA_URI,
    TAG_MANIFEST,
    TAG_MODEL_ID,
    TAG_MODEL_SHA256,
    artifact_tag,
    evaluation_tag,
    registration_dir,
)
from components.registry.versions import find_version
from cta_model.errors import ConfigError, DataError

READY_TIMEOUT_S = 300.0


def _wait_ready(client: Any, name: str, version: str, timeout_s: float = READY_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        status = str(current.status)
        if status == "READY":
            return current
        if status == "FAILED_REGISTRATION":
            raise DataError(
                f"model {name!r} version {version}: registration failed: "
                f"{current.status_message or 'no message'}"
            )
        if time.monotonic() > deadline:
            raise DataError(
                f"model {name!r} version {version}: still {status} after {timeout_s:.0f} s"
            )
        time.sleep(1.0)


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _format_metric(value: Any) -> str:
    return "nan" if value is None else repr(float(value))


def _check_consistency(
    model_id: str,
    logged_model: Any,
    evaluation: Mapping[str, Any] | None,
    dataset_ref: Mapping[str, Any] | None,
) -> None:
    if evaluation is None:
        return
    evaluated = evaluation["model"]
    if evaluated.get("model_id") not in (None, model_id):
        raise DataError(
            f"evaluation.json scored model_id {evaluated['model_id']!r}, not {model_id!r}"
        )
    logged_sha = (logged_model.tags or {}).get(TAG_MODEL_SHA256)
    if logged_sha and evaluated["sha256"] != logged_sha:
        raise DataError(
            f"evaluation.json scored a model folder with sha256 {evaluated['sha256']}, but "
            f"LoggedModel {model_id} holds {logged_sha}"
        )
    if dataset_ref is not None and (
        dataset_ref["manifest_sha256"] != evaluation["data"]["manifest_sha256"]
    ):
        raise DataError(
            f"evaluation.json was computed on manifest {evaluation['data']['manifest_sha256']}, "
            f"dataset_ref.json names {dataset_ref['manifest_sha256']}"
        )


def _check_finite_weights(client: Any, logged_model: Any) -> None:
    """Download the LoggedModel's weights file and refuse NaN or infinite values."""
    import mlflow
    from safetensors.torch import load_file

    from components.registry.attachments import quiet_downloads
    from components.registry.models import model_dir_path
    from cta_model.model_folder import WEIGHTS, nonfinite_tensors

    source = logged_model.artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="cta-register-") as staging, quiet_downloads():

        def fetch(relative: str) -> Path:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source}/{relative}",
                    dst_path=staging,
                    tracking_uri=client.tracking_uri,
                )
            )

        weights = f"{model_dir_path(fetch('MLmodel').parent)}/{WEIGHTS}"
        bad = nonfinite_tensors(load_file(fetch(weights)))
    if bad:
        raise DataError(
            f"LoggedModel {logged_model.model_id}: {weights}: {len(bad)} tensor(s) hold NaN or "
            f"infinite values (e.g. {', '.join(bad[:3])}); refusing to register a diverged model"
        )


def _roi_schema() -> str | None:
    """``roi`` once schemas/roi.schema.json exists (the roi_report step owns it)."""
    from components.artifacts import schema_path

    return "roi" if schema_path("roi").is_file() else None


def _attach(
    client: Any,
    run_id: str,
    version: str,
    name: str,
    evaluation: Mapping[str, Any] | None,
    dataset_ref: Mapping[str, Any] | None,
    roi: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Log the artefacts to ``registration/v<version>/`` of ``run_id``; name -> runs:/ URI."""
    from components.artifacts import write_json_atomic

    artifact_path = registration_dir(version)
    uris: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cta-register-") as staging:
        if evaluation is not None:
            registered = {
                **evaluation,
                "model": {**evaluation["model"], "name": name, "version": str(version)},
            }
            path = write_json_atomic(
                Path(staging) / EVALUATION_FILE, registered, schema_name="evaluation"
            )
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
            uris["evaluation"] = f"runs:/{run_id}/{artifact_path}/{EVALUATION_FILE}"
        if dataset_ref is not None:
            path = write_json_atomic(
                Path(staging) / DATASET_REF_FILE, dict(dataset_ref), schema_name="dataset_ref"
            )
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
            uris["dataset_ref"] = f"runs:/{run_id}/{artifact_path}/{DATASET_REF_FILE}"
        if roi is not None:
            path = write_json_atomic(Path(staging) / ROI_FILE, dict(roi), schema_name=_roi_schema())
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
            uris["roi"] = f"runs:/{run_id}/{artifact_path}/{ROI_FILE}"
    return uris


def _version_tags(
    model_id: str,
    logged_model: Any,
    evaluation: Mapping[str, Any] | None,
    dataset_ref: Mapping[str, Any] | None,
    artifact_uris: Mapping[str, str],
) -> dict[str, str]:
    from cta_model.tasks import get_task, metric_key

    tags = {TAG_MODEL_ID: model_id}
    model_sha = (logged_model.tags or {}).get(TAG_MODEL_SHA256)
    if evaluation is not None:
        model_sha = model_sha or evaluation["model"]["sha256"]
        data = evaluation["data"]
        tags[TAG_MANIFEST] = data["manifest_sha256"]
        tags[TAG_DATA_URI] = data["uri"]
        overall = evaluation["overall"]
        tags[evaluation_tag("split")] = data["split"]
        tags[evaluation_tag("n_images")] = str(overall["n_images"])
        for task in evaluation["model"]["tasks"]:
            key = metric_key(task, get_task(task).primary_metric.name)
            if key in overall["metrics"]:
                tags[evaluation_tag(key)] = _format_metric(overall["metrics"][key])
    if dataset_ref is not None:
        tags[TAG_MANIFEST] = dataset_ref["manifest_sha256"]
        tags[TAG_DATA_URI] = dataset_ref["uri"]
    if model_sha:
        tags[TAG_MODEL_SHA256] = model_sha
    for artefact, uri in artifact_uris.items():
        tags[artifact_tag(artefact)] = uri
    return tags


def _link_logged_model(client: Any, logged_model: Any, name: str, version: str) -> None:
    """Record the version on the LoggedModel's ``mlflow.modelVersions`` tag, the link MLflow's
    model page shows. An MLflow server sets it itself; a client on a local store (sqlite) does
    not, and MLflow's SQL registry keeps no ``model_id`` column (``ModelVersion.model_id`` reads
    None there), so without this tag the LoggedModel would not know its versions."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    current = client.get_logged_model(logged_model.model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    linked = json.loads(current) if current else []
    if not any(
        entry.get("name") == name and str(entry.get("version")) == version for entry in linked
    ):
        linked.append({"name": name, "version": version})
        client.set_logged_model_tags(
            logged_model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)}
        )


def _evaluation_metrics(model_id: str, evaluation: Mapping[str, Any]) -> list[Any]:
    """The evaluation's headline figures as metrics of the LoggedModel, ``<split>/<key>``, with
    the scored split as the metric's dataset (its manifest sha256 the digest): the model page
    then shows what it scored on held-out data, not only the validation figures of training."""
    from mlflow.entities import Metric

    from components.evaluate.step import headline_metrics

    split, timestamp = evaluation["data"]["split"], int(time.time() * 1000)
    digest = evaluation["data"]["manifest_sha256"][:36]  # MLflow's limit on a digest
    return [
        Metric(
            f"{split}/{key}",
            value,
            timestamp,
            0,
            model_id=model_id,
            dataset_name=split,
            dataset_digest=digest,
        )
        for key, value in headline_metrics(evaluation).items()
    ]


def _source_run(client: Any, logged_model: Any, name: str) -> str:
    """The LoggedModel's source run; a run made for the registration when it has none."""
    if logged_model.source_run_id:
        return logged_model.source_run_id
    run = client.create_run(
        logged_model.experiment_id,
        run_name=f"register-{name}",
        tags={TAG_MODEL_ID: logged_model.model_id},
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@bounded_http_retries()
def run(
    model_id: str,
    model_name: str,
    *,
    evaluation: str | os.PathLike[str] | None = None,
    dataset_ref: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    roi: str | os.PathLike[str] | None = None,
    alias: str = CHALLENGER_ALIAS,
    extra_tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Register (or complete the registration of) LoggedModel ``model_id`` as ``model_name``.

    ``alias``: the alias the version gets (``baseline`` for the STL baselines).
    ``extra_tags``: more version tags, set before the registration completes.

    Returns {name, version, model_id, run_id, created, alias, tags, artifacts, model_card}.
    """
    from components.artifacts import read_json

    if not model_id:
        raise ConfigError("model_id is empty")
    evaluation_data = read_json(evaluation, "evaluation") if evaluation else None
    ref_data = read_json(dataset_ref, "dataset_ref") if dataset_ref else None
    roi_data = read_json(roi, _roi_schema()) if roi else None
    client = mlflow_client(tracking_uri)
    logged_model = client.get_logged_model(model_id)
    _check_consistency(model_id, logged_model, evaluation_data, ref_data)
    _check_finite_weights(client, logged_model)

    existing = find_version(client, model_name, model_id)
    created = existing is None
    if existing is None:
        _ensure_registered_model(client, model_name)
        existing = client.create_model_version(
            name=model_name,
            # The artifact location, not models:/<id>: MLflow resolves a models:/ source
            # through the process-wide tracking URI, not this client's.
            source=logged_model.artifact_location,
            run_id=logged_model.source_run_id,
            tags={TAG_MODEL_ID: model_id},
            model_id=model_id,
            await_creation_for=int(READY_TIMEOUT_S),
        )
    version = _wait_ready(client, model_name, existing.version)
    _link_logged_model(client, logged_model, model_name, str(version.version))

    run_id = _source_run(client, logged_model, model_name)
    artifacts = _attach(
        client, run_id, version.version, model_name, evaluation_data, ref_data, roi_data
    )
    tags = {
        **_version_tags(model_id, logged_model, evaluation_data, ref_data, artifacts),
        **(extra_tags or {}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_registered_model_alias(model_name, alias, version.version)
    if evaluation_data is not None:
        client.log_batch(run_id, metrics=_evaluation_metrics(model_id, evaluation_data))
    # Last: from here on consumers see the version.
    client.set_model_version_tag(model_name, version.version, TAG_COMPLETE, COMPLETE)
    card_uri = publish_card(client, model_name, version.version)
    return {
        "name": model_name,
        "version": str(version.version),
        "model_id": model_id,
        "run_id": run_id,
        "created": created,
        "alias": alias,
        "tags": {**tags, TAG_COMPLETE: COMPLETE},
        "artifacts": artifacts,
        "model_card": card_uri,
    }


__all__ = ["run"]
