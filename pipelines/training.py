"""The training pipeline (DESIGN 6): validate_data -> (train_baselines when needed) -> train ->
evaluate -> roi_report -> register_model -> gate -> rollout (wave 1 only). Only wiring.

Every path is a plain string under ``work_dir`` (absolute); an empty gate policy, roll-out plan
or state means the shipped configs/gate.yaml (strict), configs/rollout-plan.yaml and
``$CTA_ROLLOUT_STATE``; the MLflow ``tracking_uri`` is
handed to every step so they share one store (DESIGN 6.1). Every gate is a ``dsl.If`` on a
single-output task: a condition on a NamedTuple output is silently False under kfp.local
(DESIGN 6.2). The baselines branch is a sub-pipeline holding its own ``dsl.If``: a task outside a
condition cannot wait for a task inside it, but it can wait for the sub-pipeline, so evaluate
runs after the baselines were trained or found.

On Kubernetes every step gets the settings of pipelines/k8s_settings.py (resources, timeout,
retries, caching, credentials from the Secrets named by ``s3_secret`` and ``mlflow_secret``).
``train_backend`` picks how training runs: ``pod`` trains in the step's own pod with
``train_gpus`` GPUs of ``accelerator_type`` (torchrun, one process per GPU); ``trainjob``
creates a Kubeflow Trainer TrainJob of ``train_nodes`` x ``train_gpus`` writing to
``train_output_uri`` and waits for it. Either way the model folder ends up in
``work_dir/train/model``.
"""

from kfp import dsl

from components.evaluate.component import evaluate
from components.gate.component import gate
from components.image import PROJECT_IMAGE
from components.register_model.component import register_model
from components.roi_report.component import roi_report
from components.rollout.component import rollout
from components.train.component import train, train_trainjob
from components.train_baselines.component import baselines_needed, train_baselines
from components.validate_data.component import validate_data
from pipelines import k8s_settings
from pipelines.data_fingerprint import data_fingerprint

PIPELINE_NAME = "cta-training"
VALIDATE_TASK = "validate-data"
FINGERPRINT_TASK = "data-fingerprint"
BASELINES_NEEDED_TASK = "baselines-needed"
TRAIN_BASELINES_TASK = "train-baselines"
TRAIN_TASK = "train"
TRAIN_TRAINJOB_TASK = "train-trainjob"
EVALUATE_TASK = "evaluate"
ROI_TASK = "roi-report"
REGISTER_TASK = "register-model"
GATE_TASK = "gate"
ROLLOUT_TASK = "rollout"
#: Values of the ``train_backend`` parameter.
POD_BACKEND = "pod"
TRAINJOB_BACKEND = "trainjob"


