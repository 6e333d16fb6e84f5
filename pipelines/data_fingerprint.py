"""The ``data-fingerprint`` step: the manifest sha256 of the data validate_data accepted.

validate_data's parameter output is the boolean its ``dsl.If`` tests (a condition on a NamedTuple
output is silently False under kfp.local, DESIGN 6.2), so this uncached step reads the sha256
from the dataset_ref.json in its ``dataset`` artefact. Every cached step takes it as an input:
data changed behind the same URI gives a new sha256, so KFP's cache misses
(pipelines/k8s_settings.py).
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def data_fingerprint(dataset: dsl.Input[dsl.Dataset]) -> str:
    """The ``manifest_sha256`` of the dataset_ref.json in ``dataset``."""
    import json
    from pathlib import Path

    from cta_model.data.dataset_ref import dataset_ref_in

    ref = Path(dataset_ref_in(dataset.path))
    return json.loads(ref.read_text(encoding="utf-8"))["manifest_sha256"]
