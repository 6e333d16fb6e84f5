"""The training pipeline: validate_data -> (passed) -> train. Only wiring.

Every path is a plain string under ``work_dir`` (absolute); the MLflow ``tracking_uri`` is
handed to every step so they share one store (DESIGN 6.1). The gate is a ``dsl.If`` on the
single output of validate_data: a condition on a NamedTuple output is silently False under
kfp.local (DESIGN 6.2).
"""

from kfp import dsl

from components.train.component import train
from components.validate_data.component import validate_data

PIPELINE_NAME = "cta-training"
VALIDATE_TASK = "validate-data"
TRAIN_TASK = "train"


@dsl.pipeline(name=PIPELINE_NAME, description="Validate a line dataset, then train on it.")
def training_pipeline(
    data_uri: str,
    work_dir: str,
    config_path: str,
    tracking_uri: str,
    experiment: str = "cta",
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
