"""KFP wrapper of the register_model step: only calls components.register_model.step.run().

Registers the LoggedModel ``model_id`` under ``model_name`` with its evaluation, dataset_ref and
(when ``roi`` is a path; "" for none) roi.json attached, alias ``challenger``, and
``cta.registration=complete`` last; returns the version.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_model(
    model_id: str,
    model_name: str,
    evaluation: str,
    dataset_ref: str,
    tracking_uri: str,
    roi: str = "",
) -> str:
    """Register one model version; returns its version number as a string."""
    from components.register_model.step import run

    result = run(
        model_id,
        model_name,
        evaluation=evaluation,
        dataset_ref=dataset_ref,
        tracking_uri=tracking_uri or None,
        roi=roi or None,
    )
    return str(result["version"])
