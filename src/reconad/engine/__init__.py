"""Training, evaluation and prediction of one run, on Lightning Fabric: a plain loop, resumable exactly.

* :mod:`.loop` — :func:`fit`: the training loop, checkpoints, the final evaluation (saved before evaluated).
* :mod:`.evaluation` — :func:`predict_dataset`, :func:`score_outputs`, :func:`evaluate` and the files they write.
* :mod:`.services` — what a method may opt into: model selection by a validation loss on held-out normals
  (snapshots), the non-finite-loss guard, the checkpoint timer.
* :mod:`.training` — samplers, optimizers, schedules, seeds.

The run folder's format lives in :mod:`reconad.run`; the names are re-exported here for convenience.
"""

from ..run import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, METRICS_FILE, JsonlLog, build_method, load, read_run_config
from .evaluation import EvalOutputs, evaluate, predict_dataset, score_outputs, write_overlays, write_test_results
from .loop import RunResult, fit
from .training import EpochSampler, make_optimizer, make_scheduler, set_seed

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "EpochSampler", "EvalOutputs", "JsonlLog",
           "RunResult", "build_method", "evaluate", "fit", "load", "make_optimizer", "make_scheduler",
           "predict_dataset", "read_run_config", "score_outputs", "set_seed", "write_overlays",
           "write_test_results"]
