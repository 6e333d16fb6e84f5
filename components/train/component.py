"""KFP wrapper of the train step: only calls components.train.step.run().

Trains on the validated data (``dataset_ref``: the dataset_ref.json validate_data wrote) with
the config at ``config_path`` into ``out_dir`` (model folder ``out_dir/model``), tracking in
``tracking_uri`` (every step of a pipeline gets the same one; DESIGN 6.1). CTA_* environment
overrides are ignored: the pipeline's parameters are the whole input. Writes the step's summary
({model_dir, model_id, run_id, best_metrics, best_epoch}) to ``out_dir/train_summary.json`` and
returns the MLflow LoggedModel id.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train(
    dataset_ref: str,
    config_path: str,
    out_dir: str,
    tracking_uri: str,
    experiment: str = "cta",
) -> str:
    """Train one model; returns its model_id."""
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.train.step import run

    summary = run(
        config_path,
        flags={"data.dataset_ref": dataset_ref, "output": out_dir},
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        environ={},
    )
    # A literal: a lightweight component's body cannot see its module's globals.
    write_json_atomic(Path(out_dir) / "train_summary.json", summary)
    return summary["model_id"] or ""
