"""MLflow tracking for ``cta train``: a trainer callback that records one run and logs the model.

``MlflowTracker`` implements the trainer's callback protocol by duck typing (it never imports
the trainer): ``on_train_start(trainer)``, ``on_step_end(step, logs)``,
``on_epoch_end(epoch, train_logs, val_metrics)``, ``on_train_end(result)`` (``result.model_dir``,
``.best_metrics``, ``.best_epoch``) and ``on_exception(exc)``. Use it as a context manager so a
crash ends the run FAILED::

    with MlflowTracker(None, "cta", "ctal-r18", config.model_dump(mode="json"), {}) as tracker:
        cta_model.training.train(config, callbacks=[tracker])

What a run holds:
- params: the config flattened to dotted keys (``optim.lr``), values cut to MLflow's limits;
- tags: ``cta.data_manifest_sha256``, ``cta.dvc_rev``, ``cta.git_commit``, ``cta.arch``,
  ``cta.tasks`` (comma-separated), then ``cta.model_id`` and ``cta.best_epoch`` at the end; what
  the ``lineage`` argument lacks is filled from ``trainer.lineage()`` and the model folder's
  lineage.json (the argument wins);
- artifacts: ``config.yaml`` and ``lineage.json``;
- metrics: per step (every ``log_every_steps``) ``train/<key>`` at step = global step; per epoch
  the validation metrics under their registry names (``semseg.miou``, ``val_loss``) and
  ``train_epoch/<key>``, at step = epoch; at the end ``best/<key>`` at step = best epoch;
- system metrics ``system/...`` (CPU, memory, disk, network; GPU when pynvml is installed),
  sampled every ``system_metrics_interval_s`` seconds (default 10, MLflow's default; the
  environment variable ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it);
- the LoggedModel (``log_model_folder``). Training never registers a model.

Tracking URI: ``components.registry.client.resolve_tracking_uri`` (the argument, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/.cta/mlflow/mlflow.db``). For a
sqlite store, experiments this tracker creates keep their artifacts next to the database
(``<db dir>/artifacts/<experiment>``), because MLflow would otherwise put them in ``./mlruns``.
The tracker sets the process-wide tracking URI (MLflow also exports it as
``MLFLOW_TRACKING_URI`` for subprocesses).

Failures: HTTP calls are retried by MLflow's own client (urllib3 ``Retry`` on every method, for
connection errors and status 408/429/500/502/503/504): ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
(default 7), ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (2) and ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``
(1.0), each request bounded by ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s). This module adds no retry
loop of its own. What still fails after those retries: metric logging during training warns and
counts the loss (tag ``cta.tracking_dropped_logs``) so that a tracking outage does not kill a
long training; starting the run and logging the model raise.

Distributed training: only the process with ``RANK`` 0 (or no ``RANK``) tracks; the others
ignore every callback.

Crashes and resumes: with ``run_folder`` (the training's output folder) the tracker records its
run id in ``<run_folder>/mlflow_run.json``. A later training in the same folder (a resume after
kill -9, an OOM kill or a lost node) starts a new run and finds the previous one there: a
previous run still RUNNING is ended KILLED (tag ``cta.superseded_by``: nothing stays RUNNING),
and when the trainer resumed from a checkpoint the two are linked (``cta.resumed_from`` and
``cta.resumed_at_step`` on the new run, ``cta.resumed_by`` on the old). A run whose training
raises ends FAILED (KILLED for Ctrl-C) with the error in ``cta.failure``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from components.registry.client import mlflow_client, resolve_tracking_uri, sqlite_path
from components.registry.names import (
    TAG_ARCH,
    TAG_BEST_EPOCH,
    TAG_DROPPED,
    TAG_DVC_REV,
    TAG_FAILURE,
    TAG_GIT_COMMIT,
    TAG_MANIFEST,
    TAG_MODEL_ID,
    TAG_TASKS,
)
from components.train.logged_model import log_model_folder
from cta_model.atomic import write_bytes_atomic
from cta_model.model_folder import read_model_card

_logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_METRICS_INTERVAL_S = 10.0
RUN_RECORD = "mlflow_run.json"  # in the training's output folder: the run that trains there
TAG_SUPERSEDED_BY = "cta.superseded_by"  # on a stale RUNNING run, ended KILLED
TAG_RESUMED_FROM = "cta.resumed_from"  # on a run that resumed another run's checkpoints
TAG_RESUMED_AT_STEP = "cta.resumed_at_step"
TAG_RESUMED_BY = "cta.resumed_by"  # on the interrupted run
TRUNCATION_MARK = "...[truncated]"
# MLflow's portable key alphabet (no colon: Windows rejects it).
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- ]")


# --- experiment ---


def get_or_create_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (with artifacts beside a sqlite store) when missing."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    database = sqlite_path(tracking_uri)
    if database is not None:
        slug = re.sub(r"[^\w.-]+", "_", name).strip("._") or "experiment"
        artifact_location = (database.parent / "artifacts" / slug).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        # Another process created it between the lookup and the create.
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


# --- params, tags and metric names ---


def sanitize_key(key: str) -> str:
    """A valid MLflow param/metric key: allowed characters, a normalised path, <= 250 chars."""
    cleaned = posixpath.normpath(_INVALID_KEY_CHARS.sub("_", key)).lstrip("/")
    # MLflow refuses keys that are not their own normal path or that start with "..".
    if cleaned in ("", ".") or cleaned.startswith(".."):
        cleaned = f"_{cleaned}"
    if len(cleaned) > MAX_ENTITY_KEY_LENGTH:
        # Keep keys unique after cutting: end with a digest of the full key.
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        cleaned = f"{cleaned[: MAX_ENTITY_KEY_LENGTH - 13]}~{digest}"
    return cleaned


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, default=str)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys; lists and scalars to JSON text cut to MLflow's limit."""
    params: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flatten_params(value, prefix=f"{dotted}."))
        else:
            params[sanitize_key(dotted)] = truncate(_param_value(value), MAX_PARAM_VAL_LENGTH)
    return params


