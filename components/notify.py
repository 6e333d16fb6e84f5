"""Webhook notifications: one generic JSON POST per event (drift, gate verdict, roll-back).

The URL comes from the caller or ``$CTA_WEBHOOK_URL`` (unset = no notification). A failed
delivery is retried a bounded number of times and then reported as False with a warning: a
notification never fails the step that sends it. Secrets in the URL (tokens in the query) are
never logged: only scheme, host and path are.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

WEBHOOK_ENV = "CTA_WEBHOOK_URL"
EVENTS = ("drift", "gate_verdict", "rollback", "retrain")
_log = logging.getLogger(__name__)


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def notify(
    event: str,
    payload: dict[str, Any],
    url: str | None = None,
    *,
    attempts: int = 3,
    timeout_s: float = 5.0,
    backoff_s: float = 0.5,
) -> bool:
    """POST ``{"event", "time", "source": "cta", **payload}``; True when a 2xx came back."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}; known: {', '.join(EVENTS)}")
    target = url or os.environ.get(WEBHOOK_ENV)
    if not target:
        return False
    if urlsplit(target).scheme not in ("http", "https"):
        raise ValueError(f"webhook URL must be http(s), got {_safe_url(target)!r}")
    body = json.dumps(
        {"event": event, "time": datetime.now(UTC).isoformat(), "source": "cta", **payload},
        default=str,
    ).encode()
    request = urllib.request.Request(
        target, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    # No proxy for loopback listeners; system proxies apply elsewhere.
    opener = urllib.request.build_opener()
    for attempt in range(1, attempts + 1):
        try:
            with opener.open(request, timeout=timeout_s) as response:
                if 200 <= response.status < 300:
                    return True
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = type(exc).__name__
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    _log.warning(
        "webhook %s to %s failed after %d attempts: %s", event, _safe_url(target), attempts, reason
    )
    return False
