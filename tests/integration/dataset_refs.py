"""A generated line dataset with a passing dataset_ref.json beside it, as validate-data writes."""

from __future__ import annotations

import json
from pathlib import Path

from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset


def validated_dataset_ref(folder: Path, *, n_lines: int, samples_per_line: int) -> Path:
    root = generate_dataset(
        folder / "lines",
        n_lines=n_lines,
        samples_per_line=samples_per_line,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )
    ref = {
        "uri": str(root),
        "manifest_sha256": sha256_hex((root / MANIFEST_NAME).read_bytes()),
        "dvc_rev": None,
        "passed": True,
        "quarantine": [],
    }
    path = folder / "dataset_ref.json"
    path.write_text(json.dumps(ref))
    return path
