"""Every name the project gives things in MLflow: aliases, tags, artefact paths, URIs.

Writers (train, register_model, train_baselines, gate, roll-out, the model card) and readers
(evaluate, serve, retrain, the summary) import them from here, so one rule has one spelling.
Aliases only, no stages (DESIGN 6.2).
"""

from __future__ import annotations

MODELS_SCHEME = "models:/"

# --- aliases of a registered model
#: the newest registration (register_model)
CHALLENGER_ALIAS = "challenger"
#: the version the gate promoted last
CHAMPION_ALIAS = "champion"
#: the STL baseline of one task (train_baselines, on ``<model>-stl-<task>``)
BASELINE_ALIAS = "baseline"
#: ``line-<id>``: what the roll-out serves on a production line
LINE_ALIAS_PREFIX = "line-"

# --- tags of a training run (and of its LoggedModel), set by components/train/tracking.py
TAG_MANIFEST = "cta.data_manifest_sha256"  # also a version tag
TAG_DVC_REV = "cta.dvc_rev"
TAG_GIT_COMMIT = "cta.git_commit"
TAG_ARCH = "cta.arch"
TAG_TASKS = "cta.tasks"
TAG_MODEL_ID = "cta.model_id"  # also a version tag
TAG_BEST_EPOCH = "cta.best_epoch"
TAG_DROPPED = "cta.tracking_dropped_logs"
TAG_FAILURE = "cta.failure"

# --- tags of a registered version
#: set last by register_model: consumers ignore every version without it (DESIGN 6.1)
TAG_COMPLETE = "cta.registration"
COMPLETE = "complete"
#: the model folder digest (``cta_model.model_folder.folder_sha256``); on the LoggedModel too
TAG_MODEL_SHA256 = "cta.model_sha256"
TAG_DATA_URI = "cta.data_uri"
#: the split an STL baseline was trained on
TAG_SPLIT = "cta.split"
#: ``cta.evaluation.<split|n_images|<task>.<metric>>``
TAG_EVALUATION_PREFIX = "cta.evaluation."
#: ``cta.artifacts.<evaluation|dataset_ref|roi>`` -> the attached file's ``runs:/`` URI
TAG_ARTIFACT_PREFIX = "cta.artifacts."
TAG_MODEL_CARD = "cta.model_card"
TAG_VERDICT = "cta.gate.verdict"
TAG_VERDICT_ID = "cta.gate.verdict_id"
TAG_POLICY = "cta.gate.policy_sha256"
TAG_RECORD = "cta.gate.record"
#: on a champion the gate replaced: the version that replaced it
TAG_SUPERSEDED_BY = "cta.gate.superseded_by"
#: a JSON list of {line, action, time, decision}
TAG_ROLLOUT_HISTORY = "cta.rollout.history"

# --- artefacts in the source run of a version
ARTIFACT_DIR = "registration"
EVALUATION_FILE = "evaluation.json"
DATASET_REF_FILE = "dataset_ref.json"
ROI_FILE = "roi.json"
CARD_FILE = "model_card.md"
#: the gate's audit records
RECORD_DIR = "gate"
#: the LoggedModel pyfunc's artifact that holds the model folder
MODEL_DIR_ARTIFACT = "model_dir"


def line_alias(line_id: str) -> str:
    return f"{LINE_ALIAS_PREFIX}{line_id}"


def line_of_alias(alias: str) -> str | None:
    """The line id of a ``line-<id>`` alias; None for any other alias."""
    return alias.removeprefix(LINE_ALIAS_PREFIX) if alias.startswith(LINE_ALIAS_PREFIX) else None


def baseline_name(model_name: str, task: str) -> str:
    """The registered model holding the STL baseline of ``task``."""
    return f"{model_name}-stl-{task}"


def evaluation_tag(key: str) -> str:
    return f"{TAG_EVALUATION_PREFIX}{key}"


def artifact_tag(artefact: str) -> str:
    return f"{TAG_ARTIFACT_PREFIX}{artefact}"


def registration_dir(version: str | int) -> str:
    """Where a version's attached files live in its source run."""
    return f"{ARTIFACT_DIR}/v{version}"


def record_dir(version: str | int) -> str:
    """Where the gate's audit records of a version live in its source run."""
    return f"{RECORD_DIR}/v{version}"


def version_uri(name: str, version: str | int) -> str:
    return f"{MODELS_SCHEME}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"{MODELS_SCHEME}{name}@{alias}"
