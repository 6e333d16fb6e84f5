"""KFP wrapper of the register_model step: only calls components.register_model.step.run().

Registers the LoggedModel ``model_id`` under ``model_name`` with the evaluation.json of the
``evaluation`` artefact, the dataset_ref.json of the ``dataset`` artefact and the roi.json of the
``roi`` artefact attached, alias ``challenger``, and ``cta.registration=complete`` last; returns
the version.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_model(
    model_id: str,
    model_name: str,
    tracking_uri: str,
    evaluation: dsl.Input[dsl.Artifact],
    dataset: dsl.Input[dsl.Dataset],
    roi: dsl.Input[dsl.Artifact],
) -> str:
    """Register one model version; returns its version number as a string."""
    from pathlib import Path

    from components.evaluate.step import EVALUATION_NAME
    from components.logs import configure_logging
    from components.register_model.step import run
    from components.roi_report.step import ROI_NAME
    from cta_model.data.dataset_ref import dataset_ref_in

    configure_logging()
    result = run(
        model_id,
        model_name,
        evaluation=str(Path(evaluation.path) / EVALUATION_NAME),
        dataset_ref=dataset_ref_in(dataset.path),
        tracking_uri=tracking_uri or None,
        roi=str(Path(roi.path) / ROI_NAME),
    )
    return str(result["version"])
