"""Where a line's model runs. Every backend offers the same four moves (the engine decides when):

- ``deploy_shadow(line, model)``: start the candidate beside the line's current model;
- ``deploy_live(line, model, previous)``: make the candidate serve the line;
- ``finish_promotion(line, candidate, previous)``: health passed, retire what ran before;
- ``roll_back(line, candidate, previous)``: restore ``previous`` (or nothing) and remove the
  candidate.

A deployment is a plain JSON-able dict (it is recorded in the state store): ``role``
(live|shadow), ``model_uri`` (``models:/NAME/<version>``), ``version``, ``sha256``, ``url``
(where the replay sends requests, None when the backend cannot reach it) plus backend details
(local: ``pid``, ``port``; kubernetes: ``namespace``, ``deployment``; gitops: ``commit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cta_model.errors import ConfigError

BACKENDS = ("local", "kubernetes", "gitops")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    sha256: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def deployment_record(
    role: str, model: ModelRef, url: str | None, **details: Any
) -> dict[str, Any]:
    return {
        "role": role,
        "model_uri": model.uri,
        "name": model.name,
        "version": model.version,
        "sha256": model.sha256,
        "url": url,
        **details,
    }


def model_of(deployment: dict[str, Any]) -> ModelRef:
    return ModelRef(deployment["name"], str(deployment["version"]), deployment["sha256"])


class Backend(Protocol):
    name: str

    def deploy_shadow(self, line_id: str, model: ModelRef) -> dict[str, Any]: ...

    def deploy_live(
        self, line_id: str, model: ModelRef, previous: dict[str, Any] | None
    ) -> dict[str, Any]: ...

    def finish_promotion(
        self, line_id: str, candidate: dict[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]: ...

    def roll_back(
        self, line_id: str, candidate: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> dict[str, Any] | None: ...

    def is_running(self, deployment: dict[str, Any]) -> bool: ...


def make_backend(name: str, **options: Any) -> Backend:
    if name == "local":
        from components.rollout.backends.local import LocalBackend

        return LocalBackend(**options)
    if name == "kubernetes":
        from components.rollout.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(**options)
    if name == "gitops":
        from components.rollout.backends.gitops import GitOpsBackend

        return GitOpsBackend(**options)
    raise ConfigError(f"--backend {name!r}: unknown; one of {', '.join(BACKENDS)}")
