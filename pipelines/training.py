"""The training pipeline (DESIGN 6): validate_data -> train_baselines -> train -> evaluate ->
roi_report -> register_model -> gate -> rollout (wave 1 only). Only wiring.

Steps hand each other KFP artefacts, never paths on a shared disk: validate_data's ``dataset``
(a folder with dataset_ref.json) feeds every step that reads the data; train's ``model`` holds
the model folder, and the later steps fetch the model through its MLflow LoggedModel id
(kfp.local cannot merge the two training branches' artefacts with ``dsl.OneOf``); evaluate's
``evaluation`` and roi_report's ``roi`` reach register_model. Locally (kfp.local) the artefacts
live under the pipeline root on disk; on a cluster under its S3 pipeline root. Paths that remain
parameters (``config_path``, ``gate_policy``, ``rollout_plan``, ``roi_config``,
``lines_config``) name files in the project image; "" means the shipped configs/gate.yaml
(strict), configs/rollout-plan.yaml, configs/roi.yaml and configs/lines.yaml, and an empty
``rollout_state`` means ``$CTA_ROLLOUT_STATE``. The MLflow ``tracking_uri`` is handed to every
step so they share one store (DESIGN 6.1). Every gate is a ``dsl.If`` on a parameter output: a
condition on a NamedTuple output is silently False under kfp.local (DESIGN 6.2).

On Kubernetes every step gets the settings of pipelines/k8s_settings.py (resources, timeout,
retries, caching, credentials from the Secrets named by ``s3_secret`` and ``mlflow_secret``).
``train_backend`` picks how training runs: ``pod`` trains in the step's own pod with
``train_gpus`` GPUs of ``accelerator_type`` (torchrun, one process per GPU); ``trainjob``
creates a Kubeflow Trainer TrainJob of ``train_nodes`` x ``train_gpus`` writing to
``train_output_uri`` and waits for it.
"""

from kfp import dsl

from components.evaluate.component import evaluate
from components.gate.component import gate
from components.image import GPU_IMAGE
from components.register_model.component import register_model
from components.roi_report.component import roi_report
from components.rollout.component import rollout
from components.train.component import train, train_trainjob
from components.train_baselines.component import train_baselines
from components.validate_data.component import validate_data
from pipelines import k8s_settings
from pipelines.data_fingerprint import data_fingerprint

PIPELINE_NAME = "cta-training"
VALIDATE_TASK = "validate-data"
FINGERPRINT_TASK = "data-fingerprint"
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


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate a line dataset; train, evaluate, price, register, gate and roll out.",
)
def training_pipeline(
    data_uri: str,
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
    validated = validate_data(data_uri=data_uri, lines_config=lines_config)
    validated.set_display_name(VALIDATE_TASK)
    k8s_settings.configure(validated, k8s_settings.VALIDATE, **secrets)
    dataset = validated.outputs["dataset"]
    with dsl.If(validated.outputs["Output"] == True, name="data-passed"):  # noqa: E712 (KFP)
        fingerprint = data_fingerprint(dataset=dataset)
        fingerprint.set_display_name(FINGERPRINT_TASK)
        k8s_settings.configure(fingerprint, k8s_settings.DATA_FINGERPRINT, **secrets)
        baselines = train_baselines(
            dataset=dataset,
            config_path=config_path,
            model_name=model_name,
            tracking_uri=tracking_uri,
            experiment=experiment,
            enabled=stl_baselines,
            lines_config=lines_config,
        )
        baselines.set_display_name(TRAIN_BASELINES_TASK)
        k8s_settings.configure(baselines, k8s_settings.TRAIN_BASELINES, **secrets)
        with dsl.If(train_backend == TRAINJOB_BACKEND, name="train-in-trainjob"):
            launched = train_trainjob(
                dataset=dataset,
                config_path=config_path,
                tracking_uri=tracking_uri,
                experiment=experiment,
                output_uri=train_output_uri,
                run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                image=GPU_IMAGE,
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
                dataset=dataset,
                config_path=config_path,
                tracking_uri=tracking_uri,
                experiment=experiment,
                gpus=train_gpus,
                gpu_type=accelerator_type,
                data_sha256=fingerprint.output,
                lines_config=lines_config,
            )
            trained.set_display_name(TRAIN_TASK)
            k8s_settings.configure(trained, k8s_settings.TRAIN, **secrets)
            k8s_settings.request_gpus(trained, accelerator_type, train_gpus)
        model_id = dsl.OneOf(launched.outputs["Output"], trained.outputs["Output"])
        evaluated = evaluate(
            model_id=model_id,
            dataset=dataset,
            tracking_uri=tracking_uri,
            model_name=model_name,
            bootstrap_n=bootstrap_n,
            latency_repeats=latency_repeats,
            data_sha256=fingerprint.output,
            lines_config=lines_config,
        )
        evaluated.set_display_name(EVALUATE_TASK)
        evaluated.after(baselines)
        k8s_settings.configure(evaluated, k8s_settings.EVALUATE, **secrets)
        priced = roi_report(
            evaluation=evaluated.outputs["evaluation"],
            roi_config=roi_config,
            lines_config=lines_config,
            data_sha256=fingerprint.output,
        )
        priced.set_display_name(ROI_TASK)
        k8s_settings.configure(priced, k8s_settings.ROI_REPORT, **secrets)
        registered = register_model(
            model_id=model_id,
            model_name=model_name,
            tracking_uri=tracking_uri,
            evaluation=evaluated.outputs["evaluation"],
            dataset=dataset,
            roi=priced.outputs["roi"],
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
                lines_config=lines_config,
            )
            rolled_out.set_display_name(ROLLOUT_TASK)
            k8s_settings.configure(rolled_out, k8s_settings.ROLLOUT, **secrets)
