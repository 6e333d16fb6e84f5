"""Multi-node training on Kubeflow Trainer v2: TrainJob manifests and a thin launcher.

The train component turns a :class:`TrainJobSpec` into a ``trainer.kubeflow.org/v1alpha1``
TrainJob (:func:`build_trainjob_manifest`), checks it offline against the Kubeflow Trainer
v2.3.0 CRD copied to ``infra/k8s/crds/`` (:func:`validate_trainjob`), and hands it to
:class:`TrainJobLauncher`, which only calls the official ``kubernetes`` client. Every decision
(labels, patches, state of a job, spec drift, pod order, log lines) is a plain function here so
that it is tested without an API server; see ``infra/k8s/training/README.md``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators
from pydantic import Field, field_validator, model_validator

from cta_model.config import StrictModel, key_path, validate_config
from cta_model.errors import ConfigError, CtaError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

# ---------------------------------------------------------------------------------- constants
TRAINJOB_GROUP = "trainer.kubeflow.org"
TRAINJOB_VERSION = "v1alpha1"
TRAINJOB_API_VERSION = f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_PLURAL = "trainjobs"
TRAINER_RELEASE = "Kubeflow Trainer v2.3.0"

DEFAULT_RUNTIME = "torch-distributed"
RUNTIME_KIND = "ClusterTrainingRuntime"
# The torch-distributed runtime names its replicated job and its trainer container "node";
# pod patches and log reads address both by this name.
TRAINER_NODE = "node"
# runtimePatches entries are keyed by an owner ("manager"); this one is ours.
PATCH_MANAGER = "cta.train"
# The Trainer starts no torchrun of its own: it injects PET_NNODES, PET_NPROC_PER_NODE,
# PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads. `--no-python`
# lets torchrun start the `cta` console script as each rank's process.
TORCHRUN_PREFIX = ("torchrun", "--no-python")
TRAIN_COMMAND = ("cta", "train")

PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"
RUN_ID_LABEL = "cta.run-id"
RESERVED_LABELS = frozenset({PART_OF_LABEL, COMPONENT_LABEL, RUN_ID_LABEL})

# Labels that JobSet (which the Trainer creates under the TrainJob's name) puts on every pod.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

CRD_ENV = "CTA_TRAINJOB_CRD"
CRD_PATH = (
    Path(__file__).resolve().parents[2]
    / "infra"
    / "k8s"
    / "crds"
    / "trainer.kubeflow.org_trainjobs.yaml"
)

INT32_MAX = 2**31 - 1
# API answers worth polling through during a long wait (throttling, API server restarts).
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

# Kubernetes name and value syntax (apimachinery validation).
_RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
# The resource.Quantity pattern of the CRD (resourcesPerNode.limits/requests).
_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Parts of an environment variable name that mark a credential: such values go through a
# Secret reference, never as plain text into a manifest that KFP and kubectl print.
_CREDENTIAL_WORDS = frozenset({"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIALS", "APIKEY"})
_CREDENTIAL_PAIRS = frozenset({("ACCESS", "KEY"), ("API", "KEY"), ("PRIVATE", "KEY")})


# Kubernetes name rules: (pattern, maximum length, what the rule says in words).
_NAME_RULES = {
    "RFC 1035 label": (
        _RFC1035_LABEL,
        63,
        "lower-case letters, digits and '-', starting with a letter, ending with a letter or "
        "digit, at most 63 characters",
    ),
    "DNS-1123 label": (
        _DNS1123_LABEL,
        63,
        "lower-case letters, digits and '-', starting and ending with a letter or digit, at "
        "most 63 characters",
    ),
    "DNS-1123 subdomain": (
        _DNS1123_SUBDOMAIN,
        253,
        "lower-case letters, digits, '-' and '.', at most 253 characters",
    ),
}


def _check_name(value: str, what: str, rule: str) -> str:
    pattern, max_length, words = _NAME_RULES[rule]
    if len(value) > max_length or not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be a {rule}: {words}")
    return value


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid Kubernetes label key, or None when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return f"label key {key!r}: the prefix must be a DNS-1123 subdomain"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {key!r}: the name must be at most 63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid Kubernetes label value, or None when it is."""
    if not isinstance(value, str):
        return f"label value {value!r} must be a string"
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        return (
            f"label value {value!r} must be at most 63 characters of letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit"
        )
    return None


def is_credential_name(env_name: str) -> bool:
    """True when an environment variable's name says that it holds a credential."""
    words = [word for word in re.split(r"[_.\-]+", env_name.upper()) if word]
    return any(word in _CREDENTIAL_WORDS for word in words) or any(
        pair in _CREDENTIAL_PAIRS for pair in zip(words, words[1:], strict=False)
    )


