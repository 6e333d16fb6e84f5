"""Training on Kubeflow: submit a TrainJob, wait with a deadline, show its logs, fetch the model.

The pods train into a local folder and rank 0 uploads the model folder to ``<output_uri>/model``
(``cta train --upload-to``) and the run's summary (model_id, metrics) to
``<output_uri>/train_summary.json``; :func:`run_on_kubeflow` then downloads the folder with
:func:`components.storage.download_tree`, checks it against its SHA256SUMS and reads the summary.
:func:`train_in_trainjob` is the pipeline's train step on that path: it owns the TrainJob through
its pod and deletes it when the run is cancelled. Every decision is a plain function here;
:class:`~components.train.trainjob.TrainJobLauncher` talks to the API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.storage import is_remote
from components.train.trainjob import (
    TORCHRUN_PREFIX,
    TRAIN_COMMAND,
    PodLogLine,
    TrainJobCancelled,
    TrainJobError,
    TrainJobLauncher,
    TrainJobSpec,
    TrainJobState,
    build_trainjob_manifest,
    load_trainjob_spec,
)
from cta_model.data.dataset_ref import DATASET_REF_NAME
from cta_model.errors import ConfigError, DataError

# Where each pod trains; rank 0 uploads <POD_OUTPUT>/model to <output_uri>/model.
POD_OUTPUT = "/workspace/out"
MODEL_SUBDIR = "model"
SUMMARY_NAME = "train_summary.json"
# Keys of the spec that run_on_kubeflow sets itself.
_OWN_KEYS = frozenset({"config_path", "command"})


def model_uri(output_uri: str) -> str:
    """Where the model folder of a run writing to ``output_uri`` lands."""
    return f"{output_uri.rstrip('/')}/{MODEL_SUBDIR}"


def summary_uri(output_uri: str) -> str:
    """Where rank 0 writes the run's summary (``cta train --summary-out``)."""
    return f"{output_uri.rstrip('/')}/{SUMMARY_NAME}"


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


def remote_train_command(
    config_uri: str, output_uri: str, extra_args: Sequence[str] = ()
) -> list[str]:
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
        "--summary-out",
        summary_uri(output_uri),
        *extra_args,
    ]


def default_run_id(config_uri: str, output_uri: str) -> str:
    """A run id fixed by what is trained and where: resubmitting reuses the same TrainJob."""
    digest = hashlib.sha256(f"{config_uri}\n{output_uri.rstrip('/')}".encode()).hexdigest()
    return f"r{digest[:12]}"


def remote_spec(
    config_uri: str,
    output_uri: str,
    spec_kwargs: Mapping[str, Any],
    extra_args: Sequence[str] = (),
) -> TrainJobSpec:
    """The TrainJobSpec for training ``config_uri`` (a path inside the pod) to ``output_uri``.

    ``spec_kwargs`` holds every other TrainJobSpec field; ``run_id`` defaults to
    :func:`default_run_id` and ``name`` to ``cta-train-<run_id>``. ``extra_args`` go to
    `cta train` after the ones this module sets.
    """
    output_uri = check_output_uri(output_uri)
    own = sorted(_OWN_KEYS & set(spec_kwargs))
    if own:
        raise ConfigError(f"spec_kwargs: {own} are set by run_on_kubeflow")
    data = dict(spec_kwargs)
    data.setdefault("run_id", default_run_id(config_uri, output_uri))
    data.setdefault("name", f"cta-train-{str(data['run_id']).lower()}")
    data["config_path"] = config_uri
    data["command"] = remote_train_command(config_uri, output_uri, extra_args)
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


def describe_state(namespace: str, name: str, state: TrainJobState) -> str:
    return f"TrainJob {namespace}/{name}: {state.describe()}"


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
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Train on Kubeflow; returns {trainjob, model_dir, output_uri, summary}.

    Submits (an identical existing TrainJob is reused), waits up to ``deadline_s`` logging each
    change of state, relays the pods' logs, reads the summary rank 0 wrote (model_id, metrics)
    and, when ``fetch_to`` is given, downloads ``<output_uri>/model`` into it and verifies its
    checksums (DataError on a mismatch). A Failed TrainJob or one past the deadline re-raises
    the launcher's error after relaying whatever logs exist; nothing is fetched then. Cancelled
    while waiting (KeyboardInterrupt, TrainJobCancelled), it deletes the TrainJob and re-raises.
    """
    fetch_to = Path(fetch_to) if fetch_to is not None else None
    check_fetch_to(fetch_to)
    output_uri = check_output_uri(output_uri)
    spec = remote_spec(config_uri, output_uri, spec_kwargs, extra_args)
    submitted = launcher.submit(build_trainjob_manifest(spec))
    verb = "submitted" if submitted.created else "reusing existing"
    log(f"{verb} TrainJob {submitted.namespace}/{submitted.name}")
    try:
        launcher.wait(
            submitted.name,
            deadline_s,
            poll_s,
            on_state=lambda state: log(describe_state(submitted.namespace, submitted.name, state)),
        )
    except (KeyboardInterrupt, TrainJobCancelled):
        deleted = launcher.delete(submitted.name)
        log(
            f"cancelled: TrainJob {submitted.namespace}/{submitted.name} "
            + ("deleted" if deleted else "was already gone")
        )
        raise
    except TrainJobError:
        relay_logs(launcher.stream_logs(submitted.name), log)
        raise
    relay_logs(launcher.stream_logs(submitted.name), log)
    summary = read_summary(output_uri, endpoint_url)

    model_dir = None
    if fetch_to is not None:
        from components.storage import download_tree
        from cta_model.model_folder import verify_checksums

        download_tree(model_uri(output_uri), fetch_to, endpoint_url=endpoint_url)
        verify_checksums(fetch_to)
        model_dir = str(fetch_to)
        log(f"fetched {model_uri(output_uri)} to {fetch_to}")
    return {
        "trainjob": submitted.name,
        "model_dir": model_dir,
        "output_uri": output_uri,
        "summary": summary,
    }


def read_summary(output_uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The summary rank 0 wrote; DataError when the run left none (an image older than it)."""
    from components.storage import read_bytes

    uri = summary_uri(output_uri)
    try:
        return json.loads(read_bytes(uri, endpoint_url=endpoint_url))
    except DataError:
        raise DataError(
            f"{uri}: the TrainJob finished without its summary; does the training image's "
            "`cta train` have --summary-out for s3:// URIs?"
        ) from None


