"""`cta gate`: flag parsing only; calls components.gate.step.run().

Exit codes: 0 pass, 3 fail, 4 pending_approval (2 is the `cta` group's code for bad input).
Prints every check as a table, then the verdict as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

EXIT_CODES = {"pass": 0, "fail": 3, "pending_approval": 4}


def _cell(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_checks(checks: list[dict]) -> str:
    """The checks as a fixed-width text table: result, name, value, threshold, detail."""
    rows = [("result", "check", "value", "threshold", "detail")]
    rows += [
        (
            "PASS" if c["passed"] else "FAIL",
            c["name"],
            _cell(c["value"]),
            _cell(c["threshold"]),
            c["detail"],
        )
        for c in checks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    )


@click.command("gate")
@click.option("--model-name", required=True, help="registered model name")
@click.option("--version", required=True, help="registered version to gate")
@click.option(
    "--policy",
    "policy_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="gate policy YAML (configs/gate.yaml)",
)
@click.option("--approver", default=None, help="name of the person approving (recorded)")
@click.option("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI)")
def gate(model_name, version, policy_path, approver, tracking_uri):
    """Decide whether a registered version becomes champion; record the verdict."""
    from components.gate.step import run

    result = run(model_name, version, policy_path, tracking_uri=tracking_uri, approver=approver)
    click.echo(format_checks(result["checks"]))
    moved = ", champion moved" if result["champion_moved"] else ""
    known = "" if result["written"] else " (recorded before; nothing changed)"
    click.echo(f"verdict: {result['verdict']} for {model_name} version {version}{moved}{known}")
    click.echo(json.dumps(result, indent=2))
    sys.exit(EXIT_CODES[result["verdict"]])
