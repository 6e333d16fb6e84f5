"""Training on Kubeflow: submit a TrainJob, wait with a deadline, show its logs, fetch the model.

The pods train into a local folder and rank 0 uploads the model folder to ``<output_uri>/model``
(``cta train --upload-to``); :func:`run_on_kubeflow` then downloads it with
:func:`components.storage.download_tree` and checks it against its SHA256SUMS. Every decision is
a plain function here; :class:`~components.train.trainjob.TrainJobLauncher` talks to the API.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.storage import is_remote
from components.train.trainjob import (
    TORCHRUN_PREFIX,
    TRAIN_COMMAND,
    PodLogLine,
    TrainJobError,
    TrainJobLauncher,
    TrainJobSpec,
    build_trainjob_manifest,
    load_trainjob_spec,
)
from cta_model.errors import ConfigError

if TYPE_CHECKING:
    pass

# Where each pod trains; rank 0 uploads <POD_OUTPUT>/model to <output_uri>/model.
POD_OUTPUT = "/workspace/out"
MODEL_SUBDIR = "model"
# Keys of the spec that run_on_kubeflow sets itself.
_OWN_KEYS = frozenset({"config_path", "command"})


def model_uri(output_uri: str) -> str:
    """Where the model folder of a run writing to ``output_uri`` lands."""
    return f"{output_uri.rstrip('/')}/{MODEL_SUBDIR}"


def check_output_uri(output_uri: str) -> str:
    """The pods and this machine share no disk: the output must be an s3:// prefix."""
    if not is_remote(output_uri) or not output_uri.removeprefix("s3://").strip("/"):
        raise ConfigError(
            f"output_uri {output_uri!r} must be an s3:// prefix that the training pods can "
            "write and this machine can read (e.g. s3://bucket/runs/r7)"
        )
    return output_uri.rstrip("/")


def check_fetch_to(fetch_to: Path | None) -> None:
    """Refuse a non-empty folder: stale files would sit beside the fetched model unchecked."""
    if fetch_to is None:
        return
    if fetch_to.exists() and (not fetch_to.is_dir() or any(fetch_to.iterdir())):
        raise ConfigError(f"fetch_to {fetch_to}: exists and is not an empty folder")


def remote_train_command(config_uri: str, output_uri: str) -> list[str]:
    """The trainer container's command: torchrun starts `cta train` on every rank."""
    return [
        *TORCHRUN_PREFIX,
        *TRAIN_COMMAND,
        "--config",
        config_uri,
        "--out",
        POD_OUTPUT,
        "--upload-to",
        model_uri(output_uri),
    ]


def default_run_id(config_uri: str, output_uri: str) -> str:
    """A run id fixed by what is trained and where: resubmitting reuses the same TrainJob."""
    digest = hashlib.sha256(f"{config_uri}\n{output_uri.rstrip('/')}".encode()).hexdigest()
    return f"r{digest[:12]}"


def remote_spec(config_uri: str, output_uri: str, spec_kwargs: Mapping[str, Any]) -> TrainJobSpec:
    """The TrainJobSpec for training ``config_uri`` (a path inside the pod) to ``output_uri``.

    ``spec_kwargs`` holds every other TrainJobSpec field; ``run_id`` defaults to
    :func:`default_run_id` and ``name`` to ``cta-train-<run_id>``.
    """
    output_uri = check_output_uri(output_uri)
    own = sorted(_OWN_KEYS & set(spec_kwargs))
    if own:
        raise ConfigError(f"spec_kwargs: {own} are set by run_on_kubeflow")
    data = dict(spec_kwargs)
    data.setdefault("run_id", default_run_id(config_uri, output_uri))
    data.setdefault("name", f"cta-train-{str(data['run_id']).lower()}")
    data["config_path"] = config_uri
    data["command"] = remote_train_command(config_uri, output_uri)
    return load_trainjob_spec(data, "kubeflow training")


def format_log_line(line: PodLogLine) -> str:
    return f"[{line.pod}] {line.line}"


def relay_logs(lines: Iterable[PodLogLine], log: Callable[[str], Any]) -> int:
    """Pass each line to ``log`` with its pod's name; returns how many were passed.

    A log that cannot be read (no pods yet, pods cleaned up, API refusal) is reported through
    ``log`` and does not raise: the TrainJob's own outcome decides success or failure.
    """
    count = 0
    try:
        for line in lines:
            log(format_log_line(line))
            count += 1
    except TrainJobError as exc:
        log(f"(logs unavailable: {exc})")
    return count


def run_on_kubeflow(
    config_uri: str,
    output_uri: str,
    spec_kwargs: Mapping[str, Any],
    *,
    launcher: TrainJobLauncher,
    deadline_s: float,
    poll_s: float = 10.0,
    fetch_to: Path | None = None,
    log: Callable[[str], Any] = print,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Train on Kubeflow; returns {trainjob, model_dir, output_uri}.

    Submits (an identical existing TrainJob is reused), waits up to ``deadline_s``, relays the
    pods' logs, and when ``fetch_to`` is given downloads ``<output_uri>/model`` into it and
    verifies its checksums (DataError on a mismatch). A Failed TrainJob or one past the deadline
    re-raises the launcher's error after relaying whatever logs exist; nothing is fetched then.
    """
    fetch_to = Path(fetch_to) if fetch_to is not None else None
    check_fetch_to(fetch_to)
    output_uri = check_output_uri(output_uri)
    spec = remote_spec(config_uri, output_uri, spec_kwargs)
    submitted = launcher.submit(build_trainjob_manifest(spec))
    verb = "submitted" if submitted.created else "reusing existing"
    log(f"{verb} TrainJob {submitted.namespace}/{submitted.name}")
    try:
        launcher.wait(submitted.name, deadline_s, poll_s)
    except TrainJobError:
        relay_logs(launcher.stream_logs(submitted.name), log)
        raise
    relay_logs(launcher.stream_logs(submitted.name), log)

    model_dir = None
    if fetch_to is not None:
        from components.storage import download_tree
        from cta_model.model_folder import verify_checksums

        download_tree(model_uri(output_uri), fetch_to, endpoint_url=endpoint_url)
        verify_checksums(fetch_to)
        model_dir = str(fetch_to)
        log(f"fetched {model_uri(output_uri)} to {fetch_to}")
    return {"trainjob": submitted.name, "model_dir": model_dir, "output_uri": output_uri}