# --------------------------------------------------------------------------------- the spec
class NodeResources(StrictModel):
    """Compute for each training node (pod). ``gpus`` maps to ``nvidia.com/gpu``."""

    # Every pod gets limits (the hardening rule of tests/unit/test_all_manifests_hardened.py).
    cpu: str = "4"
    memory: str = "16Gi"
    gpus: int = Field(default=0, ge=0)

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{value!r} is not a Kubernetes quantity such as '4', '500m', '16Gi'")
        text = str(value)
        if not _QUANTITY.fullmatch(text):
            raise ValueError(f"{text!r} is not a Kubernetes quantity such as '4', '500m', '16Gi'")
        return text


class SecretKeyRef(StrictModel):
    """One key of a Kubernetes Secret in the TrainJob's namespace (``optional``: a missing
    Secret or key leaves the variable unset instead of stopping the pod)."""

    secret: str
    key: str
    optional: bool = False

    @field_validator("secret")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        return _check_name(value, "secret name", "DNS-1123 subdomain")

    @field_validator("key")
    @classmethod
    def _secret_key(cls, value: str) -> str:
        if len(value) > 253 or not _SECRET_KEY.fullmatch(value):
            raise ValueError(f"secret key {value!r} must be letters, digits, '-', '_' or '.'")
        return value


class PvcVolume(StrictModel):
    """A PersistentVolumeClaim mounted into every training node (e.g. the output folder)."""

    claim_name: str
    mount_path: str
    name: str = "output"
    read_only: bool = False

    @field_validator("claim_name")
    @classmethod
    def _claim(cls, value: str) -> str:
        return _check_name(value, "claim_name", "DNS-1123 subdomain")

    @field_validator("name")
    @classmethod
    def _volume_name(cls, value: str) -> str:
        return _check_name(value, "volume name", "DNS-1123 label")

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        if not value.startswith("/") or ":" in value:
            raise ValueError(f"mount_path {value!r} must be an absolute path without ':'")
        return value


class PodOwner(StrictModel):
    """The pod that launched a TrainJob (the pipeline's train step): the TrainJob carries an
    ownerReference to it, so Kubernetes' garbage collector deletes the TrainJob (and its JobSet
    and pods) once that pod is deleted, e.g. with a cancelled run. Same namespace only."""

    name: str
    uid: str = Field(min_length=1, max_length=128)

    @field_validator("name")
    @classmethod
    def _pod_name(cls, value: str) -> str:
        return _check_name(value, "owner pod name", "DNS-1123 subdomain")


