"""The `cta` command line. Commands only parse flags and call library or step functions.

Pipeline step commands carry the step's name with hyphens (cta validate-data, train, ...); they
are added by the issues that build those steps. Utilities live in groups (cta data, cta model).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from components.gate.cli import gate
from components.model_card.cli import model_card
from components.monitor.cli import monitor, replay_qa_command
from components.retrain.cli import retrain
from components.roi_report.cli import roi_report
from components.rollout.cli import rollout
from components.serve.cli import serve
from components.steps_cli import evaluate, register_model
from cta_model.errors import CtaError
from pipelines.cli import pipeline


class _CtaGroup(click.Group):
    """Turns the package's own errors into one clear line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CtaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_CtaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cta")
def main() -> None:
    """Multitask visual-inspection models with Cross-Task Affinity Learning."""


# ------------------------------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Datasets: generate the synthetic line dataset."""


@data.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--lines", "n_lines", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--samples-per-line", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--lines-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="fleet inventory (default: configs/lines.yaml)",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--overwrite", is_flag=True, help="replace an existing dataset in --out")
def data_generate(out_dir, n_lines, samples_per_line, size, seed, lines_config, workers, overwrite):
    """Write the synthetic line dataset (train/val/test/qa) for the first N lines."""
    from cta_model.data.line_dataset import generate_dataset

    root = generate_dataset(
        out_dir,
        lines_config,
        n_lines=n_lines,
        samples_per_line=samples_per_line,
        height=size,
        width=size,
        seed=seed,
        workers=workers,
        overwrite=overwrite,
    )
    click.echo(f"wrote {n_lines * samples_per_line} samples to {root}")


# ------------------------------------------------------------------------------ pipeline steps
@main.command("validate-data")
@click.argument("data")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--lines-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="fleet inventory (default: configs/lines.yaml)",
)
@click.option(
    "--quarantine",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="sample ids to exclude knowingly: one per line (# comments) or a JSON list",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="processes that read samples",
)
def validate_data_command(data, out_dir, lines_config, quarantine, workers):
    """Validate the line dataset DATA (folder or s3:// prefix); write report and dataset_ref.

    Exit 0 when every expectation holds, 1 when validation fails (bad samples and failed
    expectations on stderr), 2 for unusable input (no manifest, unknown quarantined id, ...).
    """
    from components.validate_data.step import REPORT_NAME, ValidationFailed, run

    try:
        dataset_ref = run(
            data,
            str(out_dir),
            lines_config=str(lines_config) if lines_config else None,
            quarantine=str(quarantine) if quarantine else None,
            workers=workers,
        )
    except ValidationFailed as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    quarantined = len(dataset_ref["quarantine"])
    note = f" ({quarantined} sample(s) quarantined)" if quarantined else ""
    click.echo(f"data validation passed{note}: {dataset_ref['uri']}")
    click.echo(f"report: {out_dir / REPORT_NAME}")


