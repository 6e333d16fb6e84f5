"""GitOps backend: the line's kustomize overlay is written into a git working copy and
committed; a GitOps controller (Argo CD, Flux) applies the repository to the cluster.

Layout in the repository: ``lines/base/`` (copied from infra/k8s/lines/base when absent) and
``lines/<line-id>/`` (``overlay_files``: namespace, live pin, shadow pin). Every move is one
commit whose message names the line, the version and the decision, so the repository's log is
the roll-out's audit trail and ``git revert`` undoes a move. Nothing is pushed: pushing (and
its credentials) is the repository owner's business; set ``push=True`` to run ``git push``.
Replay reaches the line's Service by its cluster DNS name, as with the kubernetes backend.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from components.rollout.backends import ModelRef, deployment_record, model_of
from components.rollout.backends.kubernetes import (
    ANNOTATION_SHA,
    ANNOTATION_URI,
    LIVE_DEPLOYMENT,
    NAMESPACE_PREFIX,
    PORT,
    SHADOW_DEPLOYMENT,
    namespace_for,
    overlay_files,
)
from cta_model.config import read_yaml
from cta_model.errors import ConfigError, CtaError

BASE_DIR = Path(__file__).resolve().parents[3] / "infra" / "k8s" / "lines" / "base"
_PINNED_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")
COMMITTER = ("-c", "user.name=cta rollout", "-c", "user.email=cta-rollout@localhost")


class GitOpsError(CtaError):
    """A git command failed; the message holds its output."""


class GitOpsBackend:
    name = "gitops"

    def __init__(
        self, repo: str | Path | None, push: bool = False, prefix: str = NAMESPACE_PREFIX
    ) -> None:
        if not repo:
            raise ConfigError("--gitops-repo is required with --backend gitops")
        self.repo = Path(repo).absolute()
        if not (self.repo / ".git").exists():
            raise ConfigError(f"--gitops-repo {self.repo}: not a git working copy (no .git)")
        self.push = push
        self.prefix = prefix

    def git(self, *args: str) -> str:
        result = subprocess.run(
            ["git", *COMMITTER, "-C", str(self.repo), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise GitOpsError(f"git {' '.join(args)} in {self.repo}: {result.stderr.strip()}")
        return result.stdout.strip()

    def _write(
        self, line_id: str, live: ModelRef | None, shadow: ModelRef | None, message: str
    ) -> str:
        lines_dir = self.repo / "lines"
        if not (lines_dir / "base").exists():
            shutil.copytree(BASE_DIR, lines_dir / "base")
        folder = lines_dir / line_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in overlay_files(line_id, live, shadow, message, prefix=self.prefix).items():
            (folder / name).write_text(text)
        self.git("add", "--", "lines")
        if not self.git("status", "--porcelain", "--", "lines"):
            return self.git("rev-parse", "HEAD")  # already pinned: nothing to commit
        self.git("commit", "-q", "-m", message, "--", "lines")
        if self.push:
            self.git("push")
        commit = self.git("rev-parse", "HEAD")
        print(f"[rollout] gitops {line_id}: {commit[:12]} {message}", flush=True)
        return commit

    def pinned(self, line_id: str, role: str = "live") -> ModelRef | None:
        """The model the committed overlay pins for ``role`` (None: unpinned or no overlay)."""
        path = self.repo / "lines" / line_id / ("model.yaml" if role == "live" else "shadow.yaml")
        if not path.is_file():
            return None
        annotations = (read_yaml(path).get("metadata") or {}).get("annotations") or {}
        match = _PINNED_URI.fullmatch(str(annotations.get(ANNOTATION_URI, "")))
        if match is None:
            return None
        return ModelRef(match["name"], match["version"], str(annotations.get(ANNOTATION_SHA)))

    def _record(self, line_id: str, name: str, role: str, model: ModelRef, commit: str):
        namespace = namespace_for(line_id, self.prefix)
        return deployment_record(
            role,
            model,
            f"http://{name}.{namespace}.svc:{PORT}",
            namespace=namespace,
            deployment=name,
            commit=commit,
            backend=self.name,
        )

    def deploy_shadow(self, line_id: str, model: ModelRef):
        commit = self._write(
            line_id,
            self.pinned(line_id),
            model,
            f"rollout {line_id}: shadow {model.name} v{model.version}",
        )
        return self._record(line_id, SHADOW_DEPLOYMENT, "shadow", model, commit)

    def deploy_live(self, line_id: str, model: ModelRef, previous: dict[str, Any] | None):
        commit = self._write(
            line_id, model, None, f"rollout {line_id}: live bake {model.name} v{model.version}"
        )
        return self._record(line_id, LIVE_DEPLOYMENT, "live", model, commit)

    def finish_promotion(
        self, line_id: str, candidate: dict[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        model = model_of(candidate)
        commit = self._write(
            line_id,
            model,
            None,
            f"rollout {line_id}: promote {model.name} v{model.version} (health passed)",
        )
        return self._record(line_id, LIVE_DEPLOYMENT, "live", model, commit)

    def roll_back(
        self, line_id: str, candidate: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        restored = model_of(previous) if previous else None
        what = f"v{candidate['version']}" if candidate else "candidate"
        back_to = f"v{restored.version}" if restored else "nothing"
        commit = self._write(
            line_id, restored, None, f"rollout {line_id}: roll back {what} to {back_to}"
        )
        if restored is None:
            return None
        return self._record(line_id, LIVE_DEPLOYMENT, "live", restored, commit)

    def is_running(self, deployment: dict[str, Any]) -> bool:
        # The repository holds the desired state; whether the cluster caught up is the
        # controller's business. A recorded pin still in the overlay counts as running.
        line_id = deployment["namespace"].removeprefix(self.prefix)
        pinned = self.pinned(line_id, deployment["role"])
        return pinned is not None and pinned.sha256 == deployment["sha256"]
