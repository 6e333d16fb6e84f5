"""KFP wrapper of the evaluate step: only calls components.evaluate.step.run().

Fetches the LoggedModel ``model_id`` from the tracking server (verified against the digest
training recorded on it: components.registry.models.fetch_logged_model) and scores it on the
test split of the validated data (the ``dataset`` artefact of validate_data). Writes
``evaluation.json`` (and the affinity-map images under ``explain/``) into its ``evaluation``
artefact, which roi_report and register_model read. With ``model_name`` it also compares with
the registered STL baselines (Delta_m) and the champion. ``bootstrap_n``, ``latency_repeats``
and ``explain`` let a quick pipeline (tests, smoke runs) do less; ``lines_config`` is the fleet
inventory ("" for the image's configs/lines.yaml). ``data_sha256`` is not read:
it is the data's identity in KFP's cache key (pipelines/k8s_settings.py). ``metrics`` (a KFP
Metrics artefact) holds the headline figures (``components.evaluate.step.headline_metrics``),
so the KFP UI shows them on the run, and ``confusion`` (ClassificationMetrics) the pooled test
images at the operating threshold: good / defective against the verdict.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(
    model_id: str,
    dataset: dsl.Input[dsl.Dataset],
    tracking_uri: str,
    model_name: str = "",
    bootstrap_n: int = 1000,
    latency_repeats: int = 5,
    explain: bool = True,
    data_sha256: str = "",
    lines_config: str = "",
    evaluation: dsl.Output[dsl.Artifact] = None,
    metrics: dsl.Output[dsl.Metrics] = None,
    confusion: dsl.Output[dsl.ClassificationMetrics] = None,
) -> None:
    """Evaluate one LoggedModel into the ``evaluation`` artefact."""
    import tempfile
    from pathlib import Path

    from components.evaluate.step import headline_metrics, operating_confusion, run
    from components.logs import configure_logging
    from components.registry.models import fetch_logged_model
    from cta_model.data.dataset_ref import dataset_ref_in

    configure_logging()
    with tempfile.TemporaryDirectory(prefix="cta-evaluate-") as scratch:
        fetched = fetch_logged_model(
            model_id, Path(scratch) / "model", tracking_uri=tracking_uri or None
        )
        result = run(
            str(fetched.folder),
            dataset_ref_in(dataset.path),
            evaluation.path,
            model_id=model_id,
            model_name=model_name or None,
            tracking_uri=tracking_uri or None,
            bootstrap_n=bootstrap_n,
            latency_repeats=latency_repeats,
            explain=explain,
            lines_config=lines_config or None,
        )
    evaluation.metadata.update({"model_id": model_id, "model_sha256": fetched.sha256})
    for key, value in headline_metrics(result).items():
        metrics.log_metric(key, value)
    matrix = operating_confusion(result)
    if matrix is not None:
        confusion.log_confusion_matrix(["good", "defective"], matrix)
