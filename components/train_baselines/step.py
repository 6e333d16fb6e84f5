"""The train_baselines step: single-task (STL) baselines for Delta_m, only where missing.

For each task of the multi-task config, ``<model>-stl-<task>`` is looked up in the registry
(``components.evaluate.references.matching_baseline``: alias ``baseline``, a complete
registration, tags ``cta.data_manifest_sha256`` = the validated data's and ``cta.split`` = the
split it was trained on). Each missing one is trained with the same config and data, overridden
to ``model.arch=stl, model.tasks=[task]`` (``components.train.step.run``), then registered with
``components.register_model.step.run(..., alias="baseline")`` and tagged ``cta.split``. Re-runs
train nothing once every baseline matches (DESIGN 5.3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.registry.client import mlflow_client, resolve_tracking_uri
from components.registry.names import BASELINE_ALIAS, TAG_SPLIT, baseline_name
from cta_model.errors import ConfigError

TRAIN_SPLIT = "train"
SUMMARY_NAME = "train_baselines.json"


def missing_baselines(
    model_name: str,
    tasks: Sequence[str],
    manifest_sha256: str,
    split: str = TRAIN_SPLIT,
    tracking_uri: str | None = None,
) -> list[str]:
    """The tasks without a matching registered STL baseline, in the order given."""
    from components.evaluate.references import matching_baseline

    client = mlflow_client(tracking_uri)
    return [
        task
        for task in tasks
        if matching_baseline(client, model_name, task, manifest_sha256, split) is None
    ]


def _stl_overrides(config: Any, task: str) -> dict[str, Any]:
    """Flags turning the multi-task config into the task's STL config."""
    from cta_model.tasks import metric_directions
    from cta_model.train_config import VAL_LOSS

    flags: dict[str, Any] = {"model.arch": "stl", "model.tasks": [task]}
    if config.loss.weights:
        flags["loss.weights"] = {k: v for k, v in config.loss.weights.items() if k == task}
    metric = config.early_stopping.metric
    if metric != VAL_LOSS and metric not in metric_directions([task]):
        flags["early_stopping.metric"] = VAL_LOSS  # another task's metric: not in this model
    return flags


def config_tasks(config_path: str) -> tuple[str, ...]:
    from cta_model.train_config import load_train_config

    return tuple(load_train_config(config_path).model.tasks)


def run(
    config_path: str,
    dataset_ref: str,
    model_name: str,
    out_dir: str,
    *,
    tasks: Sequence[str] | None = None,
    split: str = TRAIN_SPLIT,
    tracking_uri: str | None = None,
    experiment: str = "cta",
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and register the missing baselines; returns {trained: {task: {...}}, reused: [...]}.

    ``tasks``: default the config's ``model.tasks``. ``flags``: extra dotted overrides for every
    baseline (e.g. ``{"max_steps": 2}``); CTA_* environment overrides are ignored.
    """
    from components.artifacts import read_json, write_json_atomic
    from components.register_model.step import run as register
    from components.train.step import run as train
    from cta_model.train_config import load_train_config

    if not model_name:
        raise ConfigError("model_name is empty")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    ref = read_json(dataset_ref, "dataset_ref")
    base_flags = {**(flags or {}), "data.dataset_ref": str(dataset_ref)}
    config = load_train_config(config_path, base_flags)
    wanted = tuple(tasks) if tasks else tuple(config.model.tasks)
    missing = missing_baselines(model_name, wanted, ref["manifest_sha256"], split, tracking_uri)
    trained: dict[str, Any] = {}
    for task in missing:
        name = baseline_name(model_name, task)
        print(f"train_baselines: training {name}", flush=True)
        summary = train(
            config_path,
            flags={
                **base_flags,
                **_stl_overrides(config, task),
                "output": str(Path(out_dir) / f"stl-{task}"),
            },
            tracking_uri=tracking_uri,
            experiment=experiment,
            run_name=f"stl-{task}",
            environ={},
        )
        if not summary.get("model_id"):
            raise ConfigError(f"training {name} logged no model (no model_id)")
        registered = register(
            summary["model_id"],
            name,
            dataset_ref=dataset_ref,
            tracking_uri=tracking_uri,
            alias=BASELINE_ALIAS,
            # Before `cta.registration=complete`, so a complete baseline always carries it.
            extra_tags={TAG_SPLIT: split},
        )
        trained[task] = {
            "name": name,
            "version": registered["version"],
            "model_id": summary["model_id"],
        }
    result = {
        "model_name": model_name,
        "manifest_sha256": ref["manifest_sha256"],
        "split": split,
        "trained": trained,
        "reused": [task for task in wanted if task not in missing],
    }
    write_json_atomic(Path(out_dir) / SUMMARY_NAME, result)
    return result


__all__ = ["SUMMARY_NAME", "TRAIN_SPLIT", "config_tasks", "missing_baselines", "run"]
