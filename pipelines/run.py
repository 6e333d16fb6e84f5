"""Compile the training pipeline, or run it on this machine through kfp.local.

``run_local`` compiles the pipeline to ``<work_dir>/kfp/training.yaml`` and runs that YAML (the
one ``cta pipeline submit`` sends to a cluster) with
``kfp.local.SubprocessRunner(use_venv=False)``: every component runs in a
subprocess of this interpreter (the project image's environment, DESIGN 6), with its artefacts
under the pipeline root ``<work_dir>/kfp``. kfp.local returns no per-task status, so the result
is read back from the run's folder: a task that ran has a folder with its
``executor_output.json`` (parameter outputs and artefact URIs) there; a task whose gate was False
has none.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from kfp import compiler

from pipelines.training import (
    EVALUATE_TASK,
    FINGERPRINT_TASK,
    GATE_TASK,
    PIPELINE_NAME,
    REGISTER_TASK,
    ROI_TASK,
    ROLLOUT_TASK,
    TRAIN_BASELINES_TASK,
    TRAIN_TASK,
    TRAIN_TRAINJOB_TASK,
    VALIDATE_TASK,
    training_pipeline,
)

#: The tasks of the training pipeline, in order (nested ones appear as flat folders). Locally
#: train_backend is "pod": train-trainjob is always skipped.
TASKS = (
    VALIDATE_TASK,
    FINGERPRINT_TASK,
    TRAIN_BASELINES_TASK,
    TRAIN_TASK,
    TRAIN_TRAINJOB_TASK,
    EVALUATE_TASK,
    ROI_TASK,
    REGISTER_TASK,
    GATE_TASK,
    ROLLOUT_TASK,
)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The strict gate and roll-out plan; the demo passes its loose, documented ones.
DEFAULT_GATE_POLICY = CONFIGS / "gate.yaml"
DEFAULT_ROLLOUT_PLAN = CONFIGS / "rollout-plan.yaml"
#: Where kfp.local keeps its outputs, under the work dir, and the compiled YAML it runs.
KFP_ROOT = "kfp"
COMPILED_NAME = "training.yaml"
_EXECUTOR_OUTPUT = "executor_output.json"


def compile_pipeline(out_path: str | os.PathLike[str]) -> Path:
    """Write the training pipeline's IR YAML to ``out_path`` (whole or not at all: compiled
    beside it, then renamed); returns the path."""
    target = Path(out_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial.yaml")
    try:
        compiler.Compiler().compile(training_pipeline, str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def run_local(
    data_uri: str,
    work_dir: str | os.PathLike[str],
    config_path: str | os.PathLike[str],
    tracking_uri: str,
    experiment: str = "cta",
    *,
    model_name: str = "cta-inspection",
    gate_policy: str | os.PathLike[str] = DEFAULT_GATE_POLICY,
    rollout_plan: str | os.PathLike[str] = DEFAULT_ROLLOUT_PLAN,
    rollout_state: str | os.PathLike[str] | None = None,
    rollout_backend: str = "local",
    roi_config: str | os.PathLike[str] | None = None,
    lines_config: str | os.PathLike[str] | None = None,
    approver: str = "",
    bootstrap_n: int = 1000,
    latency_repeats: int = 5,
    stl_baselines: bool = True,
) -> dict[str, Any]:
    """Run the training pipeline through kfp.local; returns what happened.

    ``rollout_state`` defaults to ``$CTA_ROLLOUT_STATE``, else ``<work_dir>/rollout``.

    Returns ``{"run_dir", "tasks": {task: {"state": "ran" | "skipped", "outputs": {...},
    "artifacts": {name: local path}}}}``.
    A failing task raises RuntimeError (kfp.local names the task; its log is on stdout).
    """
    from kfp import local
    from kfp.components import load_component_from_file

    work = Path(work_dir).resolve()
    kfp_root = work / KFP_ROOT
    kfp_root.mkdir(parents=True, exist_ok=True)
    # The YAML a cluster would run, not the Python function: what runs here is what ships.
    compiled = load_component_from_file(str(compile_pipeline(kfp_root / COMPILED_NAME)))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(kfp_root),
        raise_on_error=True,
    )
    before = set(kfp_root.iterdir())
    with warnings.catch_warnings():
        # The project image's name has no "python" in it, which kfp.local warns about.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        compiled(
            data_uri=str(data_uri),
            config_path=str(Path(config_path).resolve()),
            tracking_uri=tracking_uri,
            experiment=experiment,
            model_name=model_name,
            gate_policy=str(Path(gate_policy).resolve()),
            rollout_plan=str(Path(rollout_plan).resolve()),
            rollout_state=str(
                rollout_state or os.environ.get("CTA_ROLLOUT_STATE") or work / "rollout"
            ),
            rollout_backend=rollout_backend,
            roi_config=_absolute(roi_config),
            lines_config=_absolute(lines_config),
            approver=approver,
            bootstrap_n=bootstrap_n,
            latency_repeats=latency_repeats,
            stl_baselines=stl_baselines,
        )
    created = sorted(
        path
        for path in set(kfp_root.iterdir()) - before
        if path.is_dir() and path.name.startswith(f"{PIPELINE_NAME}-")
    )
    if not created:
        raise RuntimeError(f"kfp.local left no run folder under {kfp_root}")
    run_dir = created[-1]
    return {"run_dir": str(run_dir), "tasks": {task: task_result(run_dir, task) for task in TASKS}}


def _absolute(path: str | os.PathLike[str] | None) -> str:
    """An absolute path for a step, or "" for the step's shipped default."""
    return str(Path(path).resolve()) if path else ""


def task_result(run_dir: str | os.PathLike[str], task: str) -> dict[str, Any]:
    """``{"state": "ran", "outputs": {name: value}, "artifacts": {name: path}}``, or state
    "skipped" with both empty."""
    output_file = Path(run_dir) / task / _EXECUTOR_OUTPUT
    if not output_file.is_file():
        return {"state": "skipped", "outputs": {}, "artifacts": {}}
    executor_output = json.loads(output_file.read_text(encoding="utf-8"))
    artifacts = {
        name: entry["artifacts"][0]["uri"]
        for name, entry in executor_output.get("artifacts", {}).items()
        if entry.get("artifacts")
    }
    return {
        "state": "ran",
        "outputs": dict(executor_output.get("parameterValues", {})),
        "artifacts": artifacts,
    }
