"""KFP wrapper of the roi_report step: only calls components.roi_report.step.run().

Prices ``evaluation`` (an evaluation.json path) and writes roi.json, report.html and report.md
to ``out_dir``; returns the roi.json path (the register step attaches it). Empty
``roi_config`` / ``lines_config`` mean configs/roi.yaml / configs/lines.yaml; an empty
``model_version`` means the version evaluation.json names (null before registration).
``data_sha256`` is not read: it is the data's identity in KFP's cache key
(pipelines/k8s_settings.py). The report also goes out as KFP artefacts, ``report`` (HTML) and
``summary`` (Markdown), which the KFP UI renders on the run.
"""

from kfp import dsl

from components.image import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def roi_report(
    evaluation: str,
    out_dir: str,
    roi_config: str = "",
    lines_config: str = "",
    model_version: str = "",
    data_sha256: str = "",
    report: dsl.Output[dsl.HTML] = None,
    summary: dsl.Output[dsl.Markdown] = None,
) -> str:
    """Write roi.json, report.html and report.md; returns the roi.json path."""
    import shutil
    from pathlib import Path

    from components.roi_report.step import HTML_NAME, MARKDOWN_NAME, ROI_NAME, run

    run(
        evaluation,
        out_dir,
        roi_config=roi_config or None,
        lines_config=lines_config or None,
        model_version=model_version or None,
    )
    shutil.copyfile(Path(out_dir) / HTML_NAME, report.path)
    shutil.copyfile(Path(out_dir) / MARKDOWN_NAME, summary.path)
    return str(Path(out_dir) / ROI_NAME)
