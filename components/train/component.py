"""KFP wrappers of the train step: ``train`` calls components.train.step.run() in its own pod;
``train_trainjob`` calls components.train.remote.train_in_trainjob(), which trains in a Kubeflow
Trainer TrainJob of ``nodes`` x ``gpus`` and waits for it.

Both train on the validated data (``dataset_ref``: the dataset_ref.json validate_data wrote) with
the config at ``config_path`` into ``out_dir`` (model folder ``out_dir/model``), tracking in
``tracking_uri`` (every step of a pipeline gets the same one; DESIGN 6.1). CTA_* environment
overrides are ignored: the pipeline's parameters are the whole input. Both write the step's
summary ({model_dir, model_id, run_id, best_metrics, best_epoch}) to
``out_dir/train_summary.json`` and return the MLflow LoggedModel id. ``data_sha256`` is not read:
it is the data's identity in KFP's cache key (pipelines/k8s_settings.py).
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
    gpus: int = 0,
    gpu_type: str = "",
    data_sha256: str = "",
) -> str:
    """Train one model in this pod, one process per GPU (torchrun) or one on CPU; returns its
    model_id. ``gpu_type`` is what the pod requested ``gpus`` of (logged only)."""
    import logging
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.train.step import run

    # Epoch summaries (INFO) in the pod's log.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if gpus > 0:
        print(f"training on {gpus} x {gpu_type or 'GPU'}: torchrun --nproc-per-node {gpus}")
    summary = run(
        config_path,
        flags={"data.dataset_ref": dataset_ref, "output": out_dir},
        nproc_per_node=max(1, gpus),
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        environ={},
    )
    # A literal: a lightweight component's body cannot see its module's globals.
    write_json_atomic(Path(out_dir) / "train_summary.json", summary)
    return summary["model_id"] or ""


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_trainjob(
    dataset_ref: str,
    config_path: str,
    out_dir: str,
    tracking_uri: str,
    output_uri: str,
    run_key: str,
    image: str,
    s3_secret: str,
    experiment: str = "cta",
    nodes: int = 1,
    gpus: int = 0,
    mlflow_secret: str = "",
    data_sha256: str = "",
) -> str:
    """Train one model as a TrainJob (its state and logs in this step's log); returns its
    model_id. Cancelling the run deletes the TrainJob."""
    import logging
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.train.remote import train_in_trainjob

    # Epoch summaries (INFO) in the pod's log.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not output_uri:
        raise ValueError("train_output_uri: the TrainJob backend needs an s3:// prefix")
    summary = train_in_trainjob(
        dataset_ref=dataset_ref,
        config_path=config_path,
        out_dir=out_dir,
        output_uri=output_uri,
        run_key=run_key,
        image=image,
        nodes=nodes,
        gpus=gpus,
        tracking_uri=tracking_uri,
        experiment=experiment,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
        log=lambda line: print(line, flush=True),
    )
    write_json_atomic(Path(out_dir) / "train_summary.json", summary)
    return summary["model_id"] or ""
