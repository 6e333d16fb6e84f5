"""KFP wrapper of the rollout step: only calls components.rollout.step.run().

Starts wave 1 of ``plan`` for ``model_name`` version ``version`` (the pilot line, by the plan's
convention) and returns one string: ``<rollout_id>: <status> (<line>=<state>, ...)``. A single
output, so that a downstream ``dsl.If`` can test it (DESIGN 6.2).
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def rollout(
    model_name: str,
    version: str,
    plan: str,
    data: str,
    state: str,
    tracking_uri: str,
    backend: str = "local",
    lines_config: str = "",
) -> str:
    """Start wave 1 of the roll-out (``plan`` "" = the shipped configs/rollout-plan.yaml, ``state``
    "" = $CTA_ROLLOUT_STATE or .cta/demo/rollout); returns its status line. ``lines_config`` is
    the fleet inventory of this step and of the line servers the local backend starts ("" for
    the image's configs/lines.yaml)."""
    import os

    from components.logs import configure_logging
    from components.rollout.plan import DEFAULT_PLAN
    from components.rollout.step import run

    configure_logging()
    if lines_config:
        os.environ["CTA_LINES_CONFIG"] = lines_config
    result = run(
        model_name,
        version,
        plan or str(DEFAULT_PLAN),
        data,
        state=state or None,
        tracking_uri=tracking_uri or None,
        backend=backend,
    )
    lines = ", ".join(f"{line}={state}" for line, state in result["lines"].items())
    return f"{result['rollout_id']}: {result['status']} ({lines})"