def _parse_set(items: tuple[str, ...]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE (e.g. optim.lr=1e-4)")
        overrides[key] = yaml.safe_load(value)
    return overrides


@main.command("train")
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
@click.option("--procs-per-node", default="auto", show_default=True, help="kubeflow: N or auto")
@click.option("--namespace", default="default", show_default=True, help="kubeflow: namespace")
@click.option("--output-uri", default=None, help="kubeflow: s3:// prefix the run writes to")
@click.option("--run-id", default=None, help="kubeflow: run id (default: from config and output)")
@click.option("--s3-secret", default=None, help="kubeflow: Secret with the pods' AWS_* keys")
@click.option(
    "--deadline", default=86400.0, show_default=True, type=click.FloatRange(min=1), help="seconds"
)
@click.option(
    "--fetch-to",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="kubeflow: download and verify the model folder here",
)
def train_command(
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
    procs_per_node,
    namespace,
    output_uri,
    run_id,
    s3_secret,
    deadline,
    fetch_to,
):
    """Train a model from a config; flags override env (CTA_*) which overrides the file.

    With --backend kubeflow the config (a path inside the pods) is trained by a Kubeflow
    TrainJob that writes to --output-uri; its logs are shown and --fetch-to gets the model.
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
            "--tracking-uri": tracking_uri,
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
            procs_per_node,
            namespace,
            run_id,
            s3_secret,
            deadline,
            fetch_to,
        )
        _emit_train_result(result, summary_out)
        return
    if config_path and not Path(config_path).is_file():
        raise click.BadParameter(f"{config_path}: no such file", param_hint="--config")
    from components.train.step import run

    data_key = "data.dataset_ref" if data and data.endswith(".json") else "data.path"
    flags = {
        "model.arch": arch,
        "model.tasks": tasks,
        "model.backbone": backbone,
        data_key: data,
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


def _emit_train_result(result: dict, summary_out: str | None) -> None:
    if summary_out:
        from components.artifacts import write_json_atomic

        write_json_atomic(summary_out, result)
    click.echo(json.dumps(result, indent=2))


def _train_on_kubeflow(
    config_path,
    output_uri,
    image,
    nodes,
    procs_per_node,
    namespace,
    run_id,
    s3_secret,
    deadline,
    fetch_to,
):
    from components.train.remote import run_on_kubeflow
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
    }
    if run_id:
        spec_kwargs["run_id"] = run_id
    if s3_secret:
        spec_kwargs["secret_env"] = {
            "AWS_ACCESS_KEY_ID": s3_secret,
            "AWS_SECRET_ACCESS_KEY": s3_secret,
        }
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


# ------------------------------------------------------------------------------------ model
# Choices are spelled out so `cta --help` does not import torch; a test keeps them equal to
# the registries.
ARCH_CHOICES = ["stl", "hps", "hps-light", "ctal"]
BACKBONE_CHOICES = ["resnet18", "resnet34", "resnet50", "hrnet-w18-small-v2"]


@main.group()
def model() -> None:
    """Model utilities: size and cost of an architecture, export for deployment."""


@model.command("summary")
@click.option("--arch", required=True, type=click.Choice(ARCH_CHOICES))
@click.option(
    "--backbone",
    default="hrnet-w18-small-v2",
    show_default=True,
    type=click.Choice(BACKBONE_CHOICES),
)
@click.option("--tasks", default="semseg,height,normals", show_default=True)
@click.option("--height", default=288, show_default=True, type=click.IntRange(min=8))
@click.option("--width", default=384, show_default=True, type=click.IntRange(min=8))
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(min=2))
@click.option("--output-stride", default=None, type=click.Choice(["8", "16", "32"]))
@click.option("--json", "as_json", is_flag=True, help="print JSON with keys params and flops")
def model_summary_command(
    arch, backbone, tasks, height, width, num_classes, output_stride, as_json
):
    """Total and per-module parameters and forward FLOPs (batch 1)."""
    from cta_model.nn.models import ModelSpec, build_model
    from cta_model.nn.summary import model_summary

    spec = ModelSpec(
        arch=arch,
        tasks=tasks,
        input_size=(height, width),
        backbone=backbone,
        num_classes=num_classes,
        output_stride=int(output_stride) if output_stride else None,
    )
    summary = {
        "arch": arch,
        "backbone": backbone,
        "tasks": list(spec.tasks),
        "input_size": [height, width],
        **model_summary(build_model(spec), (height, width)),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{arch} / {backbone} / {','.join(spec.tasks)} at {height}x{width}")
    click.echo(f"{'module':<20}{'params':>14}{'GFLOPs':>12}")
    for name, params in summary["params"]["per_module"].items():
        gflops = summary["flops"]["per_module"][name] / 1e9
        click.echo(f"{name:<20}{params:>14,}{gflops:>12.2f}")
    total_gflops = summary["flops"]["total"] / 1e9
    click.echo(f"{'total':<20}{summary['params']['total']:>14,}{total_gflops:>12.2f}")


@model.command("export")
@click.option("--model", "model_uri", required=True, help="model folder or models:/NAME/<v>|@alias")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "formats",
    default="pt2,onnx,int8",
    show_default=True,
    help="comma-separated: pt2 (torch.export), onnx (fp32), int8 (static PTQ, needs --calib-data)",
)
@click.option(
    "--calib-data", default=None, help="line dataset (folder, s3://, dataset_ref.json); train split"
)
@click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for a models:/ --model")
@click.option("--overwrite", is_flag=True, help="replace an existing --out folder")
def model_export_command(
    model_uri, out_dir, formats, calib_data, calib_samples, tracking_uri, overwrite
):
    """Export to torch.export (.pt2), ONNX and int8 ONNX; writes export.json beside them."""
    from components.export_cli import run

    result = run(
        model_uri,
        out_dir,
        formats,
        calib_data,
        calib_samples,
        overwrite=overwrite,
        tracking_uri=tracking_uri,
    )
    for fmt, errors in result["max_abs_error_vs_eager"].items():
        worst = ", ".join(f"{task} {value:.2e}" for task, value in errors.items())
        click.echo(f"{fmt}: max abs error vs eager: {worst}")
    if result["quantized_layers"] is not None:
        click.echo(f"int8: {len(result['quantized_layers'])} layers quantized (quantization.json)")
    click.echo(f"wrote {out_dir}/export.json")


main.add_command(pipeline)
main.add_command(evaluate)
main.add_command(register_model)
main.add_command(roi_report)
main.add_command(gate)
main.add_command(model_card)
main.add_command(serve)
main.add_command(rollout)
main.add_command(monitor)
main.add_command(replay_qa_command)
main.add_command(retrain)

if __name__ == "__main__":
    main()
