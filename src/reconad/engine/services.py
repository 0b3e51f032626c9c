"""Training services a method opts into, and the engine's own guards.

* Model selection by a validation loss (Bauer et al.'s early stopping of objective (4)): a method returns a
  snapshot interval from ``selection_interval()`` and implements ``validation_loss(images)``; the engine writes
  a snapshot of the weights every that many batches into ``run_dir/snapshots/`` (so a resumed run keeps them),
  and at the end keeps the snapshot with the lowest loss on the held-out normals.
* The non-finite-loss guard: training stops at the first NaN/inf loss with the batch and the terms, or skips such
  batches (``train.skip_nonfinite``, as users of mixed precision expect).
* The checkpoint timer: every ``train.checkpoint_every`` optimizer steps, every ``train.checkpoint_minutes``,
  and at epoch ends when the last checkpoint is over a minute old.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ReconadError
from ..fileio import load_weights, save_weights
from ..methods.base import Method

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"


class NonFiniteLossError(ReconadError):
    """The loss became NaN or infinite; the message gives the batch and every loss term."""


def stack_terms(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (scalar) terms as one 1-D tensor, on the device where the loss was computed.

    Terms made on the host (ReContrast's ``alpha``) join the device's; the dtype is the widest among the terms, at
    least float32, so no value is rounded.
    """
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in terms.values()), torch.float32)
    device = next((v.device for v in terms.values() if v.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([v.detach().reshape(()).to(device=device, dtype=dtype) for v in terms.values()])


def host_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms as Python floats, copied off the device in one transfer.

    ``float()`` per term would wait for the device once per term (a dozen times per batch for ReContrast); one
    stacked copy waits once. Every value is exactly what ``float(term)`` gives.
    """
    return dict(zip(terms, stack_terms(terms).tolist(), strict=True)) if terms else {}


def finite_terms(values: dict[str, float], batch: int, skip: bool) -> bool:
    """True when the loss is finite; otherwise raise, or (``skip``) log and return False."""
    if math.isfinite(values["loss"]):
        return True
    described = ", ".join(f"{k} {v:.6g}" for k, v in values.items())
    if skip:
        log.warning("batch %d skipped: non-finite loss (%s)", batch, described)
        return False
    raise NonFiniteLossError(f"the loss is not finite at batch {batch} ({described}); training stopped there (the "
                             "last checkpoint is kept). Lower --optim.lr, use --train.precision 32-true, or pass "
                             "--train.skip_nonfinite true to skip such batches")


class CheckpointTimer:
    """Decides when the loop writes a resumable checkpoint."""

    def __init__(self, every_steps: int | None, minutes: float | None, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.seconds, self.clock = every_steps, (minutes * 60 if minutes else None), clock
        self.last = clock()

    def due(self, done: int, accumulate: int, epoch_end: bool, stop_after: int | None) -> bool:
        if done % accumulate:  # never save with gradients pending: they could not be restored
            return False
        if stop_after is not None and done >= stop_after:
            return True
        if self.every_steps and (done // accumulate) % self.every_steps == 0:
            return True
        elapsed = self.clock() - self.last
        if self.seconds is not None and elapsed >= self.seconds:
            return True
        return bool(epoch_end and self.seconds is not None and elapsed >= min(60.0, self.seconds))

    def saved(self) -> None:
        self.last = self.clock()


class SnapshotSelection:
    """Snapshots of the weights during training and the choice of the best one on held-out normals."""

    def __init__(self, method: Method, run_dir: Path, enabled: bool = True):
        self.method, self.folder = method, Path(run_dir) / SNAPSHOT_DIR
        self.every = method.selection_interval()
        self.enabled = enabled and bool(self.every)

    def _path(self, done: int) -> Path:
        return self.folder / f"batch-{done:08d}.safetensors"

    def after_batch(self, done: int, total: int) -> None:
        if self.enabled and done < total and done % self.every == 0:
            save_weights(self._path(done), self.method.state_dict(), {"batch": str(done)})

    def drop_after(self, done: int) -> None:
        """On resume: snapshots newer than the checkpoint belong to batches that will be trained again."""
        for path in self.folder.glob("batch-*.safetensors"):
            if int(path.stem.split("-")[1]) > done:
                path.unlink()

    def select(self, images: torch.Tensor | None, done: int) -> dict[str, Any]:
        """Load the candidate (snapshots and the final weights) with the lowest validation loss on ``images``."""
        if not self.enabled:
            return {}
        if images is None or len(images) == 0:
            raise ReconadError(f"{self.method.name}: model selection by a validation loss needs held-out training "
                               "images; set --data.holdout_fraction > 0 (paper: 0.05)")
        final = {k: v.detach().to("cpu", copy=True) for k, v in self.method.state_dict().items()}
        snapshots = sorted(self.folder.glob("batch-*.safetensors"))
        candidates = [(int(p.stem.split("-")[1]), p) for p in snapshots] + [(done, None)]
        losses, was_training = [], self.method.training
        self.method.eval()  # held-out losses in eval mode, as the final model will be used
        try:
            for _, path in candidates:
                self.method.load_state_dict(final if path is None else load_weights(path), strict=True)
                losses.append(self.method.validation_loss(images))
        finally:
            self.method.train(was_training)
        best = int(np.argmin(losses))
        self.method.load_state_dict(final if candidates[best][1] is None else load_weights(candidates[best][1]))
        log.info("%s model selection: kept the weights after %d batches (held-out loss %.5f)",
                 self.method.name, candidates[best][0], losses[best])
        return {"selection": {"rule": "validation_loss", "data": "holdout", "batch": candidates[best][0],
                              "val_loss": losses[best],
                              "history": [[b, v] for (b, _), v in zip(candidates, losses)]}}
