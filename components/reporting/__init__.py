"""The self-contained HTML reports (data validation, ROI, monitoring): Jinja2 templates in
``templates/`` (package data) and the charts they embed (``figures.py``).

One environment renders them all: autoescape on, so every value is HTML-escaped unless the
template marks it safe, and an undefined name is an error rather than an empty string. The
templates extend ``base.html.j2`` (inline CSS, no script, no URL).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("components.reporting", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_template(template: str, **context: Any) -> str:
    """The named template of ``templates/`` rendered with ``context`` (UTF-8 text)."""
    return _environment().get_template(template).render(**context)


__all__ = ["render_template"]
