"""Submit the training pipeline to a Kubeflow Pipelines server, or schedule it (recurring run).

Both compile the pipeline afresh (so the components carry the current ``CTA_IMAGE``) and talk
to the KFP v2beta1 REST API through ``kfp.Client``:

- ``submit_run``: get-or-create the experiment, then one run whose pipeline spec travels inline.
- ``schedule_run``: upload the compiled pipeline as a new, immutable pipeline version (the
  pipeline is created on first use), get-or-create the experiment, then a recurring run that
  references that version with a cron trigger.

KFP's scheduler parses cron with seconds (6 fields, robfig/cron); ``normalise_cron`` accepts the
usual 5-field form and prefixes ``0 `` (DESIGN 6.2). The bearer token is handed to the client
and never printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cta_model.errors import ConfigError

#: Environment variable holding a bearer token for the KFP API (e.g. a Dex/OIDC id token).
TOKEN_ENV = "KFP_TOKEN"
#: A tracking URI in the environment fills the pipeline's ``tracking_uri`` when not given.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_KFP_EXPERIMENT = "cta"

# robfig/cron (KFP's scheduler): seconds minutes hours day-of-month month day-of-week.
_CRON_FIELDS = (
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_DESCRIPTORS = {
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
}
_CRON_PART = re.compile(r"^(?P<range>\*|\?|[^/\-]+(?:-[^/\-]+)?)(?:/(?P<step>\d+))?$")


def normalise_cron(expression: str) -> str:
    """A 6-field cron expression (seconds first) for KFP, from a 5- or 6-field one.

    ``"0 */6 * * *"`` -> ``"0 0 */6 * * *"``. Descriptors such as ``@daily`` pass unchanged.
    Raises ConfigError naming ``--cron`` and the offending field.
    """
    text = " ".join(expression.split())
    if text.lower() in _CRON_DESCRIPTORS:
        return text.lower()
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ConfigError(
            f"--cron {expression!r}: expected 5 fields (minute hour day-of-month month "
            f"day-of-week) or 6 with seconds first, got {len(fields)}"
        )
    for field, (name, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(expression, field, name, low, high)
    return " ".join(fields)


def _check_cron_field(expression: str, field: str, name: str, low: int, high: int) -> None:
    def fail(why: str) -> ConfigError:
        return ConfigError(f"--cron {expression!r}: {name} field {field!r}: {why}")

    names = _MONTH_NAMES if name == "month" else _DAY_NAMES if name == "day-of-week" else ()
    for part in field.split(","):
        match = _CRON_PART.match(part)
        if not match:
            raise fail(f"cannot parse {part!r}")
        span = match.group("range")
        if span == "?" and name not in ("day-of-month", "day-of-week"):
            raise fail("'?' is allowed only in day-of-month and day-of-week")
        if match.group("step") is not None and int(match.group("step")) == 0:
            raise fail("a step of 0 never fires")
        if span in ("*", "?"):
            continue
        bounds = [_cron_value(value, names) for value in span.split("-")]
        if any(value is None for value in bounds):
            raise fail(f"{span!r} is not a number" + (" or a name" if names else ""))
        if any(not low <= value <= high for value in bounds):
            raise fail(f"{span!r} is outside {low}-{high}")
        if len(bounds) == 2 and bounds[0] > bounds[1]:
            raise fail(f"range {span!r} runs backwards")


def _cron_value(text: str, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text)
    if text.upper() in names:
        offset = 1 if names is _MONTH_NAMES else 0
        return names.index(text.upper()) + offset
    return None


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}``; raises ConfigError naming ``--param`` for bad items."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        if key in params:
            raise ConfigError(f"--param {key!r} given twice")
        params[key] = value
    return params


@dataclass(frozen=True)
class CompiledPipeline:
    """The compiled training pipeline: its IR YAML file and what its root takes."""

    path: Path
    name: str
    sha256: str
    required: frozenset[str]
    optional: frozenset[str]


def compile_training_pipeline(out_dir: Path) -> CompiledPipeline:
    """Compile the training pipeline into ``out_dir``; reads its parameters back from the IR."""
    import yaml

    from pipelines.run import compile_pipeline

    path = compile_pipeline(out_dir / "training.yaml")
    raw = path.read_bytes()
    spec = next(iter(yaml.safe_load_all(raw)))
    parameters = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    optional = {name for name, info in parameters.items() if info.get("isOptional")}
    return CompiledPipeline(
        path=path,
        name=spec["pipelineInfo"]["name"],
        sha256=hashlib.sha256(raw).hexdigest(),
        required=frozenset(set(parameters) - optional),
        optional=frozenset(optional),
    )


def pipeline_arguments(compiled: CompiledPipeline, params: dict[str, str]) -> dict[str, str]:
    """The run's parameters: ``params`` checked against the pipeline's inputs.

    ``tracking_uri`` falls back to ``$MLFLOW_TRACKING_URI`` (flag > env). Unknown names and
    missing required ones raise ConfigError naming ``--param``.
    """
    arguments = dict(params)
    if "tracking_uri" not in arguments and os.environ.get(TRACKING_URI_ENV):
        arguments["tracking_uri"] = os.environ[TRACKING_URI_ENV]
    known = compiled.required | compiled.optional
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ConfigError(
            f"--param {', '.join(unknown)}: not a parameter of pipeline {compiled.name} "
            f"(it takes {', '.join(sorted(known))})"
        )
    missing = sorted(compiled.required - set(arguments))
    if missing:
        hint = f" (or set ${TRACKING_URI_ENV})" if "tracking_uri" in missing else ""
        raise ConfigError(
            f"--param missing for required pipeline parameter(s): {', '.join(missing)}{hint}"
        )
    return arguments


def make_client(host: str, namespace: str | None = None, token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host``; ``token`` is sent as ``Authorization: Bearer``."""
    import kfp
    import urllib3

    if not re.match(r"^https?://[^/\s]+", host):
        raise ConfigError(f"--host {host!r}: expected an http:// or https:// URL")
    with warnings.catch_warnings(), _kfp_prints_to_stderr():
        # kfp warns on every construction that it needs a v2 backend, which is what we target.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"kfp\.client.*")
        kwargs: dict[str, Any] = {"host": host, "existing_token": token or None}
        if namespace:
            kwargs["namespace"] = namespace
        try:
            # Without a namespace the client asks /healthz whether KFP is multi-user.
            return kfp.Client(**kwargs)
        except (TimeoutError, urllib3.exceptions.HTTPError) as exc:
            raise ConfigError(f"--host {host}: no KFP API answers there ({exc})") from None


