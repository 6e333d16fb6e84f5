"""The rollout pipeline step: start a roll-out's first wave (DESIGN 6: the pipeline starts wave 1
only; later waves advance with ``cta rollout resume``).

``run()`` is idempotent for the pipeline: when the roll-out of this plan and version already
exists (a retried or re-run pipeline), it is left as it is and its status is returned.
"""

from __future__ import annotations

from typing import Any

from components.rollout.backends import make_backend
from components.rollout.engine import Engine, make_rollout_id, rollout_key
from components.rollout.plan import load_plan
from components.rollout.registry import pin_version
from components.rollout.state import LocalStateStore, open_store


def run(
    model_name: str,
    version: str,
    plan: str,
    data: str,
    *,
    state: str | None = None,
    tracking_uri: str | None = None,
    backend: str = "local",
    gitops_repo: str | None = None,
) -> dict[str, Any]:
    """Returns {rollout_id, status, lines: {line: state}}."""
    rollout_plan = load_plan(plan)
    store = open_store(state)
    model = pin_version(model_name, version, tracking_uri)
    rollout_id = make_rollout_id(rollout_plan, model)
    existing = store.read(rollout_key(rollout_id))
    if existing is None:
        options: dict[str, Any] = {}
        if backend == "local":
            options["tracking_uri"] = tracking_uri
            if isinstance(store, LocalStateStore):
                options["log_dir"] = store.root / "logs"
        elif backend == "gitops":
            options["repo"] = gitops_repo
        engine = Engine(
            store, make_backend(backend, **options), tracking_uri=tracking_uri, data_uri=data
        )
        record = engine.start(rollout_plan, model, plan_source=plan)
    else:
        print(f"[rollout] {rollout_id}: exists ({existing.data['status']}); left as it is")
        record = existing.data
    return {
        "rollout_id": rollout_id,
        "status": record["status"],
        "lines": {line: entry["state"] for line, entry in record["lines"].items()},
    }
