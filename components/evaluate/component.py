"""KFP wrapper of the evaluate step: only calls components.evaluate.step.run().

Scores the model folder ``model_dir`` on the test split of the validated data and writes
``out_dir/evaluation.json`` (and the affinity-map images under ``out_dir/explain``); returns
that path (the register step attaches it). With ``tracking_uri`` and ``model_name`` it also
compares with the registered STL baselines (Delta_m) and the champion. ``bootstrap_n``,
``latency_repeats`` and ``explain`` let a quick pipeline (tests, smoke runs) do less.
``data_sha256`` is not read: it is the data's identity in KFP's cache key
(pipelines/k8s_settings.py). ``metrics`` (a KFP Metrics artefact) holds the headline figures
(``components.evaluate.step.headline_metrics``), so the KFP UI shows them on the run.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(
    model_dir: str,
    dataset_ref: str,
    out_dir: str,
    model_id: str,
    tracking_uri: str = "",
    model_name: str = "",
    bootstrap_n: int = 1000,
    latency_repeats: int = 5,
    explain: bool = True,
    data_sha256: str = "",
    metrics: dsl.Output[dsl.Metrics] = None,
) -> str:
    """Evaluate one model folder; returns the evaluation.json path."""
    import logging
    from pathlib import Path

    from components.evaluate.step import EVALUATION_NAME, headline_metrics, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    evaluation = run(
        model_dir,
        dataset_ref,
        out_dir,
        model_id=model_id or None,
        model_name=model_name or None,
        tracking_uri=tracking_uri or None,
        bootstrap_n=bootstrap_n,
        latency_repeats=latency_repeats,
        explain=explain,
    )
    for key, value in headline_metrics(evaluation).items():
        metrics.log_metric(key, value)
    return str(Path(out_dir) / EVALUATION_NAME)
