"""One logging set-up for the ``cta`` CLI, ``cta serve`` and every pipeline step's wrapper (which
call a step's ``run()`` without the CLI): INFO and above of every logger to stderr, so epoch
summaries, step timings and warnings reach pod logs.

Two formats: ``text`` (``time LEVEL logger: message``) and ``json`` (one object per line with
``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and ``exception`` when there is one),
for log collectors that index fields. Chosen by the ``log_format`` argument (the CLI's
``--log-format``), else ``$CTA_LOG_FORMAT``, else ``text``.

A root logger that already has handlers someone else installed (an embedding application,
pytest's capture) is left alone; a handler this module installed is replaced, so calling it
again switches the format.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from cta_model.errors import ConfigError

LOG_FORMAT_ENV = "CTA_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries whose INFO lines are their own housekeeping (GX's ephemeral docs site, MLflow's
#: sqlite migrations): WARNING and above only.
QUIET_LIBRARIES = ("great_expectations", "alembic")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _CtaHandler(logging.StreamHandler):
    """Marks the handler this module installed."""


def chosen_format(log_format: str | None = None) -> str:
    """``log_format``, else ``$CTA_LOG_FORMAT``, else text; ConfigError naming the source."""
    source = "--log-format" if log_format else LOG_FORMAT_ENV
    chosen = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise ConfigError(f"{source}={chosen!r}: expected one of {', '.join(FORMATS)}")
    return chosen


def configure_logging(log_format: str | None = None, level: int = logging.INFO) -> None:
    """Send INFO and above to stderr in the chosen format (see the module docstring)."""
    chosen = chosen_format(log_format)
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _CtaHandler)]
    if root.handlers and not ours:
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = _CtaHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
