"""Health of a candidate from replaying the line's ``qa`` split through its server (DESIGN 7).

Every number comes from real requests: client-side timings and status codes of ``POST
/predict`` plus the server's own ``/metrics`` counters (``cta_requests_total{code}``) read
before and after the replay. The verdicts are the servers' own (``defect.reject``: the defect
score against the operating threshold each server found for its line); a server without a
threshold answers null, which counts for neither agreement nor recall. A sample is defective
when its TARGET segmentation has at least one pixel of a reject class of the candidate MODEL
(its ``/readyz`` ``defect.reject_class_ids``: what its model.yaml names); samples without
segmentation labels count for error rate, latency and agreement but not for recall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.rollout.plan import Bake, HealthGates
from cta_model.errors import DataError

REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class QaSample:
    sample_id: str
    png: bytes
    defective: bool | None  # None: no segmentation label


def load_qa_samples(data_uri: str, line_id: str, reject_classes: tuple[int, ...]) -> list[QaSample]:
    """The line's ``qa`` images as PNG bytes, with the defect truth from their labels
    (``reject_classes``: the served model's, `served_defect`)."""
    from components.storage import opener_for
    from cta_model.data.line_dataset import LineDataset
    from cta_model.tasks import task_of_kind

    opener = opener_for(data_uri)
    dataset = LineDataset(data_uri, split="qa", opener=opener)
    classes = task_of_kind("classes")  # the task whose labels tell defects
    samples = []
    for index, row in enumerate(dataset.rows):
        if row["line_id"] != line_id:
            continue
        item = dataset[index]
        defective = None
        if item["present"].get(classes):
            defective = bool(np.isin(item[classes], reject_classes).any())
        samples.append(QaSample(row["sample_id"], opener(row["image_path"]), defective))
    if not samples:
        raise DataError(f"{data_uri}: line {line_id!r} has no samples in the 'qa' split")
    return samples


def _session() -> Any:
    import requests

    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not capture line servers
    return session


def served_defect(url: str) -> dict[str, Any]:
    """The verdict a line server gives (its ``/readyz`` ``defect``): reject classes of its
    model (``reject_class_ids``, ``reject_classes`` names), ``threshold``, ``threshold_source``
    and, without a verdict, its ``reason``."""
    answer = _session().get(f"{url}/readyz", timeout=REQUEST_TIMEOUT_S)
    answer.raise_for_status()
    defect = answer.json().get("defect")
    if not isinstance(defect, dict) or "reject_class_ids" not in defect:
        raise DataError(f"{url}/readyz names no defect verdict: not a cta serve of this version")
    return defect


def server_counters(session: Any, url: str) -> dict[str, float]:
    """``cta_requests_total`` by status code from the server's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = session.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT_S)
    answer.raise_for_status()
    counts: dict[str, float] = {}
    # Matched by sample name: the family is "cta_requests" with a TYPE line, the full name
    # without one.
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "cta_requests_total":
                code = str(sample.labels.get("code", "?"))
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts


@dataclass
class TargetLog:
    latencies_ms: list[float]
    codes: list[int]
    rejects: list[bool | None]


def _predict(session: Any, url: str, png: bytes, log: TargetLog) -> None:
    started = time.perf_counter()
    try:
        answer = session.post(
            f"{url}/predict",
            data=png,
            headers={"Content-Type": "image/png"},
            timeout=REQUEST_TIMEOUT_S,
        )
        code = answer.status_code
        # The server's own verdict; null when it has no operating threshold.
        reject = answer.json()["defect"]["reject"] if code == 200 else None
    except Exception:  # noqa: BLE001 - any failed request is an error of the candidate
        code, reject = 0, None
    log.latencies_ms.append((time.perf_counter() - started) * 1000.0)
    log.codes.append(code)
    log.rejects.append(reject)


def replay(
    candidate_url: str,
    samples: list[QaSample],
    bake: Bake,
    current_url: str | None = None,
    keep_going: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Send the qa images (cycling) until ``bake`` is met; return the measured values."""
    session = _session()
    before = server_counters(session, candidate_url)
    candidate, current = TargetLog([], [], []), TargetLog([], [], [])
    truths: list[bool | None] = []
    started = time.monotonic()
    sent = 0
    while sent < bake.min_samples or time.monotonic() - started < bake.min_seconds:
        if not keep_going():
            break
        sample = samples[sent % len(samples)]
        _predict(session, candidate_url, sample.png, candidate)
        if current_url is not None:
            _predict(session, current_url, sample.png, current)
        truths.append(sample.defective)
        sent += 1
    after = server_counters(session, candidate_url)
    return summarise(candidate, current if current_url else None, truths, before, after) | {
        "seconds": round(time.monotonic() - started, 3),
        "complete": sent >= bake.min_samples and time.monotonic() - started >= bake.min_seconds,
    }


def summarise(
    candidate: TargetLog,
    current: TargetLog | None,
    truths: list[bool | None],
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    n = len(candidate.codes)
    client_errors = sum(1 for code in candidate.codes if code != 200)
    server_total = sum(after.values()) - sum(before.values())
    server_errors = sum(
        after.get(code, 0.0) - before.get(code, 0.0) for code in after if not code.startswith("2")
    )
    error_rate = max(
        client_errors / n if n else 1.0, server_errors / server_total if server_total else 0.0
    )
    latencies = np.asarray(candidate.latencies_ms) if n else np.asarray([np.nan])
    values: dict[str, Any] = {
        "samples": n,
        "error_rate": round(float(error_rate), 6),
        "client_errors": client_errors,
        "server_requests": int(server_total),
        "server_errors": int(server_errors),
        "p50_latency_ms": round(float(np.percentile(latencies, 50)), 3),
        "p95_latency_ms": round(float(np.percentile(latencies, 95)), 3),
        "agreement": None,
        "recall": None,
        "n_defective": sum(1 for truth in truths if truth),
    }
    if current is not None:
        pairs = [
            (a, b)
            for a, b in zip(candidate.rejects, current.rejects, strict=True)
            if a is not None and b is not None
        ]
        values["agreement"] = (
            round(sum(a == b for a, b in pairs) / len(pairs), 6) if pairs else None
        )
    # A failed request misses its defect; an answer without a verdict (no threshold) says
    # nothing about recall.
    defective = [
        reject
        for reject, truth, code in zip(candidate.rejects, truths, candidate.codes, strict=True)
        if truth and not (code == 200 and reject is None)
    ]
    if defective:
        values["recall"] = round(sum(bool(r) for r in defective) / len(defective), 6)
    return values


def judge(values: dict[str, Any], gates: HealthGates) -> tuple[bool, list[dict[str, Any]]]:
    """Every enforced gate with its value and threshold; a missing value fails its gate."""
    checks = []
    for name, measure, is_max in (
        ("max_error_rate", "error_rate", True),
        ("max_p95_latency_ms", "p95_latency_ms", True),
        ("min_agreement", "agreement", False),
        ("min_recall", "recall", False),
    ):
        threshold = getattr(gates, name)
        if threshold is None:
            continue
        value = values.get(measure)
        if value is None:
            passed = False
        elif is_max:
            passed = value <= threshold
        else:
            passed = value >= threshold
        checks.append(
            {
                "check": measure,
                "value": value,
                "threshold": threshold,
                "passed": passed,
                "op": "<=" if is_max else ">=",
            }
        )
    return all(check["passed"] for check in checks), checks


def describe(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "no gates enforced"
    parts = []
    for check in checks:
        value = check["value"]
        shown = "n/a" if value is None else f"{value:.4g}"
        verdict = "ok" if check["passed"] else "FAIL"
        parts.append(f"{check['check']} {shown} {check['op']} {check['threshold']:g} {verdict}")
    return "; ".join(parts)
