"""`kubectl kustomize` for the manifest tests. The repository's own folders are rendered once per
session (copies handed out); a test's temporary folders, which tests change, every time."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"


def _render(directory: Path) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: run `make setup-system` (DESIGN 6.2)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{directory}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> list[dict]:
    """Every object the kustomization in ``directory`` renders; the caller may change them."""
    directory = Path(directory).resolve()
    renderer = _cached_render if directory.is_relative_to(REPO_K8S) else _render
    return copy.deepcopy(list(renderer(directory)))


_cached_render = functools.cache(_render)
