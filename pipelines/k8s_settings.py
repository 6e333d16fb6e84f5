"""What each step of the training pipeline asks of Kubernetes: resources, a timeout, retries,
caching, credentials from Secrets and, for training, GPUs (issue 16, item 2).

kfp.local ignores all of this (DESIGN 6.2), so ``make demo`` runs the same pipeline unchanged;
on a cluster the KFP backend turns it into the step pods' spec. Retries only where a step is
idempotent (it reads its inputs and rewrites its own outputs): never for steps that register,
decide or roll out. Caching only for steps without side effects, and those take the data's
manifest sha256 as an input so that new data behind the same URI misses the cache (kfp 2.17's
``cache_key`` is one static string, so it cannot carry the data's identity).
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl, kubernetes

#: Secret keys -> environment variables. The S3 Secret is required (every step reads or writes
#: S3 on a cluster); the MLflow one is optional (a server without authentication needs none).
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
DEFAULT_S3_SECRET = "cta-s3"
DEFAULT_MLFLOW_SECRET = "cta-mlflow"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"

#: The step pod's own identity (downward API): the TrainJob launcher names its owner with it.
POD_FIELD_ENV = {
    "POD_NAME": "metadata.name",
    "POD_UID": "metadata.uid",
    "POD_NAMESPACE": "metadata.namespace",
}

# Exponential back-off: 30 s, 60 s, ... for at most an hour of retrying.
RETRY_BACKOFF = "30s"
RETRY_FACTOR = 2.0
RETRY_MAX = "3600s"


@dataclass(frozen=True)
class StepSettings:
    """Requests/limits as Kubernetes quantities, the pod's activeDeadlineSeconds, how many
    retries (0: none) and whether KFP may serve the step from its cache."""

    cpu: tuple[str, str]
    memory: tuple[str, str]
    timeout_s: int
    retries: int
    cache: bool


HOUR = 3600
VALIDATE = StepSettings(("1", "2"), ("2Gi", "4Gi"), HOUR, retries=2, cache=False)
DATA_FINGERPRINT = StepSettings(("100m", "250m"), ("256Mi", "512Mi"), 300, retries=2, cache=False)
# Asks the registry (whose answer changes with no input changing) and registers the missing STL
# baselines: never cached, never retried.
TRAIN_BASELINES = StepSettings(("4", "4"), ("16Gi", "16Gi"), 12 * HOUR, retries=0, cache=False)
# A retried train would log a second MLflow run and LoggedModel: no retries.
TRAIN = StepSettings(("8", "8"), ("32Gi", "32Gi"), 24 * HOUR, retries=0, cache=True)
# Creates a TrainJob on the cluster and waits for it: a side effect, and its run id is new.
TRAIN_TRAINJOB = StepSettings(("250m", "1"), ("512Mi", "1Gi"), 25 * HOUR, retries=0, cache=False)
EVALUATE = StepSettings(("4", "4"), ("8Gi", "8Gi"), 4 * HOUR, retries=2, cache=True)
ROI_REPORT = StepSettings(("500m", "1"), ("1Gi", "2Gi"), 1800, retries=2, cache=True)
REGISTER_MODEL = StepSettings(("500m", "1"), ("1Gi", "2Gi"), 1800, retries=0, cache=False)
GATE = StepSettings(("250m", "500m"), ("512Mi", "1Gi"), 600, retries=0, cache=False)
ROLLOUT = StepSettings(("500m", "1"), ("1Gi", "2Gi"), HOUR, retries=0, cache=False)


def configure(
    task: dsl.PipelineTask,
    settings: StepSettings,
    *,
    s3_secret: str | dsl.PipelineParameterChannel,
    mlflow_secret: str | dsl.PipelineParameterChannel,
) -> dsl.PipelineTask:
    """Apply ``settings`` and the credentials to one task; returns the task."""
    task.set_cpu_request(settings.cpu[0]).set_cpu_limit(settings.cpu[1])
    task.set_memory_request(settings.memory[0]).set_memory_limit(settings.memory[1])
    task.set_caching_options(enable_caching=settings.cache)
    if settings.retries:
        task.set_retry(
            num_retries=settings.retries,
            backoff_duration=RETRY_BACKOFF,
            backoff_factor=RETRY_FACTOR,
            backoff_max_duration=RETRY_MAX,
        )
    kubernetes.set_timeout(task, settings.timeout_s)
    kubernetes.use_secret_as_env(task, s3_secret, S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(task, mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
    return task


def request_gpus(
    task: dsl.PipelineTask,
    accelerator_type: str | dsl.PipelineParameterChannel,
    count: int | dsl.PipelineParameterChannel,
) -> dsl.PipelineTask:
    """GPUs for one task from pipeline parameters (a count of 0 requests none).

    kfp 2.17.3 does not carry a parameter used only here into an enclosing ``dsl.If``: the task
    must also take both as inputs (the train component does), or the IR names an input that its
    condition never receives. Those inputs must not be called ``accelerator_type`` or
    ``accelerator_count``: the compiler writes its own task inputs under these names.
    """
    return task.set_accelerator_type(accelerator_type).set_accelerator_limit(count)


def expose_pod_identity(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """POD_NAME, POD_UID and POD_NAMESPACE from the downward API."""
    for env_name, field_path in POD_FIELD_ENV.items():
        kubernetes.use_field_path_as_env(task, env_name, field_path)
    return task
