"""Send a line's `qa` split through its server, optionally under a lighting change.

Used by `cta monitor --qa-server` (agreement of the served verdict with the QA labels) and by
the demo, which replays one line with brighter light to show that monitoring flags it. The
verdicts, scores and reject classes are the server's (its model's), never a global default.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

REQUEST_TIMEOUT_S = 30.0


def relight(png: bytes, brightness: float) -> bytes:
    """The image with every pixel scaled by ``brightness`` (clipped), as PNG."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    shifted = np.clip(image * brightness, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(shifted).save(buffer, format="PNG")
    return buffer.getvalue()


def replay_qa(
    server_url: str,
    data_uri: str,
    line_id: str,
    *,
    brightness: float = 1.0,
    repeat: int = 1,
) -> dict[str, Any]:
    """Post every qa image of the line ``repeat`` times; returns counts, QA agreement of the
    server's verdicts (a sample is defective by the reject classes of the SERVED model) and
    the mean defect score of defective and good samples."""
    import requests

    from components.rollout.health import load_qa_samples, served_defect
    from cta_model.inspection import recall_and_frr

    served = served_defect(server_url)
    samples = load_qa_samples(data_uri, line_id, tuple(served["reject_class_ids"]))
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not capture line servers
    verdicts, truths, errors = [], [], 0
    scores: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for sample in samples:
            body = sample.png if brightness == 1.0 else relight(sample.png, brightness)
            answer = session.post(
                f"{server_url}/predict",
                data=body,
                headers={"Content-Type": "image/png"},
                timeout=REQUEST_TIMEOUT_S,
            )
            if answer.status_code != 200:
                errors += 1
                continue
            if sample.defective is None:
                continue
            defect = answer.json()["defect"]
            if defect["score"] is not None:
                scores[sample.defective].append(float(defect["score"]))
            if defect["reject"] is not None:  # null: the server has no operating threshold
                verdicts.append(bool(defect["reject"]))
                truths.append(sample.defective)
    labelled = len(truths)
    agreement = float(np.mean(np.array(verdicts) == np.array(truths))) if labelled else None
    recall, frr = recall_and_frr(np.array(verdicts, bool), np.array(truths, bool))
    return {
        "n_sent": len(samples) * repeat,
        "n_errors": errors,
        "n_labelled": labelled,
        "agreement": agreement,
        "recall": recall,
        "false_reject_rate": frr,
        "threshold": served["threshold"],
        "mean_score_defective": float(np.mean(scores[True])) if scores[True] else None,
        "mean_score_good": float(np.mean(scores[False])) if scores[False] else None,
        "brightness": brightness,
    }
