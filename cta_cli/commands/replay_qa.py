"""`cta replay-qa`: send a line's qa split through its server (optionally relit) with
components.monitor.replay.replay_qa() and print QA agreement."""

from __future__ import annotations

import json

import click


@click.command("replay-qa")
@click.option("--server", "server_url", required=True, help="line server URL")
@click.option("--data", "data_uri", required=True, help="line dataset with a qa split")
@click.option("--line", "line_id", required=True)
@click.option("--brightness", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1))
def replay_qa(server_url, data_uri, line_id, brightness, repeat):
    """Send LINE's qa images to its server (x brightness) and print QA agreement as JSON."""
    from components.monitor import replay

    result = replay.replay_qa(server_url, data_uri, line_id, brightness=brightness, repeat=repeat)
    click.echo(json.dumps(result, indent=2))
