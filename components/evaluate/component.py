"""KFP wrapper of the evaluate step: only calls components.evaluate.step.run().

Scores the model folder ``model_dir`` on the test split of the validated data and writes
``out_dir/evaluation.json``; returns that path (the register step attaches it).
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(model_dir: str, dataset_ref: str, out_dir: str, model_id: str) -> str:
    """Evaluate one model folder; returns the evaluation.json path."""
    from pathlib import Path

    from components.evaluate.step import EVALUATION_NAME, run

    run(model_dir, dataset_ref, out_dir, model_id=model_id or None)
    return str(Path(out_dir) / EVALUATION_NAME)