class TrainJobSpec(StrictModel):
    """Everything the train component decides about one multi-node training run."""

    name: str
    namespace: str
    run_id: str
    image: str = Field(min_length=1, max_length=500)
    # Where the train config lies inside the container (a mounted volume or baked in).
    config_path: str = Field(min_length=1)
    runtime_ref: str = DEFAULT_RUNTIME
    num_nodes: int = Field(default=1, ge=1, le=INT32_MAX)
    # "auto" leaves the field out: the torch runtime then counts GPUs (or CPUs) per node.
    num_proc_per_node: int | Literal["auto"] = "auto"
    resources: NodeResources = NodeResources()
    # None: torchrun --no-python cta train --config <config_path> (see TORCHRUN_PREFIX).
    command: list[str] | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # Environment variable -> Secret key; a bare string names the Secret and uses the variable's
    # own name as the key. (TrainJob v2.3.0 has no envFrom: one reference per variable.)
    secret_env: dict[str, SecretKeyRef] = Field(default_factory=dict)
    volumes: list[PvcVolume] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    owner: PodOwner | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_ttl(cls, data: Any) -> Any:
        # A frequent wish with no home in this CRD: say where it lives instead of "unknown key".
        if isinstance(data, Mapping):
            for key in ("ttl_seconds_after_finished", "ttl"):
                if key in data:
                    raise ValueError(
                        f"{key}: the {TRAINER_RELEASE} TrainJob has no TTL field; set "
                        "ttlSecondsAfterFinished in the ClusterTrainingRuntime's JobSet template "
                        "or delete the TrainJob with TrainJobLauncher.delete()"
                    )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # The CRD's own CEL rule, stricter than a DNS-1123 name (must start with a letter).
        return _check_name(value, "TrainJob name", "RFC 1035 label")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _check_name(value, "namespace", "DNS-1123 label")

    @field_validator("runtime_ref")
    @classmethod
    def _runtime(cls, value: str) -> str:
        return _check_name(value, "runtime_ref", "DNS-1123 subdomain")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        problem = label_value_problem(value) if value else "run_id must not be empty"
        if problem:
            raise ValueError(f"run_id is used as the {RUN_ID_LABEL} label: {problem}")
        return value

    @field_validator("num_proc_per_node")
    @classmethod
    def _num_proc(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= INT32_MAX:
            raise ValueError(f"num_proc_per_node must be 'auto' or 1..{INT32_MAX}, got {value}")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("command must not be empty; leave it out for the default")
        return value

    @field_validator("env")
    @classmethod
    def _plain_env(cls, value: dict[str, str]) -> dict[str, str]:
        for env_name in value:
            _check_env_name(env_name)
            if is_credential_name(env_name):
                raise ValueError(
                    f"{env_name} looks like a credential: pass it as secret_env "
                    f"({env_name}: <secret name>) so its value never enters the manifest"
                )
        return value

    @field_validator("secret_env", mode="before")
    @classmethod
    def _secret_shorthand(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                env_name: {"secret": ref, "key": env_name} if isinstance(ref, str) else ref
                for env_name, ref in value.items()
            }
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_env_names(cls, value: dict[str, SecretKeyRef]) -> dict[str, SecretKeyRef]:
        for env_name in value:
            _check_env_name(env_name)
        return value

    @field_validator("volumes")
    @classmethod
    def _unique_volumes(cls, value: list[PvcVolume]) -> list[PvcVolume]:
        for attribute in ("name", "mount_path"):
            seen = [getattr(volume, attribute) for volume in value]
            duplicates = sorted({item for item in seen if seen.count(item) > 1})
            if duplicates:
                raise ValueError(f"volume {attribute} given twice: {duplicates}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if key in RESERVED_LABELS:
                raise ValueError(f"label {key!r} is set by the launcher and cannot be overridden")
            problem = label_key_problem(key) or label_value_problem(label)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _env_sources_disjoint(self) -> TrainJobSpec:
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"environment variables in both env and secret_env: {both}")
        return self


def _check_env_name(env_name: str) -> None:
    if not _ENV_NAME.fullmatch(env_name):
        raise ValueError(
            f"environment variable name {env_name!r} must be letters, digits, '_', '-' or '.', "
            "not starting with a digit"
        )
    if env_name.startswith("PET_"):
        # torchrun's own settings, injected by the torch runtime from numNodes/numProcPerNode.
        raise ValueError(f"{env_name}: PET_* variables are set by the Trainer's torch runtime")


def load_trainjob_spec(data: Any, source: str = "trainjob") -> TrainJobSpec:
    """Validate a mapping (e.g. read from YAML) into a spec, raising ConfigError naming keys."""
    return validate_config(TrainJobSpec, data, source)


# ------------------------------------------------------------------------------ the manifest
def trainjob_labels(spec: TrainJobSpec) -> dict[str, str]:
    """Labels of the TrainJob and of its pods: the run is findable with one selector."""
    return {
        **spec.labels,
        PART_OF_LABEL: "cta",
        COMPONENT_LABEL: "train",
        RUN_ID_LABEL: spec.run_id,
    }


def trainer_command(spec: TrainJobSpec) -> list[str]:
    if spec.command is not None:
        return list(spec.command)
    return [*TORCHRUN_PREFIX, *TRAIN_COMMAND, "--config", spec.config_path]


def trainer_env(spec: TrainJobSpec) -> list[dict[str, Any]]:
    """spec.trainer.env, sorted by name; secrets only as references, never as values."""
    entries: list[dict[str, Any]] = [
        {"name": env_name, "value": value} for env_name, value in spec.env.items()
    ]
    entries += [
        {
            "name": env_name,
            "valueFrom": {
                "secretKeyRef": {
                    "name": ref.secret,
                    "key": ref.key,
                    **({"optional": True} if ref.optional else {}),
                }
            },
        }
        for env_name, ref in spec.secret_env.items()
    ]
    return sorted(entries, key=lambda entry: entry["name"])


def resources_per_node(resources: NodeResources) -> dict[str, dict[str, str]]:
    """requests/limits for one node.

    request = limit for CPU and memory (Guaranteed QoS: the node is never overcommitted and the
    CPU limit equals what the scheduler reserved); GPUs are an extended resource, set as limits
    (requests default to them).
    """
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits = dict(requests)
    if resources.gpus:
        limits["nvidia.com/gpu"] = str(resources.gpus)
    return {
        section: values
        for section, values in (("requests", requests), ("limits", limits))
        if values
    }


def runtime_patch(spec: TrainJobSpec) -> dict[str, Any]:
    """The runtimePatches entry that labels the trainer pods and mounts the volumes.

    TrainJob v2.3.0 has no podSpecOverrides/podTemplateOverrides: pod-level changes go through
    spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec
    .template, addressed by the runtime's replicated job and container names.
    """
    # Hardened like every other pod (non-root, read-only root with a scratch /tmp, no
    # capabilities, RuntimeDefault seccomp); the image's user is 10001 (infra/images).
    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            *(
                {
                    "name": volume.name,
                    "persistentVolumeClaim": {
                        "claimName": volume.claim_name,
                        **({"readOnly": True} if volume.read_only else {}),
                    },
                }
                for volume in spec.volumes
            ),
        ],
        "containers": [
            {
                "name": TRAINER_NODE,
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    *(
                        {
                            "name": volume.name,
                            "mountPath": volume.mount_path,
                            **({"readOnly": True} if volume.read_only else {}),
                        }
                        for volume in spec.volumes
                    ),
                ],
            }
        ],
    }
    pod_template: dict[str, Any] = {
        "metadata": {"labels": trainjob_labels(spec)},
        "spec": pod_spec,
    }
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": TRAINER_NODE,
                            "template": {"spec": {"template": pod_template}},
                        }
                    ]
                }
            }
        },
    }