@contextlib.contextmanager
def _kfp_prints_to_stderr():
    """kfp.Client prints UI links on stdout; keep stdout for our own (possibly JSON) result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def submit_run(
    host: str,
    params: dict[str, str],
    *,
    namespace: str | None = None,
    experiment: str = DEFAULT_KFP_EXPERIMENT,
    run_name: str | None = None,
    service_account: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Compile and submit one run.

    Returns ``{run_id, run_name, experiment_id, pipeline_sha256}``.
    """
    with tempfile.TemporaryDirectory(prefix="cta-submit-") as tmp:
        compiled = compile_training_pipeline(Path(tmp))
        arguments = pipeline_arguments(compiled, params)
        client = make_client(host, namespace, token)
        name = run_name or f"{compiled.name}-{_utc_stamp()}"
        with _kfp_prints_to_stderr():
            result = client.create_run_from_pipeline_package(
                str(compiled.path),
                arguments=arguments,
                run_name=name,
                experiment_name=experiment,
                namespace=namespace or None,
                service_account=service_account or None,
            )
    return {
        "run_id": result.run_id,
        "run_name": name,
        "experiment_id": result.run_info.experiment_id,
        "pipeline_sha256": compiled.sha256,
    }


def schedule_run(
    host: str,
    cron: str,
    params: dict[str, str],
    *,
    name: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
    namespace: str | None = None,
    experiment: str = DEFAULT_KFP_EXPERIMENT,
    service_account: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload a pipeline version and create a recurring run on it with a cron trigger.

    Returns ``{recurring_run_id, name, cron, pipeline_id, pipeline_version_id, experiment_id,
    pipeline_sha256}``; ``cron`` is the 6-field expression sent.
    """
    cron6 = normalise_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {max_concurrency}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="cta-schedule-") as tmp:
        compiled = compile_training_pipeline(Path(tmp))
        arguments = pipeline_arguments(compiled, params)
        client = make_client(host, namespace, token)
        version_name = f"{compiled.name}-{_utc_stamp()}-{compiled.sha256[:8]}"
        with _kfp_prints_to_stderr():
            pipeline_id, version_id = _upload_version(client, compiled, version_name, namespace)
            experiment_id = client.create_experiment(
                name=experiment, namespace=namespace or None
            ).experiment_id
            recurring = client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name or f"{compiled.name}-retrain",
                description=f"retrain {compiled.name} on cron {cron6!r} (version {version_name})",
                cron_expression=cron6,
                max_concurrency=max_concurrency,
                no_catchup=not catchup,
                params=arguments,
                pipeline_id=pipeline_id,
                version_id=version_id,
                service_account=service_account or None,
            )
    return {
        "recurring_run_id": recurring.recurring_run_id,
        "name": name or f"{compiled.name}-retrain",
        "cron": cron6,
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "experiment_id": experiment_id,
        "pipeline_sha256": compiled.sha256,
    }


def _upload_version(
    client: Any, compiled: CompiledPipeline, version_name: str, namespace: str | None
) -> tuple[str, str]:
    """(pipeline_id, version_id) of a new version of the pipeline named ``compiled.name``."""
    pipeline_id = client.get_pipeline_id(compiled.name)
    if pipeline_id is None:
        # A new pipeline gets one version made from the uploaded file; that is ours.
        pipeline_id = client.upload_pipeline(
            str(compiled.path),
            pipeline_name=compiled.name,
            description="cta training pipeline (uploaded by cta pipeline schedule)",
            namespace=namespace or None,
        ).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
        if len(versions) != 1:
            raise RuntimeError(
                f"KFP created pipeline {pipeline_id} with {len(versions)} versions, expected 1"
            )
        return pipeline_id, versions[0].pipeline_version_id
    version = client.upload_pipeline_version(
        str(compiled.path), pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    return pipeline_id, version.pipeline_version_id


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
