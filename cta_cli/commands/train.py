"""`cta train`: train here (optionally under torchrun) or as a Kubeflow TrainJob; calls
components.train.step.run() or components.train.remote.run_on_kubeflow()."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click


def _parse_set(items: tuple[str, ...]) -> dict:
    from cta_model.config import parse_yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE (e.g. optim.lr=1e-4)")
        overrides[key] = parse_yaml(value, f"--set {key}")
    return overrides


@click.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="train config; with --backend kubeflow, its path inside the training pods",
)
@click.option("--arch", type=click.Choice(["stl", "hps", "hps-light", "ctal"]))
@click.option("--tasks", help="comma-separated, e.g. semseg,height,normals")
@click.option(
    "--backbone", type=click.Choice(["resnet18", "resnet34", "resnet50", "hrnet-w18-small-v2"])
)
@click.option("--data", help="dataset folder, s3:// prefix, or a dataset_ref.json")
@click.option("--out", "output", help="output folder (model folder, checkpoints)")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--lr", type=float)
@click.option("--seed", type=int)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]))
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", help="dotted override")
@click.option("--resume", default="auto", show_default=True, help="auto | always | never | PATH")
@click.option("--nproc-per-node", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI)")
@click.option("--experiment", default="cta", show_default=True)
@click.option("--no-env", is_flag=True, help="ignore CTA_* environment overrides")
@click.option("--summary-out", type=click.Path(dir_okay=False), help="write the result as JSON")
@click.option("--upload-to", default=None, help="s3:// prefix; rank 0 uploads the model folder")
@click.option(
    "--backend", default="local", show_default=True, type=click.Choice(["local", "kubeflow"])
)
@click.option("--image", default=None, help="kubeflow: the training image")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--gpus",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="kubeflow: GPUs per node (nvidia.com/gpu); --procs-per-node auto then starts one "
    "process per GPU",
)
@click.option("--procs-per-node", default="auto", show_default=True, help="kubeflow: N or auto")
@click.option("--namespace", default="default", show_default=True, help="kubeflow: namespace")
@click.option("--output-uri", default=None, help="kubeflow: s3:// prefix the run writes to")
@click.option("--run-id", default=None, help="kubeflow: run id (default: from config and output)")
@click.option("--s3-secret", default=None, help="kubeflow: Secret with the pods' AWS_* keys")
@click.option(
    "--mlflow-secret",
    default=None,
    help="kubeflow: Secret with the pods' MLFLOW_TRACKING_USERNAME/PASSWORD (optional keys)",
)
@click.option(
    "--deadline", default=86400.0, show_default=True, type=click.FloatRange(min=1), help="seconds"
)
@click.option(
    "--fetch-to",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="kubeflow: download and verify the model folder here",
)
def train(
    config_path,
    arch,
    tasks,
    backbone,
    data,
    output,
    epochs,
    max_steps,
    batch_size,
    lr,
    seed,
    precision,
    set_items,
    resume,
    nproc_per_node,
    tracking_uri,
    experiment,
    no_env,
    summary_out,
    upload_to,
    backend,
    image,
    nodes,
    gpus,
    procs_per_node,
    namespace,
    output_uri,
    run_id,
    s3_secret,
    mlflow_secret,
    deadline,
    fetch_to,
):
    """Train a model from a config; flags override env (CTA_*) which overrides the file.

    With --backend kubeflow the config (a path inside the pods) is trained by a Kubeflow
    TrainJob of --nodes x --gpus that writes to --output-uri; its state and logs are shown and
    --fetch-to gets the model. --data may be an s3:// dataset_ref.json (fetched first).
    """
    if backend == "kubeflow":
        local_only = {
            "--arch": arch,
            "--tasks": tasks,
            "--backbone": backbone,
            "--data": data,
            "--out": output,
            "--epochs": epochs,
            "--max-steps": max_steps,
            "--batch-size": batch_size,
            "--lr": lr,
            "--seed": seed,
            "--precision": precision,
            "--set": set_items,
            "--upload-to": upload_to,
        }
        given = [flag for flag, value in local_only.items() if value not in (None, ())]
        if given or nproc_per_node != 1:
            given += ["--nproc-per-node"] if nproc_per_node != 1 else []
            raise click.UsageError(
                f"{', '.join(given)}: not used with --backend kubeflow; put settings in the "
                "config and use --nodes/--procs-per-node"
            )
        result = _train_on_kubeflow(
            config_path,
            output_uri,
            image,
            nodes,
            gpus,
            procs_per_node,
            namespace,
            run_id,
            s3_secret,
            mlflow_secret,
            tracking_uri,
            deadline,
            fetch_to,
        )
        _emit_train_result(result, summary_out)
        return
    if gpus:
        raise click.UsageError("--gpus: only with --backend kubeflow; use --nproc-per-node here")
    if config_path and not Path(config_path).is_file():
        raise click.BadParameter(f"{config_path}: no such file", param_hint="--config")
    from components.train.step import run

    data_key = "data.dataset_ref" if data and data.endswith(".json") else "data.path"
    with _local_dataset_ref(data if data_key == "data.dataset_ref" else None) as dataset_ref:
        flags = {
            "model.arch": arch,
            "model.tasks": tasks,
            "model.backbone": backbone,
            data_key: dataset_ref or data,
            "output": output,
            "epochs": epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "optim.lr": lr,
            "seed": seed,
            "precision": precision,
            **_parse_set(set_items),
        }
        result = run(
            config_path,
            flags=flags,
            resume=resume,
            nproc_per_node=nproc_per_node,
            tracking_uri=tracking_uri,
            experiment=experiment,
            environ={} if no_env else None,
            upload_to=upload_to,
        )
    if os.environ.get("RANK", "0") == "0":
        _emit_train_result(result, summary_out)


@contextlib.contextmanager
def _local_dataset_ref(data: str | None) -> Iterator[str | None]:
    """A dataset_ref.json on S3 (how the TrainJob pods get the pipeline's) as a local file."""
    from components.storage import is_remote, read_bytes

    if not data or not is_remote(data):
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="cta-dataset-ref-") as folder:
        local = Path(folder) / "dataset_ref.json"
        local.write_bytes(read_bytes(data))
        yield str(local)


