"""The `cta` group: every command of cta_cli/commands/ added to it, and the package's own
errors turned into one line and exit code 2.

Command modules import their libraries inside the command, so ``cta --help`` (and a line
server started as ``python -m cta_cli serve``) loads neither torch nor kfp nor pipelines/.
"""

from __future__ import annotations

import sys

import click

from cta_cli.commands.data import data
from cta_cli.commands.evaluate import evaluate
from cta_cli.commands.gate import gate
from cta_cli.commands.model import model
from cta_cli.commands.model_card import model_card
from cta_cli.commands.monitor import monitor
from cta_cli.commands.pipeline import pipeline
from cta_cli.commands.register_model import register_model
from cta_cli.commands.replay_qa import replay_qa
from cta_cli.commands.retrain import retrain
from cta_cli.commands.roi_report import roi_report
from cta_cli.commands.rollout import rollout
from cta_cli.commands.serve import serve
from cta_cli.commands.train import train
from cta_cli.commands.validate_data import validate_data
from cta_model.errors import CtaError


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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="CTA_LOG_FORMAT",
    default="text",
    show_default=True,
    help="Log lines on stderr as text or as one JSON object per line (env CTA_LOG_FORMAT).",
)
def main(log_format: str) -> None:
    """Multitask visual-inspection models with Cross-Task Affinity Learning."""
    from components.logs import configure_logging

    configure_logging(log_format)


for command in (
    data,
    validate_data,
    train,
    evaluate,
    roi_report,
    register_model,
    gate,
    model_card,
    serve,
    rollout,
    monitor,
    replay_qa,
    retrain,
    pipeline,
    model,
):
    main.add_command(command)