def _lookup(mapping: Mapping[str, Any], *dotted_keys: str) -> Any:
    """The first of ``dotted_keys`` present in the nested ``mapping`` (None when none is)."""
    for dotted in dotted_keys:
        node: Any = mapping
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if node is not None:
                return node
    return None


def _tasks_text(tasks: Any) -> str | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        return tasks
    return ",".join(str(task) for task in tasks)


def lineage_tags(config: Mapping[str, Any], lineage: Mapping[str, Any]) -> dict[str, str]:
    """The run's ``cta.*`` tags from lineage (the trainer's lineage.json: ``dataset.*``,
    ``git_commit``, ``config.model.*``; or a ``dataset_ref`` mapping as in dataset_ref.json),
    with the config as fallback for arch and tasks."""
    values = {
        TAG_MANIFEST: _lookup(
            lineage, "dataset_ref.manifest_sha256", "dataset.manifest_sha256", "manifest_sha256"
        ),
        TAG_DVC_REV: _lookup(lineage, "dataset_ref.dvc_rev", "dataset.dvc_rev", "dvc_rev"),
        TAG_GIT_COMMIT: _lookup(lineage, "git_commit", "git.commit", "commit"),
        TAG_ARCH: _lookup(lineage, "config.model.arch", "model.arch", "arch")
        or _lookup(config, "model.arch", "arch"),
        TAG_TASKS: _tasks_text(
            _lookup(lineage, "config.model.tasks", "model.tasks", "tasks")
            or _lookup(config, "model.tasks", "tasks")
        ),
    }
    return {key: truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in values.items() if value}