def _emit_train_result(result: dict, summary_out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if summary_out:
        # A local file or an s3:// object (the TrainJob's summary, which its launcher reads).
        from components.storage import write_bytes_atomic

        write_bytes_atomic(summary_out, text.encode())
    click.echo(text)


def _train_on_kubeflow(
    config_path,
    output_uri,
    image,
    nodes,
    gpus,
    procs_per_node,
    namespace,
    run_id,
    s3_secret,
    mlflow_secret,
    tracking_uri,
    deadline,
    fetch_to,
):
    from components.train.remote import credential_env, run_on_kubeflow
    from components.train.trainjob import TrainJobLauncher, default_api_client

    missing = [
        flag
        for flag, value in (
            ("--config", config_path),
            ("--output-uri", output_uri),
            ("--image", image),
        )
        if not value
    ]
    if missing:
        raise click.UsageError(f"--backend kubeflow needs {', '.join(missing)}")
    procs = procs_per_node if procs_per_node == "auto" else _positive_int(procs_per_node)
    spec_kwargs = {
        "namespace": namespace,
        "image": image,
        "num_nodes": nodes,
        "num_proc_per_node": procs,
        "resources": {"gpus": gpus},
    }
    if run_id:
        spec_kwargs["run_id"] = run_id
    if tracking_uri:
        spec_kwargs["env"] = {"MLFLOW_TRACKING_URI": tracking_uri}
    secret_env = credential_env(s3_secret, mlflow_secret)
    if secret_env:
        spec_kwargs["secret_env"] = secret_env
    launcher = TrainJobLauncher(default_api_client(), namespace=namespace)
    return run_on_kubeflow(
        config_path,
        output_uri,
        spec_kwargs,
        launcher=launcher,
        deadline_s=deadline,
        poll_s=10.0,
        fetch_to=fetch_to,
        log=lambda line: click.echo(line, err=True),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise click.BadParameter(f"{text!r}: expected a positive integer or auto")
    return value
