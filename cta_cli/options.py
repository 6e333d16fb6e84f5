"""Options several `cta` commands share, defined once so their flag, type and help agree."""

from __future__ import annotations

from pathlib import Path

import click

LINES_CONFIG_HELP = "fleet inventory (default: $CTA_LINES_CONFIG, else configs/lines.yaml)"


def lines_config_option(help: str = LINES_CONFIG_HELP):  # noqa: A002 (click's own name)
    """`--lines-config PATH`: the fleet inventory (configs/lines.yaml layout); None when not
    given, so the command falls back to $CTA_LINES_CONFIG, then the shipped file."""
    return click.option(
        "--lines-config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=help,
    )