@dsl.pipeline(name="stl-baselines")
def baselines_branch(
    work_dir: str,
    config_path: str,
    model_name: str,
    tracking_uri: str,
    experiment: str = "cta",
    enabled: bool = True,
    s3_secret: str = k8s_settings.DEFAULT_S3_SECRET,
    mlflow_secret: str = k8s_settings.DEFAULT_MLFLOW_SECRET,
):
    """Train and register the STL baselines only when none matches the data (DESIGN 5.3) and
    ``enabled`` (off: Delta_m stays null with its reason).

    Paths are built here from ``work_dir``: kfp.local passes an f-string argument into a
    sub-pipeline as null (kfp 2.17.3), while one built inside it resolves.
    """
    dataset_ref = f"{work_dir}/validate_data/dataset_ref.json"
    needed = baselines_needed(
        dataset_ref=dataset_ref,
        config_path=config_path,
        model_name=model_name,
        tracking_uri=tracking_uri,
        enabled=enabled,
    )
    needed.set_display_name(BASELINES_NEEDED_TASK)
    secrets = {"s3_secret": s3_secret, "mlflow_secret": mlflow_secret}
    k8s_settings.configure(needed, k8s_settings.BASELINES_NEEDED, **secrets)
    with dsl.If(needed.output == True, name="baselines-missing"):  # noqa: E712 (a KFP condition)
        trained = train_baselines(
            dataset_ref=dataset_ref,
            config_path=config_path,
            out_dir=f"{work_dir}/train_baselines",
            model_name=model_name,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
        trained.set_display_name(TRAIN_BASELINES_TASK)
        k8s_settings.configure(trained, k8s_settings.TRAIN_BASELINES, **secrets)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate a line dataset; train, evaluate, price, register, gate and roll out.",
)
def training_pipeline(
    data_uri: str,
    work_dir: str,
    config_path: str,
    tracking_uri: str,
    experiment: str = "cta",
    gate_policy: str = "",
    rollout_plan: str = "",
    rollout_state: str = "",
    model_name: str = "cta-inspection",
    roi_config: str = "",
    lines_config: str = "",
    rollout_backend: str = "local",
    approver: str = "",
    bootstrap_n: int = 1000,
    latency_repeats: int = 5,
    stl_baselines: bool = True,
    s3_secret: str = k8s_settings.DEFAULT_S3_SECRET,
    mlflow_secret: str = k8s_settings.DEFAULT_MLFLOW_SECRET,
    train_backend: str = POD_BACKEND,
    train_gpus: int = 0,
    train_nodes: int = 1,
    accelerator_type: str = k8s_settings.DEFAULT_ACCELERATOR,
    train_output_uri: str = "",
):
    secrets = {"s3_secret": s3_secret, "mlflow_secret": mlflow_secret}
    dataset_ref = f"{work_dir}/validate_data/dataset_ref.json"
    validated = validate_data(
        data_uri=data_uri, out_dir=f"{work_dir}/validate_data", lines_config=lines_config
    )
    validated.set_display_name(VALIDATE_TASK)
    k8s_settings.configure(validated, k8s_settings.VALIDATE, **secrets)
    with dsl.If(validated.output == True, name="data-passed"):  # noqa: E712 (a KFP condition)
        fingerprint = data_fingerprint(dataset_ref=dataset_ref)
        fingerprint.set_display_name(FINGERPRINT_TASK)
        k8s_settings.configure(fingerprint, k8s_settings.DATA_FINGERPRINT, **secrets)
        baselines = baselines_branch(
            work_dir=work_dir,
            config_path=config_path,
            model_name=model_name,
            tracking_uri=tracking_uri,
            experiment=experiment,
            enabled=stl_baselines,
            **secrets,
        )
        with dsl.If(train_backend == TRAINJOB_BACKEND, name="train-in-trainjob"):
            launched = train_trainjob(
                dataset_ref=dataset_ref,
                config_path=config_path,
                out_dir=f"{work_dir}/train",
                tracking_uri=tracking_uri,
                experiment=experiment,
                output_uri=train_output_uri,
                run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                image=PROJECT_IMAGE,
                nodes=train_nodes,
                gpus=train_gpus,
                s3_secret=s3_secret,
                mlflow_secret=mlflow_secret,
                data_sha256=fingerprint.output,
            )
            launched.set_display_name(TRAIN_TRAINJOB_TASK)
            k8s_settings.configure(launched, k8s_settings.TRAIN_TRAINJOB, **secrets)
            k8s_settings.expose_pod_identity(launched)
        with dsl.Else(name="train-in-pod"):
            trained = train(
                dataset_ref=dataset_ref,
                config_path=config_path,
                out_dir=f"{work_dir}/train",
                tracking_uri=tracking_uri,
                experiment=experiment,
                gpus=train_gpus,
                gpu_type=accelerator_type,
                data_sha256=fingerprint.output,
            )
            trained.set_display_name(TRAIN_TASK)
            k8s_settings.configure(trained, k8s_settings.TRAIN, **secrets)
            k8s_settings.request_gpus(trained, accelerator_type, train_gpus)
        model_id = dsl.OneOf(launched.output, trained.output)
        evaluated = evaluate(
            model_dir=f"{work_dir}/train/model",
            dataset_ref=dataset_ref,
            out_dir=f"{work_dir}/evaluate",
            model_id=model_id,
            tracking_uri=tracking_uri,
            model_name=model_name,
            bootstrap_n=bootstrap_n,
            latency_repeats=latency_repeats,
            data_sha256=fingerprint.output,
        )
        evaluated.set_display_name(EVALUATE_TASK)
        evaluated.after(baselines)
        k8s_settings.configure(evaluated, k8s_settings.EVALUATE, **secrets)
        priced = roi_report(
            evaluation=evaluated.outputs["Output"],
            out_dir=f"{work_dir}/roi_report",
            roi_config=roi_config,
            lines_config=lines_config,
            data_sha256=fingerprint.output,
        )
        priced.set_display_name(ROI_TASK)
        k8s_settings.configure(priced, k8s_settings.ROI_REPORT, **secrets)
        registered = register_model(
            model_id=model_id,
            model_name=model_name,
            evaluation=evaluated.outputs["Output"],
            dataset_ref=dataset_ref,
            tracking_uri=tracking_uri,
            roi=priced.outputs["Output"],
        )
        registered.set_display_name(REGISTER_TASK)
        k8s_settings.configure(registered, k8s_settings.REGISTER_MODEL, **secrets)
        verdict = gate(
            model_name=model_name,
            version=registered.output,
            policy_path=gate_policy,
            tracking_uri=tracking_uri,
            approver=approver,
        )
        verdict.set_display_name(GATE_TASK)
        k8s_settings.configure(verdict, k8s_settings.GATE, **secrets)
        with dsl.If(verdict.output == "pass", name="gate-passed"):
            rolled_out = rollout(
                model_name=model_name,
                version=registered.output,
                plan=rollout_plan,
                data=data_uri,
                state=rollout_state,
                tracking_uri=tracking_uri,
                backend=rollout_backend,
            )
            rolled_out.set_display_name(ROLLOUT_TASK)
            k8s_settings.configure(rolled_out, k8s_settings.ROLLOUT, **secrets)
