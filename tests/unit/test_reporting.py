"""The report templates: shipped as package data, autoescaped, strict about undefined names."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources
from pathlib import Path

import jinja2
import pytest

from components.reporting import render_template

pytestmark = pytest.mark.unit


def test_every_template_is_package_data():
    patterns = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["components.reporting"]
    templates = [
        entry.name
        for entry in resources.files("components.reporting").joinpath("templates").iterdir()
    ]
    assert "base.html.j2" in templates
    for name in templates:
        assert any(fnmatch.fnmatch(f"templates/{name}", pattern) for pattern in patterns), name


def test_an_undefined_name_is_an_error_not_a_blank():
    with pytest.raises(jinja2.UndefinedError, match="'report' is undefined"):
        render_template("monitor.html.j2")