def numeric_metrics(logs: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Loggable metrics: numbers (incl. 0-d tensors/arrays) under sanitized keys; NaN kept."""
    metrics: dict[str, float] = {}
    for key, value in logs.items():
        if callable(getattr(value, "item", None)):
            try:
                value = value.item()  # torch / numpy scalars
            except (ValueError, TypeError, RuntimeError):
                continue  # not a single number
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metrics[sanitize_key(f"{prefix}{key}")] = float(value)
    return metrics


# --- the callback ---


class MlflowTracker:
    """One MLflow run per training; see the module docstring for what it records."""

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None,
        config: Mapping[str, Any],
        lineage: Mapping[str, Any],
        log_every_steps: int = 10,
        *,
        model_name: str = "model",
        log_system_metrics: bool = True,
        system_metrics_interval_s: float = DEFAULT_SYSTEM_METRICS_INTERVAL_S,
        run_folder: str | os.PathLike[str] | None = None,
    ) -> None:
        if log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {log_every_steps}")
        self.requested_tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.config = dict(config)
        self.lineage = dict(lineage)
        self.log_every_steps = log_every_steps
        self.model_name = model_name
        self.log_system_metrics = log_system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.run_folder = Path(run_folder) if run_folder is not None else None
        self.previous_run_id: str | None = None  # the run recorded in run_folder before ours
        # Under torchrun every process gets the callback; only rank 0 may write the run.
        self.enabled = os.environ.get("RANK", "0") == "0"
        self.tracking_uri: str | None = None
        self.run_id: str | None = None  # kept after the run ends
        self._running = False
        self.model_info: ModelInfo | None = None
        self.dropped_logs = 0
        self._system_monitor: SystemMetricsMonitor | None = None

    # -- lifecycle --

    @property
    def active(self) -> bool:
        """True between start() and the end of the run."""
        return self.enabled and self._running

    def start(self) -> str | None:
        """Start the run once (later calls return the same id); None on ranks other than 0."""
        if not self.enabled or self.run_id is not None:
            return self.run_id
        self.tracking_uri = resolve_tracking_uri(self.requested_tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment_id = get_or_create_experiment(self.experiment, self.tracking_uri)
        # Inside an active run (a pipeline's parent run), become its child instead of failing.
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=self.run_name,
            nested=mlflow.active_run() is not None,
            tags=lineage_tags(self.config, self.lineage),
            log_system_metrics=False,  # our own monitor below: per-run interval, no global env
        )
        self.run_id = run.info.run_id
        self._running = True
        try:
            self._take_over_run_folder()
            params = flatten_params(self.config)
            if params:
                mlflow.log_params(params)
            # Through JSON first: tuples, paths and enums become plain YAML.
            plain_config = json.loads(json.dumps(self.config, default=str))
            mlflow.log_text(yaml.safe_dump(plain_config, sort_keys=False), "config.yaml")
            if self.lineage:
                mlflow.log_text(json.dumps(self.lineage, indent=2, default=str), "lineage.json")
            if self.log_system_metrics:
                self._start_system_metrics()
        except BaseException as exc:
            self.on_exception(exc)
            raise
        return self.run_id

    def _take_over_run_folder(self) -> None:
        """Record this run in run_folder; end the run recorded there before KILLED if it is
        still RUNNING (its process died without ending it)."""
        if self.run_folder is None:
            return
        record = self.run_folder / RUN_RECORD
        try:
            self.previous_run_id = json.loads(record.read_text())["run_id"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _logger.warning("%s: unreadable (%s); not linking to a previous run", record, exc)
        self.run_folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(record, json.dumps({"run_id": self.run_id}).encode())
        if self.previous_run_id in (None, self.run_id):
            return
        client = mlflow_client(self.tracking_uri)
        try:
            previous = client.get_run(self.previous_run_id)
        except MlflowException as exc:
            _logger.warning("previous run %s not found (%s)", self.previous_run_id, exc)
            self.previous_run_id = None
            return
        if previous.info.status == RunStatus.to_string(RunStatus.RUNNING):
            _logger.warning(
                "run %s in %s was left RUNNING (its process died): ending it KILLED",
                self.previous_run_id,
                self.run_folder,
            )
            self._best_effort(client.set_tag, self.previous_run_id, TAG_SUPERSEDED_BY, self.run_id)
            self._best_effort(
                client.set_terminated,
                self.previous_run_id,
                RunStatus.to_string(RunStatus.KILLED),
            )

    def _link_resumed_run(self, trainer: Any) -> None:
        """Tag both runs when the trainer continued the previous run's checkpoints."""
        step = getattr(getattr(trainer, "state", None), "global_step", 0)
        if not self.previous_run_id or not isinstance(step, int) or step <= 0:
            return
        client = mlflow_client(self.tracking_uri)
        self._best_effort(client.set_tag, self.run_id, TAG_RESUMED_FROM, self.previous_run_id)
        self._best_effort(client.set_tag, self.run_id, TAG_RESUMED_AT_STEP, str(step))
        self._best_effort(client.set_tag, self.previous_run_id, TAG_RESUMED_BY, self.run_id)

    def _start_system_metrics(self) -> None:
        monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.system_metrics_interval_s,
            tracking_uri=self.tracking_uri,
        )
        monitor.start()
        self._system_monitor = monitor

    def _stop_system_metrics(self) -> None:
        if self._system_monitor is not None:
            # Joins the sampling thread and flushes what it recorded.
            self._system_monitor.finish()
            self._system_monitor = None

    def end(self, status: str = RunStatus.to_string(RunStatus.FINISHED)) -> None:
        """End the run with ``status`` (FINISHED, FAILED, KILLED); a no-op once ended."""
        if not self.active:
            return
        try:
            self._stop_system_metrics()
            if self.dropped_logs:
                self._best_effort(mlflow.set_tag, TAG_DROPPED, str(self.dropped_logs))
        finally:
            self._running = False
            run_id = self.run_id
            current = mlflow.active_run()
            if current is not None and current.info.run_id == run_id:
                mlflow.end_run(status)
            else:
                # No longer the fluent active run (ended or stacked over elsewhere): by id.
                mlflow_client(self.tracking_uri).set_terminated(run_id, status)

    def __enter__(self) -> MlflowTracker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.on_exception(exc)
        else:
            self.end()

    # -- the trainer's callback protocol --

    def on_train_start(self, trainer: Any = None) -> None:
        self.start()
        if self.active:
            self._link_resumed_run(trainer)
        lineage = getattr(trainer, "lineage", None)
        if self.active and callable(lineage):
            # cta_model.training.Trainer knows the data's digest and the commit: fill what the
            # caller's lineage lacked.
            try:
                self._adopt_lineage(lineage())
            except Exception as exc:
                _logger.warning("could not read the trainer's lineage: %s", exc)

    def on_step_end(self, step: int, logs: Mapping[str, Any]) -> None:
        if not self.active or step % self.log_every_steps != 0:
            return
        self._log_metrics(numeric_metrics(logs, prefix="train/"), step=step)

    def on_epoch_end(
        self, epoch: int, train_logs: Mapping[str, Any], val_metrics: Mapping[str, Any]
    ) -> None:
        if not self.active:
            return
        # Validation metrics keep the task registry's names so runs, evaluation.json and the
        # registry agree (MLflow accepts the dot).
        metrics = {
            **numeric_metrics(train_logs, prefix="train_epoch/"),
            **numeric_metrics(val_metrics),
        }
        self._log_metrics(metrics, step=epoch)

    def on_train_end(self, result: Any) -> ModelInfo | None:
        """Log the model folder as a LoggedModel, tag the run with it, end the run FINISHED."""
        if not self.active:
            return None
        try:
            model_dir = Path(result.model_dir)
            lineage_file = model_dir / "lineage.json"
            if lineage_file.is_file():
                self._adopt_lineage(json.loads(lineage_file.read_text()))
            model_tags = self._model_tags(model_dir)
            mlflow.set_tags({k: v for k, v in model_tags.items() if k in (TAG_ARCH, TAG_TASKS)})
            self.model_info = log_model_folder(model_dir, name=self.model_name, tags=model_tags)
            model_id = self.model_info.model_id
            best_epoch = getattr(result, "best_epoch", None)
            tags = {TAG_MODEL_ID: model_id}
            if best_epoch is not None:
                tags[TAG_BEST_EPOCH] = str(best_epoch)
            mlflow.set_tags(tags)
            # Linked to the LoggedModel too, so the model page shows what selected it.
            self._log_metrics(
                numeric_metrics(getattr(result, "best_metrics", None) or {}, prefix="best/"),
                step=int(best_epoch) if best_epoch is not None else 0,
                model_id=model_id,
            )
        except BaseException as exc:
            self.on_exception(exc)
            raise
        self.end()
        return self.model_info

    def on_exception(self, exc: BaseException) -> None:
        """End the run FAILED (KILLED for Ctrl-C), recording what went wrong."""
        if not self.active:
            return
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED)
        self._best_effort(
            mlflow.set_tag, TAG_FAILURE, truncate(f"{type(exc).__name__}: {exc}", 1000)
        )
        self.end(status)

    # -- helpers --

    def _adopt_lineage(self, found: Mapping[str, Any]) -> None:
        """Merge ``found`` under the caller's lineage (the caller wins); tag what was missing."""
        before = lineage_tags(self.config, self.lineage)
        self.lineage = {**found, **self.lineage}
        missing = {
            key: value
            for key, value in lineage_tags(self.config, self.lineage).items()
            if key not in before
        }
        if missing:
            self._best_effort(mlflow.set_tags, missing)

    def _model_tags(self, model_dir: Path) -> dict[str, str]:
        """The run's lineage tags, with arch and tasks from model.yaml (what was really built)."""
        tags = lineage_tags(self.config, self.lineage)
        spec = read_model_card(model_dir).spec
        tags[TAG_ARCH] = spec.arch
        tags[TAG_TASKS] = ",".join(spec.tasks)
        return tags

    def _log_metrics(
        self, metrics: dict[str, float], step: int, model_id: str | None = None
    ) -> None:
        if metrics:
            # run_id explicit: a run the trainer may have started meanwhile must not get them.
            self._best_effort(
                mlflow.log_metrics, metrics, step=int(step), run_id=self.run_id, model_id=model_id
            )

    def _best_effort(self, call: Any, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as exc:  # after MLflow's own HTTP retries
            self.dropped_logs += 1
            _logger.warning("MLflow %s failed, continuing: %s", call.__name__, exc)


__all__ = [
    "DEFAULT_SYSTEM_METRICS_INTERVAL_S",
    "RUN_RECORD",
    "MlflowTracker",
    "flatten_params",
    "get_or_create_experiment",
    "lineage_tags",
    "numeric_metrics",
    "sanitize_key",
]