# --------------------------------------------------------------------- the pipeline's step
def pod_identity(environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """(namespace, owner) of the step's pod from the downward API variables the IR sets."""
    missing = [name for name in ("POD_NAMESPACE", "POD_NAME", "POD_UID") if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not set: the TrainJob backend runs only in a KFP step pod on "
            "Kubernetes (the compiled pipeline sets them from the downward API)"
        )
    return environ["POD_NAMESPACE"], {"name": environ["POD_NAME"], "uid": environ["POD_UID"]}


def credential_env(s3_secret: str | None, mlflow_secret: str | None) -> dict[str, Any]:
    """TrainJobSpec.secret_env for the pods' credentials: the AWS keys from ``s3_secret``, and
    MLflow's basic-auth user and password from ``mlflow_secret`` (optional keys: a server without
    authentication needs no Secret). The Secrets' keys are the variables' names."""
    secret_env: dict[str, Any] = {}
    if s3_secret:
        secret_env |= {"AWS_ACCESS_KEY_ID": s3_secret, "AWS_SECRET_ACCESS_KEY": s3_secret}
    if mlflow_secret:
        secret_env |= {
            key: {"secret": mlflow_secret, "key": key, "optional": True}
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        }
    return secret_env


#: Variables passed on to the training pods when the step has them (none is a credential).
PASSED_ENV = ("CTA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION")


def pipeline_spec_kwargs(
    *,
    namespace: str,
    owner: Mapping[str, str],
    run_key: str,
    image: str,
    nodes: int,
    gpus: int,
    tracking_uri: str,
    s3_secret: str,
    mlflow_secret: str,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """The TrainJobSpec fields of the pipeline's TrainJob: one per pipeline run (``run_key``,
    e.g. the KFP run id), owned by the step's pod, with the step's credentials by reference."""
    run_id = "r" + hashlib.sha256(run_key.encode()).hexdigest()[:12]
    env = {name: environ[name] for name in PASSED_ENV if environ.get(name)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return {
        "namespace": namespace,
        "owner": dict(owner),
        "run_id": run_id,
        "name": f"cta-train-{run_id}",
        "image": image,
        "num_nodes": nodes,
        "num_proc_per_node": gpus if gpus > 0 else "auto",
        "resources": {"gpus": gpus},
        "env": env,
        "secret_env": credential_env(s3_secret, mlflow_secret),
    }


@contextlib.contextmanager
def cancelled_by_sigterm() -> Iterator[None]:
    """Turn SIGTERM (what a cancelled KFP run sends the step's pod) into TrainJobCancelled.

    Only the main thread can install a handler; elsewhere (tests driving an API emulator from
    the main thread) this does nothing and the ownerReference remains the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TrainJobCancelled("the step was terminated (SIGTERM): the run was cancelled")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_in_trainjob(
    *,
    dataset_ref: str,
    config_path: str,
    out_dir: str,
    output_uri: str,
    run_key: str,
    image: str,
    nodes: int,
    gpus: int,
    tracking_uri: str = "",
    experiment: str = "cta",
    s3_secret: str,
    mlflow_secret: str = "",
    deadline_s: float = 24 * 3600.0,
    poll_s: float = 30.0,
    launcher: TrainJobLauncher | None = None,
    environ: Mapping[str, str] | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """The pipeline's train step as a TrainJob of ``nodes`` x ``gpus``; returns the summary of
    the training run with ``model_dir`` the fetched copy under ``out_dir/model``.

    ``config_path`` must exist inside the training image (the pipeline's configs do); the
    validated dataset_ref goes to ``<output_uri>/<run id>/dataset_ref.json`` for the pods to
    read, so the data must be on S3 too.
    """
    from components.storage import write_bytes_atomic
    from components.train.trainjob import default_api_client

    environ = os.environ if environ is None else environ
    namespace, owner = pod_identity(environ)
    kwargs = pipeline_spec_kwargs(
        namespace=namespace,
        owner=owner,
        run_key=run_key,
        image=image,
        nodes=nodes,
        gpus=gpus,
        tracking_uri=tracking_uri,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
        environ=environ,
    )
    run_uri = f"{check_output_uri(output_uri)}/{kwargs['run_id']}"
    ref_uri = f"{run_uri}/{DATASET_REF_NAME}"
    write_bytes_atomic(ref_uri, Path(dataset_ref).read_bytes())
    if launcher is None:
        launcher = TrainJobLauncher(default_api_client(), namespace=namespace)
    with cancelled_by_sigterm():
        result = run_on_kubeflow(
            config_path,
            run_uri,
            kwargs,
            launcher=launcher,
            deadline_s=deadline_s,
            poll_s=poll_s,
            fetch_to=Path(out_dir) / MODEL_SUBDIR,
            log=log,
            extra_args=("--data", ref_uri, "--experiment", experiment),
        )
    return {**result["summary"], "model_dir": result["model_dir"], "trainjob": result["trainjob"]}
