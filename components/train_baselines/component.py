"""KFP wrappers of the train_baselines step (DESIGN 5.3): a gate and the training.

``baselines_needed`` has ONE output (a bool) so that a ``dsl.If`` on it works under kfp.local
(a condition on a NamedTuple output is silently False there, DESIGN 6.2). ``train_baselines``
trains and registers the missing ``<model>-stl-<task>`` baselines and returns the path of its
summary JSON.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def baselines_needed(
    dataset_ref: str, config_path: str, model_name: str, tracking_uri: str, enabled: bool = True
) -> bool:
    """True when any task of the config has no matching registered STL baseline (always False
    when ``enabled`` is off: Delta_m then stays null with its reason)."""
    from components.artifacts import read_json
    from components.train_baselines.step import config_tasks, missing_baselines

    if not enabled:
        print("STL baselines: not trained (train_baselines off); Delta_m needs them", flush=True)
        return False

    ref = read_json(dataset_ref, "dataset_ref")
    missing = missing_baselines(
        model_name,
        config_tasks(config_path),
        ref["manifest_sha256"],
        tracking_uri=tracking_uri or None,
    )
    print(f"baselines missing for: {', '.join(missing) or 'none'}", flush=True)
    return bool(missing)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_baselines(
    dataset_ref: str,
    config_path: str,
    out_dir: str,
    model_name: str,
    tracking_uri: str,
    experiment: str = "cta",
) -> str:
    """Train and register the missing STL baselines; returns the summary JSON path."""
    from pathlib import Path

    from components.train_baselines.step import SUMMARY_NAME, run

    run(
        config_path,
        dataset_ref,
        model_name,
        out_dir,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
    )
    return str(Path(out_dir) / SUMMARY_NAME)
