"""KFP wrapper of the train_baselines step (DESIGN 5.3): trains and registers the missing
``<model>-stl-<task>`` baselines, and only those.

One task that always runs: it asks the registry itself and returns at once when every baseline
matches the data (or ``enabled`` is off: Delta_m then stays null with its reason). A separate
gate task with ``dsl.If`` would need a sub-pipeline for evaluate to wait on, and kfp.local passes
no artefact into a sub-pipeline (kfp 2.17.3). Its ``baselines`` artefact is a folder with the
summary ``train_baselines.json`` ({model_name, manifest_sha256, split, trained, reused}, plus
``disabled: true`` when off) and the baselines' training folders.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_baselines(
    dataset: dsl.Input[dsl.Dataset],
    config_path: str,
    model_name: str,
    tracking_uri: str,
    experiment: str = "cta",
    enabled: bool = True,
    lines_config: str = "",
    baselines: dsl.Output[dsl.Artifact] = None,
) -> str:
    """Train what is missing; returns the tasks trained, comma-separated ("" when none)."""
    import os
    from pathlib import Path

    from components.artifacts import write_json_atomic
    from components.logs import configure_logging
    from components.train_baselines.step import SUMMARY_NAME, run
    from cta_model.data.dataset_ref import dataset_ref_in

    configure_logging()
    if lines_config:  # the fleet inventory of this process and its training runs
        os.environ["CTA_LINES_CONFIG"] = lines_config
    if not enabled:
        print("STL baselines: not trained (train_baselines off); Delta_m needs them", flush=True)
        write_json_atomic(Path(baselines.path) / SUMMARY_NAME, {"disabled": True})
        return ""
    summary = run(
        config_path,
        dataset_ref_in(dataset.path),
        model_name,
        baselines.path,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
    )
    trained = sorted(summary["trained"])
    print(
        f"STL baselines trained: {', '.join(trained) or 'none'}; "
        f"reused: {', '.join(summary['reused']) or 'none'}",
        flush=True,
    )
    return ",".join(trained)
