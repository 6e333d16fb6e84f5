"""KFP wrapper of the roi_report step: only calls components.roi_report.step.run().

Prices the ``evaluation`` artefact of the evaluate step (its evaluation.json) and writes
roi.json, report.html and report.md into its ``roi`` artefact (register_model attaches roi.json).
Empty ``roi_config`` / ``lines_config`` mean the image's configs/roi.yaml / configs/lines.yaml;
an empty ``model_version`` means the version evaluation.json names (null before registration).
``data_sha256`` is not read: it is the data's identity in KFP's cache key
(pipelines/k8s_settings.py). The report also goes out as ``report`` (HTML) and ``summary``
(Markdown), which the KFP UI renders on the run.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def roi_report(
    evaluation: dsl.Input[dsl.Artifact],
    roi_config: str = "",
    lines_config: str = "",
    model_version: str = "",
    data_sha256: str = "",
    roi: dsl.Output[dsl.Artifact] = None,
    report: dsl.Output[dsl.HTML] = None,
    summary: dsl.Output[dsl.Markdown] = None,
) -> None:
    """Write roi.json, report.html and report.md into ``roi``."""
    import shutil
    from pathlib import Path

    from components.evaluate.step import EVALUATION_NAME
    from components.logs import configure_logging
    from components.roi_report.step import HTML_NAME, MARKDOWN_NAME, run

    configure_logging()
    run(
        str(Path(evaluation.path) / EVALUATION_NAME),
        roi.path,
        roi_config=roi_config or None,
        lines_config=lines_config or None,
        model_version=model_version or None,
    )
    shutil.copyfile(Path(roi.path) / HTML_NAME, report.path)
    shutil.copyfile(Path(roi.path) / MARKDOWN_NAME, summary.path)
