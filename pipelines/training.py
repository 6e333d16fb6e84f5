"""The training pipeline: validate_data -> (passed) -> train -> evaluate -> register_model.
Only wiring.

Every path is a plain string under ``work_dir`` (absolute); the MLflow ``tracking_uri`` is
handed to every step so they share one store (DESIGN 6.1). The gate is a ``dsl.If`` on the
single output of validate_data: a condition on a NamedTuple output is silently False under
kfp.local (DESIGN 6.2).
"""

from kfp import dsl

from components.evaluate.component import evaluate
from components.register_model.component import register_model
from components.train.component import train
from components.validate_data.component import validate_data

PIPELINE_NAME = "cta-training"
VALIDATE_TASK = "validate-data"
TRAIN_TASK = "train"
EVALUATE_TASK = "evaluate"
REGISTER_TASK = "register-model"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate a line dataset, then train, evaluate and register a model.",
)
def training_pipeline(
    data_uri: str,
    work_dir: str,
    config_path: str,
    tracking_uri: str,
    experiment: str = "cta",
    model_name: str = "cta-inspection",
):
    validate = validate_data(data_uri=data_uri, out_dir=f"{work_dir}/validate_data")
    validate.set_display_name(VALIDATE_TASK)
    with dsl.If(validate.output == True, name="data-passed"):  # noqa: E712 (a KFP condition)
        trained = train(
            dataset_ref=f"{work_dir}/validate_data/dataset_ref.json",
            config_path=config_path,
            out_dir=f"{work_dir}/train",
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
        trained.set_display_name(TRAIN_TASK)
        evaluated = evaluate(
            model_dir=f"{work_dir}/train/model",
            dataset_ref=f"{work_dir}/validate_data/dataset_ref.json",
            out_dir=f"{work_dir}/evaluate",
            model_id=trained.output,
        )
        evaluated.set_display_name(EVALUATE_TASK)
        registered = register_model(
            model_id=trained.output,
            model_name=model_name,
            evaluation=evaluated.output,
            dataset_ref=f"{work_dir}/validate_data/dataset_ref.json",
            tracking_uri=tracking_uri,
        )
        registered.set_display_name(REGISTER_TASK)
