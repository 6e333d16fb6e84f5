"""Overhead of the local pipeline run: `cta pipeline run --local` (kfp.local, one subprocess per
step) on tiny data, minus the steps' own work.

Rows, each in a fresh subprocess with its own work folder and sqlite MLflow store:
- `steps`: the component functions themselves (`component.python_func`, the same bodies
  kfp.local executes) called one after another in this process with the pipeline's wiring,
  each timed: validate_data -> data_fingerprint -> train_baselines -> train -> evaluate ->
  roi_report -> register_model -> gate (-> rollout), with run_local's default arguments;
- `pipeline`: `pipelines.run.run_local` end to end (wall time).
Overhead = pipeline - sum(steps): kfp.local's orchestration, one interpreter start and the
imports per step, and its input/output files. Tasks the pipeline ran that `steps` does not
time are listed (untimed_tasks) so a grown pipeline cannot hide in the overhead.

    python bench/pipeline_overhead.py [--quick]  # -> bench/results/pipeline_overhead.{json,md}
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, bench_main, markdown_table, work_dir  # noqa: E402

CONFIGS = ("steps", "pipeline")
MODEL_NAME = "cta-bench-pipeline"


def _prepare(key: str) -> dict[str, Any]:
    """Tiny data (cached), a tiny train config and an empty work folder for this row."""
    import yaml

    from cta_model.train_config import DataConfig
    from cta_model.training.datasets import ensure_synthetic_dataset

    root = ensure_synthetic_dataset(
        DataConfig(
            # 384 px scenes cut into 32 px tiles at their pitch: the lines' smallest defects
            # must span 3 px where the model looks (cta_model.inspection).
            synthetic={"lines": 2, "samples_per_line": 8, "size": 384},
            cache_dir=str(REPO_ROOT / ".cta" / "cache"),
        )
    )
    work = work_dir("pipeline_overhead") / key
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    config["model"].update(input_size=[32, 32], backbone="resnet18", output_stride=8)
    config["data"]["synthetic"] = {"lines": 2, "samples_per_line": 8, "size": 384, "seed": 0}
    config["data"]["tiling"].update(tiles_per_image=1, val_tiles_per_image=1)
    config.update(epochs=1, batch_size=4, output=str(work / "unused"))
    config_path = work / "train.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {
        "data": str(root),
        "work": work.resolve(),
        "config": str(config_path),
        "tracking_uri": f"sqlite:///{work.resolve() / 'mlflow.db'}",
    }


def run_steps(prep: dict[str, Any]) -> dict[str, float]:
    """Every step the pipeline runs, in this process, with the pipeline's wiring and arguments
    (pipelines/training.py and run_local's defaults); seconds each."""
    import os

    from kfp import dsl

    from components.evaluate.component import evaluate
    from components.gate.component import gate
    from components.register_model.component import register_model
    from components.roi_report.component import roi_report
    from components.rollout.component import rollout
    from components.train.component import train
    from components.train_baselines.component import train_baselines
    from components.validate_data.component import validate_data
    from pipelines.data_fingerprint import data_fingerprint
    from pipelines.run import DEFAULT_GATE_POLICY, DEFAULT_ROLLOUT_PLAN

    os.environ["MLFLOW_TRACKING_URI"] = prep["tracking_uri"]
    work = str(prep["work"])
    uri = prep["tracking_uri"]
    seconds: dict[str, float] = {}

    def artifact(kind: Any, name: str) -> Any:
        """An output artefact where kfp.local would put it: <task folder>/<name>."""
        return kind(name=name, uri=f"{work}/{name}")

    def timed(name: str, fn: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = fn.python_func(**kwargs)
        seconds[name] = time.perf_counter() - started
        print(f"[pipeline_overhead] {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    dataset = artifact(dsl.Dataset, "dataset")
    passed = timed(
        "validate-data",
        validate_data,
        data_uri=prep["data"],
        dataset=dataset,
        report=artifact(dsl.HTML, "validation_report"),
    )
    if not passed:
        raise RuntimeError("validate_data failed on the synthetic data")
    sha256 = timed("data-fingerprint", data_fingerprint, dataset=dataset)
    timed(
        "train-baselines",
        train_baselines,
        dataset=dataset,
        config_path=prep["config"],
        model_name=MODEL_NAME,
        tracking_uri=uri,
        baselines=artifact(dsl.Artifact, "baselines"),
    )
    model_id = timed(
        "train",
        train,
        dataset=dataset,
        config_path=prep["config"],
        tracking_uri=uri,
        data_sha256=sha256,
        model=artifact(dsl.Model, "model"),
    )
    evaluation = artifact(dsl.Artifact, "evaluation")
    timed(
        "evaluate",
        evaluate,
        model_id=model_id,
        dataset=dataset,
        tracking_uri=uri,
        model_name=MODEL_NAME,
        bootstrap_n=1000,
        latency_repeats=5,
        data_sha256=sha256,
        evaluation=evaluation,
        metrics=artifact(dsl.Metrics, "metrics"),
        confusion=artifact(dsl.ClassificationMetrics, "confusion"),
    )
    roi = artifact(dsl.Artifact, "roi")
    timed(
        "roi-report",
        roi_report,
        evaluation=evaluation,
        data_sha256=sha256,
        roi=roi,
        report=artifact(dsl.HTML, "roi_report.html"),
        summary=artifact(dsl.Markdown, "roi_report.md"),
    )
    version = timed(
        "register-model",
        register_model,
        model_id=model_id,
        model_name=MODEL_NAME,
        tracking_uri=uri,
        evaluation=evaluation,
        dataset=dataset,
        roi=roi,
    )
    verdict = timed(
        "gate",
        gate,
        model_name=MODEL_NAME,
        version=version,
        policy_path=str(DEFAULT_GATE_POLICY),
        tracking_uri=uri,
        approver="",
    )
    if verdict == "pass":
        timed(
            "rollout",
            rollout,
            model_name=MODEL_NAME,
            version=version,
            plan=str(DEFAULT_ROLLOUT_PLAN),
            data=prep["data"],
            state=f"{work}/rollout",
            tracking_uri=uri,
            backend="local",
        )
    return seconds


def measure(key: str) -> dict[str, Any]:
    prep = _prepare(key)
    started = time.perf_counter()
    if key == "steps":
        seconds = run_steps(prep)
        return {
            "config": key,
            "total_s": time.perf_counter() - started,
            "steps_s": seconds,
            "timed_tasks": list(seconds),
        }
    from pipelines.run import run_local

    result = run_local(
        prep["data"],
        prep["work"],
        prep["config"],
        prep["tracking_uri"],
        experiment="cta",
        model_name=MODEL_NAME,
    )
    return {
        "config": key,
        "total_s": time.perf_counter() - started,
        "tasks": {task: entry["state"] for task, entry in result["tasks"].items()},
    }


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    by_key = {r["config"]: r for r in rows}
    steps, pipeline = by_key["steps"], by_key["pipeline"]
    work = sum(steps["steps_s"].values())
    ran = [task for task, state in pipeline["tasks"].items() if state == "ran"]
    untimed = sorted(set(ran) - set(steps["timed_tasks"]))
    overhead = pipeline["total_s"] - work
    ratios = {
        "pipeline_total_s": pipeline["total_s"],
        "steps_total_s": work,
        "overhead_s": overhead,
        "overhead_per_step_s": overhead / max(len(ran), 1),
        "pipeline_over_steps": pipeline["total_s"] / work,
        "untimed_tasks": untimed,
    }
    table = [{"step": name, "own work s": value} for name, value in steps["steps_s"].items()]
    table += [
        {"step": "sum of the steps", "own work s": work},
        {"step": "pipeline run --local (total)", "own work s": pipeline["total_s"]},
        {"step": "overhead (total - steps)", "own work s": overhead},
    ]
    markdown = (
        "## Pipeline overhead, kfp.local on tiny data "
        "(2 lines x 8 scenes of 384 px, 32 px tiles, 1 epoch)\n\n"
        + markdown_table(table, ["step", "own work s"])
        + f"\nPipeline/steps {ratios['pipeline_over_steps']:.2f}x; "
        f"{ratios['overhead_per_step_s']:.1f} s overhead per step ({len(ran)} steps ran)."
        + (f" Not timed as steps: {', '.join(untimed)}." if untimed else "")
        + "\n"
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("pipeline_overhead", Path(__file__), list(CONFIGS), measure, summarise)
