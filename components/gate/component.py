"""KFP wrapper of the gate step: only calls components.gate.step.run().

Returns the verdict as the task's single str output ("pass", "fail" or "pending_approval") so
that a pipeline can gate later steps on it (DESIGN 6.2: never a NamedTuple for a dsl.If).
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def gate(
    model_name: str, version: str, policy_path: str, tracking_uri: str, approver: str = ""
) -> str:
    """Gate one registered version (``policy_path`` "" = the shipped strict configs/gate.yaml);
    returns its verdict."""
    from components.gate.policy import DEFAULT_POLICY
    from components.gate.step import run
    from components.logs import configure_logging

    configure_logging()
    result = run(
        model_name,
        version,
        policy_path or str(DEFAULT_POLICY),
        tracking_uri=tracking_uri or None,
        approver=approver or None,
    )
    return str(result["verdict"])
