"""Training one CTA model (DESIGN 3, 5.1, 5.3, 6.1): one process or `torchrun` DDP, resumable
exactly.

    result = train(load_train_config("configs/demo.yaml"), callbacks=[...], resume="auto")

Under torchrun every process calls `train` with the same config. The package, by job:

    trainer.py          the loop (Trainer) and the entry points train / validate
    datasets.py         opening the train / val data (line dataset, dataset_ref, synthetic
                        cache, research formats) and its lineage
    loaders.py          transforms, resumable / sharded samplers, DataLoaders
    optimization.py     loss, EMA teacher, optimizer, LR schedule, DDP: one optimizer step
    ema.py              the EMA teacher (pseudo-labels for the tasks a sample lacks)
    validation.py       `<task>.<metric>` pooled over ranks and `val_loss`
    progress.py         counters, best epoch, early stopping, the running epoch's sums
    checkpoints.py      what a checkpoint holds, atomic writes, sha256 sidecars, resuming
    determinism.py      seeds, deterministic kernels, the RNG state a checkpoint carries
    distributed.py      the process group and its collectives
    outputs.py          the model folder and train_result.json (TrainResult)
    lineage.py          lineage.json (config, data, git commit)
    reference_stats.py  reference_stats.parquet, the baseline of monitoring
    callbacks.py        the hooks a tracker implements

With `deterministic: true`, fixed seeds and the same thread count, a killed and resumed run
ends with bit-identical weights.
"""

from cta_model.training.callbacks import Callback, TrainCallback
from cta_model.training.checkpoints import CHECKPOINT_DIR
from cta_model.training.lineage import LINEAGE_FILE
from cta_model.training.outputs import MODEL_DIR, RESULT_FILE, TrainResult
from cta_model.training.reference_stats import REFERENCE_STATS_FILE
from cta_model.training.trainer import Trainer, train, validate

__all__ = [
    "CHECKPOINT_DIR",
    "LINEAGE_FILE",
    "MODEL_DIR",
    "REFERENCE_STATS_FILE",
    "RESULT_FILE",
    "Callback",
    "TrainCallback",
    "TrainResult",
    "Trainer",
    "train",
    "validate",
]
