"""`cta model summary` and `cta model export`: size and cost of an architecture, export for
deployment (components.export.run())."""

from __future__ import annotations

import json
from pathlib import Path

import click

# Choices are spelled out so `cta --help` does not import torch; a test keeps them equal to
# the registries.
ARCH_CHOICES = ["stl", "hps", "hps-light", "ctal"]
BACKBONE_CHOICES = ["resnet18", "resnet34", "resnet50", "hrnet-w18-small-v2"]
AFFINITY_MODE_CHOICES = ["auto", "dense", "blocked", "linear", "pooled"]


@click.group("model")
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
@click.option(
    "--affinity-mode",
    default="auto",
    show_default=True,
    type=click.Choice(AFFINITY_MODE_CHOICES),
    help="how CTAL computes its block; FLOPs are those of the mode that runs",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON with keys params and flops")
def model_summary_command(
    arch, backbone, tasks, height, width, num_classes, output_stride, affinity_mode, as_json
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
        affinity_mode=affinity_mode,
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
    if summary["affinity_mode"]:
        click.echo(f"affinity block counted in mode {summary['affinity_mode']}")
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
    from components.export import run

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