def build_trainjob_manifest(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob for ``spec``, as a plain dict ready for the API or ``yaml.safe_dump``."""
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": trainer_command(spec),
        "numNodes": spec.num_nodes,
    }
    if spec.args:
        trainer["args"] = list(spec.args)
    if spec.num_proc_per_node != "auto":
        trainer["numProcPerNode"] = spec.num_proc_per_node
    resources = resources_per_node(spec.resources)
    if resources:
        trainer["resourcesPerNode"] = resources
    env = trainer_env(spec)
    if env:
        trainer["env"] = env

    job_spec: dict[str, Any] = {
        # apiGroup and kind are the CRD defaults, written out so the manifest says what it uses.
        "runtimeRef": {"name": spec.runtime_ref, "apiGroup": TRAINJOB_GROUP, "kind": RUNTIME_KIND},
        "trainer": trainer,
        "runtimePatches": [runtime_patch(spec)],
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    metadata: dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": trainjob_labels(spec),
    }
    if spec.owner is not None:
        metadata["ownerReferences"] = [owner_reference(spec.owner)]
    return {
        "apiVersion": TRAINJOB_API_VERSION,
        "kind": TRAINJOB_KIND,
        "metadata": metadata,
        "spec": job_spec,
    }


def owner_reference(owner: PodOwner) -> dict[str, Any]:
    """An ownerReference to the launching pod.

    Not a controller reference and not blocking: the pod does not manage the TrainJob, and
    deleting the pod must not wait for the TrainJob's own deletion.
    """
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": owner.name,
        "uid": owner.uid,
        "controller": False,
        "blockOwnerDeletion": False,
    }


# ------------------------------------------------------------------------------- validation
def crd_path(explicit: str | Path | None = None) -> Path:
    """The CRD file: an explicit path, else $CTA_TRAINJOB_CRD, else the repository's copy."""
    path = Path(explicit or os.environ.get(CRD_ENV) or CRD_PATH)
    if not path.is_file():
        raise ConfigError(
            f"TrainJob CRD not found at {path}; set {CRD_ENV} to a copy of "
            "trainer.kubeflow.org_trainjobs.yaml (infra/k8s/crds/ in the repository)"
        )
    return path


def _strict_schema(node: Any) -> Any:
    """A copy of an openAPIV3Schema node that rejects unknown fields.

    The API server prunes (or, with strict field validation, rejects) fields a structural schema
    does not declare; plain JSON Schema allows them. ``additionalProperties: false`` on every
    object that lists its properties gives the strict behaviour offline. Descriptions are dropped
    to keep the cached schema small.
    """
    if isinstance(node, list):
        return [_strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for keyword, value in node.items():
        if keyword == "description":
            continue
        if keyword == "properties":  # keys are field names here, not keywords
            out[keyword] = {name: _strict_schema(sub) for name, sub in value.items()}
        else:
            out[keyword] = _strict_schema(value)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: Sequence[str], instance: Any, schema: Any):
    """x-kubernetes-list-map-keys: items of a list-map must be unique by their keys."""
    if not validator.is_type(instance, "array"):
        return
    first_seen: dict[tuple[Any, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        identity = tuple(json.dumps(item.get(key), sort_keys=True) for key in keys)
        if identity in first_seen:
            where = ", ".join(f"{key}={item.get(key)!r}" for key in keys)
            yield ValidationError(
                f"duplicate entry {where} (first at [{first_seen[identity]}]); "
                "entries of this list are keyed by " + ", ".join(keys),
                path=[index],
            )
        else:
            first_seen[identity] = index


# OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum, no const).
_CrdValidator = validators.extend(Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})

_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("int32")
def _is_int32(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value <= INT32_MAX


@_FORMATS.checks("int64")
def _is_int64(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


def load_trainjob_schema(path: str | Path | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of TrainJob v1alpha1 from the CRD file (unchanged)."""
    return copy.deepcopy(_raw_schema(str(crd_path(path))))


@functools.lru_cache(maxsize=4)
def _raw_schema(path: str) -> dict[str, Any]:
    safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as stream:
        documents = [doc for doc in yaml.load_all(stream, Loader=safe_loader) if doc]  # noqa: S506
    for document in documents:
        names = document.get("spec", {}).get("names", {})
        if (
            document.get("kind") == "CustomResourceDefinition"
            and names.get("kind") == TRAINJOB_KIND
        ):
            for version in document["spec"].get("versions", []):
                if version.get("name") == TRAINJOB_VERSION:
                    return version["schema"]["openAPIV3Schema"]
    raise ConfigError(f"{path}: no {TRAINJOB_KIND} {TRAINJOB_VERSION} CRD schema in this file")


@functools.lru_cache(maxsize=4)
def _validator(path: str) -> Any:
    return _CrdValidator(_strict_schema(_raw_schema(path)), format_checker=_FORMATS)


def _schema_problems(error: ValidationError) -> list[tuple[str, str]]:
    """(JSON path, message) pairs for one jsonschema error, naming the field itself."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        declared = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return [
            (key_path([*path, extra]), f"unknown field (not in the {TRAINER_RELEASE} TrainJob CRD)")
            for extra in sorted(set(error.instance) - set(declared))
        ]
    if error.validator == "required":
        return [
            (key_path([*path, missing]), "required field is missing")
            for missing in error.validator_value
            if isinstance(error.instance, dict) and missing not in error.instance
        ]
    return [(key_path(path) or "<root>", error.message)]


def _metadata_problems(metadata: Any) -> list[tuple[str, str]]:
    # metadata is an open object in the CRD; its rules are apimachinery's plus the CRD's CEL
    # rules on the name, which jsonschema cannot run.
    if not isinstance(metadata, Mapping):
        return [("metadata", "must be a mapping with at least a name")]
    problems: list[tuple[str, str]] = []
    name = metadata.get("name")
    if not isinstance(name, str):
        problems.append(("metadata.name", "required field is missing"))
    else:
        try:
            _check_name(name, "metadata.name", "RFC 1035 label")
        except ValueError as exc:
            problems.append(("metadata.name", str(exc)))
    namespace = metadata.get("namespace")
    if namespace is not None:
        try:
            _check_name(str(namespace), "metadata.namespace", "DNS-1123 label")
        except ValueError as exc:
            problems.append(("metadata.namespace", str(exc)))
    labels = metadata.get("labels", {})
    if not isinstance(labels, Mapping):
        problems.append(("metadata.labels", "must be a mapping of strings"))
    else:
        for key, value in labels.items():
            problem = label_key_problem(str(key)) or label_value_problem(value)
            if problem:
                problems.append((f"metadata.labels.{key}", problem))
    return problems


def trainjob_problems(manifest: Any, crd: str | Path | None = None) -> list[tuple[str, str]]:
    """Every (JSON path, message) for which ``manifest`` is not a valid TrainJob; [] if valid."""
    if not isinstance(manifest, Mapping):
        return [("<root>", f"a TrainJob must be a mapping, got {type(manifest).__name__}")]
    problems: list[tuple[str, str]] = []
    if manifest.get("apiVersion") != TRAINJOB_API_VERSION:
        problems.append(
            ("apiVersion", f"must be {TRAINJOB_API_VERSION!r}, got {manifest.get('apiVersion')!r}")
        )
    if manifest.get("kind") != TRAINJOB_KIND:
        problems.append(("kind", f"must be {TRAINJOB_KIND!r}, got {manifest.get('kind')!r}"))
    problems += _metadata_problems(manifest.get("metadata"))
    validator = _validator(str(crd_path(crd)))
    for error in validator.iter_errors(dict(manifest)):
        problems += _schema_problems(error)
    return sorted(set(problems))


def validate_trainjob(manifest: Any, crd: str | Path | None = None) -> None:
    """Raise ConfigError naming each failing field's JSON path; return None when valid.

    Checked offline: apiVersion/kind, metadata (name by the CRD's CEL rules, namespace, label
    syntax), the CRD's openAPIV3Schema with unknown fields rejected, int32/int64 ranges and
    list-map key uniqueness. Not checked: the other CEL rules (immutability on update,
    storageUri, managedBy) and the Trainer's admission webhook.
    """
    problems = trainjob_problems(manifest, crd)
    if problems:
        metadata = manifest.get("metadata") if isinstance(manifest, Mapping) else None
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        source = f"TrainJob {name}" if isinstance(name, str) else "TrainJob"
        raise ConfigError("\n".join(f"{source}: {path}: {message}" for path, message in problems))


# ---------------------------------------------------------------- decisions for the launcher
class TrainJobError(CtaError):
    """A TrainJob could not be submitted, read, or deleted on the cluster.

    ``transient``: the API server was briefly unavailable (see TRANSIENT_STATUSES); waiting
    keeps polling through such errors until its deadline.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TrainJobConflict(TrainJobError):
    """A TrainJob of that name exists with a different spec (specs are immutable)."""


class TrainJobFailed(TrainJobError):
    """The Trainer reported the TrainJob Failed."""

    def __init__(self, message: str, reason: str, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not finish before the caller's deadline; it was left running."""


class TrainJobCancelled(CtaError):
    """The launching step was asked to stop (SIGTERM from a cancelled run) while it waited."""


Phase = Literal["Pending", "Running", "Suspended", "Complete", "Failed"]


@dataclass(frozen=True)
class TrainJobState:
    phase: Phase
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def describe(self) -> str:
        details = ": ".join(part for part in (self.reason, self.message) if part)
        return f"{self.phase} ({details})" if details else self.phase


def trainjob_state(trainjob: Mapping[str, Any]) -> TrainJobState:
    """Read a TrainJob's state from status.conditions (types Complete, Failed, Suspended).

    Failed wins over Complete; without a terminal condition the job is Running once any child
    Job reports active pods, else Pending (created, scheduling, or queued).
    """
    status = trainjob.get("status") or {}
    true_conditions = {
        condition.get("type"): condition
        for condition in status.get("conditions") or []
        if isinstance(condition, Mapping) and condition.get("status") == "True"
    }
    for phase in ("Failed", "Complete", "Suspended"):
        if phase in true_conditions:
            condition = true_conditions[phase]
            return TrainJobState(
                phase, str(condition.get("reason") or ""), str(condition.get("message") or "")
            )
    if any((job.get("active") or 0) > 0 for job in status.get("jobsStatus") or []):
        return TrainJobState("Running")
    return TrainJobState("Pending")


def kubectl_delete_hint(namespace: str, name: str) -> str:
    return f"kubectl delete {TRAINJOB_PLURAL}.{TRAINJOB_GROUP} -n {namespace} {name}"


def failure_message(namespace: str, name: str, state: TrainJobState) -> str:
    return (
        f"TrainJob {namespace}/{name} failed: {state.reason or 'no reason given'}: "
        f"{state.message or 'no message'}. It is kept for inspection (logs: kubectl logs -n "
        f"{namespace} -l {trainer_pod_selector(name)} -c {TRAINER_NODE}); delete it with "
        f"`{kubectl_delete_hint(namespace, name)}`"
    )


def timeout_message(
    namespace: str, name: str, deadline_s: float, state: TrainJobState, last_error: str = ""
) -> str:
    error = f"; the last poll failed: {last_error}" if last_error else ""
    return (
        f"TrainJob {namespace}/{name} did not finish within {deadline_s:g} s "
        f"(last state: {state.describe()}{error}); it was left running: wait again, or delete it "
        f"with `{kubectl_delete_hint(namespace, name)}`"
    )


def submission_identity(trainjob: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a TrainJob that make two submissions the same run: labels and spec."""
    metadata = trainjob.get("metadata") or {}
    return {
        "metadata": {"labels": dict(metadata.get("labels") or {})},
        "spec": trainjob.get("spec"),
    }


def spec_differences(desired: Any, live: Any, path: Sequence[str | int] = ()) -> list[str]:
    """JSON paths where ``live`` does not contain ``desired``.

    ``desired`` must be a subset of ``live``: the API server adds defaults (suspend, managedBy,
    runtimePatches[].time) that are no difference; a changed or missing value is.
    """
    where = key_path(list(path)) or "<root>"
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return [f"{where}: expected a mapping"]
        differences: list[str] = []
        for key, value in desired.items():
            if key not in live:
                differences.append(f"{key_path([*path, key])}: missing on the cluster")
            else:
                differences += spec_differences(value, live[key], [*path, key])
        return differences
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            count = len(live) if isinstance(live, list) else "no list"
            return [f"{where}: {len(desired)} entries wanted, cluster has {count}"]
        differences = []
        for index, (want, have) in enumerate(zip(desired, live, strict=True)):
            differences += spec_differences(want, have, [*path, index])
        return differences
    if desired != live:
        return [f"{where}: wanted {_short(desired)}, cluster has {_short(live)}"]
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def conflict_message(namespace: str, name: str, differences: Sequence[str]) -> str:
    shown = "; ".join(differences[:10]) + ("; ..." if len(differences) > 10 else "")
    return (
        f"TrainJob {namespace}/{name} already exists with a different spec ({shown}). "
        "TrainJob specs are immutable: choose a new name (run id) or delete the old job with "
        f"`{kubectl_delete_hint(namespace, name)}`"
    )


def trainer_pod_selector(name: str) -> str:
    """Label selector of the TrainJob's trainer pods.

    Assumption (not testable offline): the Trainer creates a JobSet named like the TrainJob, and
    JobSet labels each pod with its JobSet and replicated-job names; the trainer's replicated
    job is "node" in the torch-distributed runtime.
    """
    return f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={TRAINER_NODE}"


def _as_index(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return INT32_MAX  # unknown index: after the known ones


def order_pods(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """Pod names in node-rank order (job index, then completion index, then name)."""

    def rank(pod: Mapping[str, Any]) -> tuple[int, int, str]:
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        return (
            _as_index(labels.get(JOB_INDEX_LABEL, 0)),
            _as_index(labels.get(COMPLETION_INDEX_LABEL, 0)),
            str(metadata.get("name", "")),
        )

    return [str((pod.get("metadata") or {}).get("name")) for pod in sorted(pods, key=rank)]


def split_log_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Lines of a byte stream cut at arbitrary places; the last line may lack its newline."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


def api_error_message(action: str, exc: Any) -> str:
    """One line from a kubernetes ApiException: status, reason and the server's message."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or ""
    message = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = str(json.loads(body).get("message") or "")
        except (ValueError, AttributeError, TypeError):
            message = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    parts = [f"{action} failed: HTTP {status} {reason}".rstrip()]
    if message:
        parts.append(message[:500])
    return ": ".join(parts)


# ---------------------------------------------------------------------------- the launcher
@dataclass(frozen=True)
class SubmitResult:
    name: str
    namespace: str
    created: bool  # False: an identical TrainJob existed and was reused
    trainjob: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PodLogLine:
    pod: str
    line: str


def default_api_client() -> ApiClient:
    """A client from the pod's service account, else from the kubeconfig (KUBECONFIG or
    ~/.kube/config); ConfigError naming both when neither is there."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as incluster:
        try:
            config.load_kube_config(client_configuration=configuration, persist_config=False)
        except (config.ConfigException, OSError) as kubeconfig:
            raise ConfigError(
                "no Kubernetes credentials: not in a pod with a service account "
                f"({incluster}), and no usable kubeconfig ({kubeconfig}); set KUBECONFIG or "
                "create ~/.kube/config"
            ) from None
    return client.ApiClient(configuration)


class TrainJobLauncher:
    """Submit, watch, read logs of and delete TrainJobs in one namespace.

    Thin by design: it calls the kubernetes client and leaves every decision to the plain
    functions above. Nothing is deleted unless :meth:`delete` is called.
    """

    def __init__(
        self,
        api_client: ApiClient | None = None,
        *,
        namespace: str,
        request_timeout_s: float = 30.0,
    ) -> None:
        from kubernetes import client

        try:
            self.namespace = _check_name(namespace, "namespace", "DNS-1123 label")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._api_client = api_client if api_client is not None else default_api_client()
        self._custom = client.CustomObjectsApi(self._api_client)
        self._core = client.CoreV1Api(self._api_client)
        self._timeout = request_timeout_s

    def submit(self, manifest: Mapping[str, Any]) -> SubmitResult:
        """Create the TrainJob; if one of that name exists with the same spec, reuse it."""
        from kubernetes.client.exceptions import ApiException

        validate_trainjob(manifest)
        body = copy.deepcopy(dict(manifest))
        metadata = body["metadata"]
        if metadata.setdefault("namespace", self.namespace) != self.namespace:
            raise ConfigError(
                f"TrainJob {metadata['name']}: metadata.namespace {metadata['namespace']!r} "
                f"differs from the launcher's namespace {self.namespace!r}"
            )
        name = metadata["name"]
        try:
            created = self._custom.create_namespaced_custom_object(
                TRAINJOB_GROUP,
                TRAINJOB_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                body,
                _request_timeout=self._timeout,
            )
            return SubmitResult(name, self.namespace, True, created)
        except ApiException as exc:
            if exc.status != 409:
                action = f"creating TrainJob {self.namespace}/{name}"
                raise TrainJobError(api_error_message(action, exc)) from None
        live = self.get(name)
        differences = spec_differences(submission_identity(body), submission_identity(live))
        if differences:
            raise TrainJobConflict(conflict_message(self.namespace, name, differences))
        return SubmitResult(name, self.namespace, False, live)

    def get(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self._custom.get_namespaced_custom_object(
                TRAINJOB_GROUP,
                TRAINJOB_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                name,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise TrainJobError(
                    f"TrainJob {self.namespace}/{name} not found (never submitted, or deleted)"
                ) from None
            raise TrainJobError(
                api_error_message(f"reading TrainJob {self.namespace}/{name}", exc),
                transient=exc.status in TRANSIENT_STATUSES,
            ) from None
        except HTTPError as exc:  # no answer at all: connection refused, reset, timed out
            raise TrainJobError(
                f"reading TrainJob {self.namespace}/{name} failed: {exc}", transient=True
            ) from None

    def wait(
        self,
        name: str,
        deadline_s: float,
        poll_s: float = 10.0,
        on_state: Callable[[TrainJobState], Any] | None = None,
    ) -> dict[str, Any]:
        """Poll until Complete (returns the TrainJob) or Failed / past the deadline (raises).

        Transient API errors (429, 5xx, no connection) are polled through until the deadline;
        a missing TrainJob or a refused request (401, 403) ends the wait at once. ``on_state``
        hears each state that differs from the one before (the first one included).
        """
        if deadline_s <= 0 or poll_s <= 0:
            raise ConfigError(f"deadline_s and poll_s must be > 0, got {deadline_s}, {poll_s}")
        deadline = time.monotonic() + deadline_s
        state, last_error = TrainJobState("Pending"), ""
        reported: TrainJobState | None = None
        while True:
            try:
                live = self.get(name)
            except TrainJobError as exc:
                if not exc.transient:
                    raise
                last_error = str(exc)
            else:
                state, last_error = trainjob_state(live), ""
                if on_state is not None and state != reported:
                    on_state(state)
                    reported = state
                if state.phase == "Failed":
                    raise TrainJobFailed(
                        failure_message(self.namespace, name, state), state.reason, state.message
                    )
                if state.phase == "Complete":
                    return live
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TrainJobTimeout(
                    timeout_message(self.namespace, name, deadline_s, state, last_error)
                )
            time.sleep(min(poll_s, remaining))

    def stream_logs(self, name: str, *, follow: bool = False) -> Iterator[PodLogLine]:
        """Lines of the trainer container's log, pod after pod in node-rank order.

        With ``follow`` each pod is followed until it ends before the next one is read (rank 0,
        which logs the progress, comes first).
        """
        from kubernetes.client.exceptions import ApiException

        selector = trainer_pod_selector(name)
        try:
            pods = self._core.list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=self._timeout
            )
        except ApiException as exc:
            raise TrainJobError(
                api_error_message(f"listing pods of TrainJob {self.namespace}/{name}", exc)
            ) from None
        pod_names = order_pods(
            {"metadata": {"name": pod.metadata.name, "labels": pod.metadata.labels or {}}}
            for pod in pods.items
        )
        if not pod_names:
            raise TrainJobError(
                f"no pods match {selector} in namespace {self.namespace}: the TrainJob has not "
                "started yet, or its pods were already cleaned up"
            )
        for pod in pod_names:
            try:
                # Raw bytes: the client would json-decode a log that happens to look like JSON.
                response = self._core.read_namespaced_pod_log(
                    pod,
                    self.namespace,
                    container=TRAINER_NODE,
                    follow=follow,
                    _preload_content=False,
                    _request_timeout=None if follow else self._timeout,
                )
            except ApiException as exc:
                raise TrainJobError(
                    api_error_message(f"reading the log of pod {self.namespace}/{pod}", exc)
                ) from None
            try:
                for line in split_log_lines(response.stream(64 * 1024)):
                    yield PodLogLine(pod, line)
            finally:
                response.release_conn()

    def delete(self, name: str) -> bool:
        """Delete the TrainJob (its JobSet and pods follow); False if it was already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._custom.delete_namespaced_custom_object(
                TRAINJOB_GROUP,
                TRAINJOB_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                name,
                propagation_policy="Background",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise TrainJobError(
                api_error_message(f"deleting TrainJob {self.namespace}/{name}", exc)
            ) from None
        return True
