"""KFP wrappers of the train step: ``train`` calls components.train.step.run() in its own pod;
``train_trainjob`` calls components.train.remote.train_in_trainjob(), which trains in a Kubeflow
Trainer TrainJob of ``nodes`` x ``gpus`` and waits for it.

Both train on the validated data (the ``dataset`` artefact of validate_data) with the config at
``config_path`` (a path in the image) into their ``model`` artefact (a folder: the model folder
``model/``, the run's config and the step's summary ``train_summary.json`` = {model_dir,
model_id, run_id, best_metrics, best_epoch}; no checkpoints), tracking in ``tracking_uri``
(every step of a pipeline gets the same one; DESIGN 6.1), and return the MLflow LoggedModel id,
through which the later steps fetch the model (kfp.local cannot merge the two branches'
artefacts with ``dsl.OneOf``). CTA_* environment overrides are ignored: the pipeline's
parameters are the whole input. ``train`` runs in the GPU image (components/image.py), and so do
the TrainJob's pods (the pipeline passes it as ``image``); the ``train_trainjob`` launcher
itself needs no GPU. ``data_sha256`` is not read: it is the data's identity in KFP's cache key
(pipelines/k8s_settings.py). ``lines_config`` (a path in the image, "" for the shipped
configs/lines.yaml) is the fleet inventory the pod trains with; the TrainJob's pods read the
config's ``data.lines_config`` or the image's default.
"""

from kfp import dsl

from components.image import GPU_IMAGE, PROJECT_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    dataset: dsl.Input[dsl.Dataset],
    config_path: str,
    tracking_uri: str,
    experiment: str = "cta",
    gpus: int = 0,
    gpu_type: str = "",
    data_sha256: str = "",
    lines_config: str = "",
    model: dsl.Output[dsl.Model] = None,
) -> str:
    """Train one model in this pod, one process per GPU (torchrun) or one on CPU; returns its
    model_id. ``gpu_type`` is what the pod requested ``gpus`` of (logged only)."""
    import os
    import shutil
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.logs import configure_logging
    from components.train.step import run
    from cta_model.data.dataset_ref import dataset_ref_in

    configure_logging()  # epoch summaries (INFO) in the pod's log
    if lines_config:  # the fleet inventory of this process and its torchrun workers
        os.environ["CTA_LINES_CONFIG"] = lines_config
    dataset_ref = dataset_ref_in(dataset.path)
    out_dir = model.path
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
    # The artefact is the model, not the resume state: KFP uploads the whole folder, and a
    # retried or re-run step trains afresh (retries=0), so the checkpoints go.
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    # A literal: a lightweight component's body cannot see its module's globals.
    write_json_atomic(Path(out_dir) / "train_summary.json", summary)
    model.metadata.update(
        {"model_id": summary["model_id"] or "", "run_id": summary.get("run_id") or ""}
    )
    return summary["model_id"] or ""


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_trainjob(
    dataset: dsl.Input[dsl.Dataset],
    config_path: str,
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
    model: dsl.Output[dsl.Model] = None,
) -> str:
    """Train one model as a TrainJob (its state and logs in this step's log); returns its
    model_id. Cancelling the run deletes the TrainJob."""
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.logs import configure_logging
    from components.train.remote import train_in_trainjob
    from cta_model.data.dataset_ref import dataset_ref_in

    configure_logging()  # the TrainJob's state and logs in this pod's log
    dataset_ref = dataset_ref_in(dataset.path)
    out_dir = model.path
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
    model.metadata.update(
        {"model_id": summary["model_id"] or "", "run_id": summary.get("run_id") or ""}
    )
    return summary["model_id"] or ""
