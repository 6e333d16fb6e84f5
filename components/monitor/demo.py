"""The demo's monitoring step (issue 10): serve the champion on every line of the demo data,
replay each line's `qa` split through its server (one line under brighter light), then run
`cta monitor` per line and print which lines drifted.

    python -m components.monitor.demo --data DIR --tracking-uri URI --out DIR [--relit LINE]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_BRIGHTNESS = 1.6
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "monitor-demo.yaml"


def _model_uri(model_name: str, tracking_uri: str) -> str:
    """The champion, else the newest completely registered version."""
    from mlflow.exceptions import MlflowException

    from components.registry.client import mlflow_client
    from components.registry.names import CHAMPION_ALIAS, alias_uri, version_uri
    from components.registry.versions import complete_versions

    client = mlflow_client(tracking_uri)
    try:
        client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
        return alias_uri(model_name, CHAMPION_ALIAS)
    except MlflowException:
        versions = complete_versions(client, model_name)
        if not versions:
            raise SystemExit(f"no complete version of {model_name} in {tracking_uri}") from None
        newest = max(versions, key=lambda v: int(v.version))
        return version_uri(model_name, newest.version)


def main(argv: list[str] | None = None) -> int:
    from components.monitor.replay import replay_qa
    from components.monitor.step import run
    from components.serve.process import start_server
    from cta_model.data.line_dataset import LineDataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model-name", default="cta-inspection")
    parser.add_argument("--relit", default=None, help="line replayed under brighter light")
    parser.add_argument("--brightness", type=float, default=DEFAULT_BRIGHTNESS)
    args = parser.parse_args(argv)

    line_ids = LineDataset(args.data, split="qa").line_ids
    relit = args.relit or line_ids[-1]
    model_uri = _model_uri(args.model_name, args.tracking_uri)
    stats_dir = args.out / "serving-stats" / time.strftime("%Y%m%dT%H%M%S")
    print(f"monitoring: serving {model_uri} on {', '.join(line_ids)}; {relit} relit", flush=True)
    servers = {}

    def start(line_id: str) -> None:
        servers[line_id] = start_server(
            model_uri,
            line=line_id,
            tracking_uri=args.tracking_uri,
            stats_dir=str(stats_dir),
            stats_window_s=1,
            log_path=args.out / f"serve-{line_id}.log",
        )

    try:
        # Started side by side: each spends its few seconds importing and loading the model.
        with ThreadPoolExecutor(max_workers=len(line_ids)) as pool:
            for started in [pool.submit(start, line_id) for line_id in line_ids]:
                started.result()  # a server that failed to start raises here
        for line_id in line_ids:
            server = servers[line_id]
            brightness = args.brightness if line_id == relit else 1.0
            replay_qa(server.url, args.data, line_id, brightness=brightness)
        time.sleep(2.5)  # the servers close their statistics windows
    finally:
        for server in servers.values():
            server.stop()
    flagged = []
    for line_id in line_ids:
        report = run(
            line_id,
            stats_dir,
            args.out / line_id,
            model_uri=model_uri,
            tracking_uri=args.tracking_uri,
            config_path=DEMO_CONFIG,
        )
        mark = "DRIFT" if report["drifted"] else "ok   "
        print(f"  {mark} {line_id}: {report['summary']}", flush=True)
        print(f"        report: {args.out / line_id / 'monitor.html'}", flush=True)
        if report["drifted"]:
            flagged.append(line_id)
    print(f"monitoring: flagged {', '.join(flagged) or 'no line'} (relit: {relit})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
