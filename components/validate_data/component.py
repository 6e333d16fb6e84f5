"""KFP wrapper of the validate_data step: only calls components.validate_data.step.run().

``data_uri`` is a local folder or an ``s3://`` prefix. The step writes its outputs,
``dataset_ref.json`` last, into the ``dataset`` artefact (a folder: dataset_ref.json,
validation_result.json, statistics.parquet, the report), which every later step reads instead of
a shared path; ``report`` is the HTML validation report, shown in the KFP UI. The parameter
output (``Output``) gates the later steps: failed expectations return False instead of raising,
so the pipeline skips training; data that cannot be validated at all (no manifest, bad config)
raises and fails the run.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_data(
    data_uri: str,
    lines_config: str = "",
    quarantine: str = "",
    dataset: dsl.Output[dsl.Dataset] = None,
    report: dsl.Output[dsl.HTML] = None,
) -> bool:
    """Validate the line dataset at data_uri; True when every expectation held."""
    import json
    import shutil
    from pathlib import Path

    from components.logs import configure_logging
    from components.resources import usable_cpus
    from components.validate_data.step import (
        DATASET_REF_NAME,
        REPORT_NAME,
        ValidationFailed,
        run,
    )

    configure_logging()
    passed = True
    try:
        run(
            data_uri,
            dataset.path,
            lines_config=lines_config or None,
            quarantine=quarantine or None,
            progress=False,
            workers=usable_cpus(),  # reading and decoding every sample is most of the step
        )
    except ValidationFailed as failure:
        print(failure)
        passed = False
    written = Path(dataset.path) / REPORT_NAME
    if written.is_file():
        shutil.copyfile(written, report.path)
    else:
        Path(report.path).write_text("<p>validate-data wrote no report</p>", encoding="utf-8")
    ref_path = Path(dataset.path) / DATASET_REF_NAME
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text(encoding="utf-8"))
        dataset.metadata.update({"uri": ref["uri"], "manifest_sha256": ref["manifest_sha256"]})
    return passed
