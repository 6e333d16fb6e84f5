"""One process of a training run for the tests that kill, resume or torchrun it (it calls the
library, as every torchrun process of `cta train` does):

    python tests/integration/train_process.py CONFIG                 # train (resume="auto")
    torchrun ... tests/integration/train_process.py CONFIG METRICS   # validate -> METRICS (JSON)

Logs go to stderr, so a test can read what the run said (e.g. where it resumed).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from cta_model.train_config import load_train_config
from cta_model.training import train, validate
from cta_model.training.distributed import DistributedEnv


def main(config_path: str, metrics_out: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_train_config(config_path)
    if metrics_out is None:
        train(config)
        return
    metrics = validate(config)
    if DistributedEnv.from_environ().is_main:
        Path(metrics_out).write_text(json.dumps(metrics, indent=2, allow_nan=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
