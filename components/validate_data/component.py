"""KFP wrapper of the validate_data step: only calls components.validate_data.step.run().

Paths are plain strings (local folders or ``s3://`` prefixes): the step writes its outputs,
``dataset_ref.json`` last, into ``out_dir``. The single output ``passed`` gates the later steps
(a single-output task, DESIGN 6.2): failed expectations return False instead of raising, so the
pipeline skips training; data that cannot be validated at all (no manifest, bad config) raises
and fails the run.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def validate_data(
    data_uri: str, out_dir: str, lines_config: str = "", quarantine: str = ""
) -> bool:
    """Validate the line dataset at data_uri; True when every expectation held."""
    from components.validate_data.step import ValidationFailed, run

    try:
        run(
            data_uri,
            out_dir,
            lines_config=lines_config or None,
            quarantine=quarantine or None,
            progress=False,
        )
    except ValidationFailed as failure:
        print(failure)
        return False
    return True
