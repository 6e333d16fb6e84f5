"""The train step: resolve the config (flag > env > file), train with MLflow tracking, return
where the model folder and the logged model are. Does not register (register-model does)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cta_model.config import read_yaml
from cta_model.errors import ConfigError, CtaError
from cta_model.train_config import TrainConfig, load_train_config, resolve_overrides


def resolve_config(
    config_path: str | None, flags: Mapping[str, Any], environ: Mapping[str, str]
) -> TrainConfig:
    return load_train_config(config_path, resolve_overrides(flags, environ))


def run(
    config_path: str | None,
    *,
    flags: Mapping[str, Any] | None = None,
    resume: str = "auto",
    nproc_per_node: int = 1,
    tracking_uri: str | None = None,
    experiment: str = "cta",
    run_name: str | None = None,
    environ: Mapping[str, str] | None = None,
    upload_to: str | None = None,
) -> dict[str, Any]:
    """Train one model; returns {model_dir, model_id, run_id, best_metrics, best_epoch}.

    environ: where CTA_* overrides come from (default os.environ; {} ignores them).
    upload_to: an s3:// prefix; rank 0 uploads the model folder there after training (SHA256SUMS
    last, so a reader that finds it finds the whole folder) and adds ``uploaded_to``.
    """
    from components.storage import is_remote

    if upload_to is not None and not is_remote(upload_to):
        raise ConfigError(f"upload_to {upload_to!r} must be an s3:// prefix")
    config = resolve_config(config_path, flags or {}, os.environ if environ is None else environ)
    # Under torchrun (RANK set) every process trains; otherwise N > 1 means launch torchrun.
    if nproc_per_node > 1 and "RANK" not in os.environ:
        return _run_under_torchrun(
            config, nproc_per_node, resume, tracking_uri, experiment, upload_to
        )

    # Imported here: mlflow and torch are slow to import and `cta --help` must stay fast.
    from components.storage import opener_for
    from components.train.tracking import MlflowTracker
    from cta_model.training import train

    tracker = MlflowTracker(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name or f"{config.model.arch}-{Path(config.output).name}",
        config=config.model_dump(mode="json"),
        lineage={},
        run_folder=config.output,  # a resumed training ends or links the run it continues
    )
    with tracker:
        result = train(config, callbacks=[tracker], resume=resume, opener_for=opener_for)
    summary = {
        "model_dir": str(result.model_dir),
        "model_id": getattr(tracker.model_info, "model_id", None),
        "run_id": tracker.run_id,
        # JSON has no NaN: a metric without valid pixels (e.g. no label on val) is null.
        "best_metrics": {
            k: (v if math.isfinite(v) else None) for k, v in result.best_metrics.items()
        },
        "best_epoch": result.best_epoch,
    }
    if upload_to is not None and os.environ.get("RANK", "0") == "0":
        summary["uploaded_to"] = upload_model_folder(result.model_dir, upload_to)
    return summary


def upload_model_folder(model_dir: str | Path, uri: str) -> str:
    """Upload a model folder to ``uri`` with its SHA256SUMS last; returns ``uri``."""
    from components.storage import upload_tree
    from cta_model.model_folder import CHECKSUMS

    upload_tree(model_dir, uri, last=(CHECKSUMS,))
    return uri.rstrip("/")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_under_torchrun(
    config: TrainConfig,
    nproc_per_node: int,
    resume: str,
    tracking_uri: str | None,
    experiment: str,
    upload_to: str | None = None,
) -> dict[str, Any]:
    """Re-launch `cta train` under torchrun with the resolved config (no env re-applied)."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    resolved = output / "resolved-config.yaml"
    resolved.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    summary = output / "train-step.json"
    torchrun = Path(sys.prefix) / "bin" / "torchrun"
    command = [
        str(torchrun),
        f"--nproc_per_node={nproc_per_node}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_loopback_port()}",
        "-m",
        "cta_cli",
        "train",
        "--config",
        str(resolved),
        "--no-env",
        "--resume",
        resume,
        "--experiment",
        experiment,
        "--summary-out",
        str(summary),
    ]
    if tracking_uri:
        command += ["--tracking-uri", tracking_uri]
    if upload_to:
        command += ["--upload-to", upload_to]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise CtaError(f"torchrun with {nproc_per_node} processes failed ({completed.returncode})")
    return read_yaml(summary)
