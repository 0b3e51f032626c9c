"""``fit``: the training loop of one run — resumable exactly, checkpointed by default, saved before evaluated."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data import DataError
from ..fileio import write_json
from ..methods.base import Method
from ..progress import progress
from ..run import (
    LOG_FILE,
    METRICS_FILE,
    JsonlLog,
    build_method,
    check_run_dir,
    checkpoint_step,
    default_run_dir,
    load_checkpoint,
    prepare_run_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_config,
)
from ..trackers import logger_names
from ..validation import validate_run_config
from .cache import IndexedSamples, build_feature_cache, cached_batches, with_cached_rows
from .distributed import convert_sync_batchnorm, launch_rank, mean_over_ranks, per_rank_batch
from .evaluation import EvaluationError, predict_dataset, score_outputs, write_overlays, write_test_results
from .services import CheckpointTimer, SnapshotSelection, finite_terms, host_terms
from .training import EpochSampler, make_loader, make_optimizer, make_scheduler, set_seed, to_device, total_batches

log = logging.getLogger(__name__)

PENDING_METRICS_FILE = "pending_metrics.json"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def _fabric(cfg: RunConfig):
    from .distributed import make_fabric

    return make_fabric(cfg)


def _validate(cfg: RunConfig) -> None:
    logger_names(cfg.train.loggers)  # an unknown tracker is refused before anything is written
    validate_run_config(cfg)  # every setting, the network's size rule, taps and widths: before any download or write


AfterSave = Callable[[Path, RunConfig, torch.device], "dict[str, Any] | None"]


def fit(cfg: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        stop_after: int | None = None, overwrite: bool = False, desc: str | None = None,
        after_save: AfterSave | None = None) -> RunResult:
    """Train ``cfg.method`` on ``cfg.data``, save the final model, then evaluate it.

    Args:
        cfg: the resolved run configuration.
        run_dir: where to write; default ``output_dir/<method>-<category>-<time>``. An existing run folder is
            refused unless ``resume`` or ``overwrite``.
        resume: continue the run in ``run_dir`` from its last checkpoint, exactly.
        stop_after: stop (after checkpointing) once this many batches are done — simulates an interrupted run.
        overwrite: replace whatever ``run_dir`` holds.
        desc: the training bar's label (default ``fit <method>``; a study names its cell).
        after_save: called with ``(run_dir, cfg, device)`` once the final model is saved and before it is
            evaluated; what it returns goes into ``metrics.json``. The API and studies pass
            :func:`reconad.deploy.calibrate.calibrate_after_fit` (the engine sits below ``deploy``).

    Under DDP (``train.devices`` > 1, ``reconad.engine.distributed``) every rank runs this function; only rank 0
    writes, and evaluations run on rank 0 over the whole test set while the other ranks wait.
    """
    from ..data import build_datasets

    _validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if launch_rank() == 0:  # ranks > 0 start later, when rank 0 may already have created the folder
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    fabric = _fabric(cfg)
    set_seed(cfg.train.seed, cfg.train.deterministic)
    method = build_method(cfg)
    train_set, holdout_set, test_set = build_datasets(cfg.data, views=method.train_views, seed=cfg.train.seed)
    if fabric.is_global_zero:  # only now, with weights and data in hand, is anything written
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if not resume:
            write_config(run_dir, cfg)
    jsonl = JsonlLog(run_dir / LOG_FILE, enabled=fabric.is_global_zero)

    method.prepare(make_loader(train_set, cfg.data.eval_batch_size, cfg.data.num_workers))
    if fabric.world_size > 1 and cfg.train.sync_bn:
        method = convert_sync_batchnorm(method, fabric.device)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(method, cfg)
    model, optimizer = fabric.setup(method, optimizer)
    model.mark_forward_method("loss")
    per_rank = math.ceil(len(train_set) / fabric.world_size)
    batch_size = per_rank_batch(cfg.data.batch_size, fabric.world_size)
    batches_per_epoch = per_rank // batch_size if cfg.data.drop_last else math.ceil(per_rank / batch_size)
    total = total_batches(cfg, batches_per_epoch)
    accumulate = max(1, cfg.train.accumulate)
    scheduler = make_scheduler(optimizer, cfg, total // accumulate)
    snapshots = SnapshotSelection(method, run_dir, enabled=fabric.is_global_zero)

    done = 0
    if resume:
        if checkpoint_step(run_dir) is None:  # killed before its first checkpoint: start again, same seed
            log.warning("%s holds no checkpoint yet: training starts again from batch 0", run_dir)
        else:
            done = _restore(run_dir, method, optimizer, scheduler)
            log.info("resumed %s at batch %d/%d", run_dir, done, total)
        jsonl.truncate_after(done)
        snapshots.drop_after(done)

    # after restore: the cache may depend on fitted statistics (ULSAD), which a checkpoint holds
    cache = build_feature_cache(method, train_set, cfg, fabric.device, batch_size) if done < total else None
    loop = _TrainLoop(cfg, fabric, model, method, optimizer, scheduler, train_set, test_set, run_dir, jsonl,
                      total, batches_per_epoch, accumulate, snapshots, cache)
    loop.desc = desc or loop.desc
    trackers = _open_trackers(cfg, run_dir, jsonl) if fabric.is_global_zero else None
    try:
        done = loop.run(done, stop_after)
        if done < total:
            return RunResult(run_dir, {}, jsonl.read())
        return _finish(cfg, fabric, method, loop, snapshots, holdout_set, train_set, test_set, run_dir, jsonl, done,
                       batches_per_epoch, after_save)
    finally:
        if trackers is not None:
            trackers.close()


def _open_trackers(cfg: RunConfig, run_dir: Path, jsonl: JsonlLog):
    """Experiment trackers (``train.loggers``) receive every log entry; ``log.jsonl`` stays the ground truth."""
    if not cfg.train.loggers:
        return None
    from ..config import config_to_dict
    from ..trackers import open_trackers

    trackers = open_trackers(cfg.train.loggers, run_dir, config_to_dict(cfg))
    jsonl.listeners.append(trackers.log_entry)
    return trackers


def _finish(cfg, fabric, method, loop, snapshots, holdout_set, train_set, test_set, run_dir, jsonl, done,
            batches_per_epoch, after_save: AfterSave | None = None) -> RunResult:
    """Model selection and calibration on held-out normals, the final checkpoint — then, only then, evaluation."""
    selection = snapshots.select(_holdout_images(holdout_set), done) if snapshots.enabled else {}
    calibration = _calibrate(method, cfg, holdout_set, test_set)
    if not fabric.is_global_zero:
        return RunResult(run_dir, {}, [])
    loop.checkpoint(done)  # the trained model is safe before anything can fail in the evaluation
    from ..acceleration import apply_inference_speedups

    speedups = apply_inference_speedups(method, cfg.eval)  # inference-only switches (eval.*), after the last save
    summary = {**selection, **calibration, "method": cfg.method, "category": cfg.data.category, "batches": done,
               "steps": done // loop.accumulate, "n_train": len(train_set), "n_test": len(test_set),
               "backbone_weights": _weights_source(method, cfg), **({"inference": speedups} if speedups else {}),
               **({"feature_cache": loop.cache.summary()} if loop.cache is not None else {})}
    if after_save is not None:  # e.g. the decision threshold (reconad.deploy), computed on the saved model
        summary.update(after_save(run_dir, cfg, fabric.device) or {})
    write_json(run_dir / PENDING_METRICS_FILE, summary)
    try:
        out = predict_dataset(method, test_set, cfg.data.eval_batch_size, fabric.device, cfg.data.num_workers,
                              fabric.autocast, desc="test")
        metrics = score_outputs(out, cfg, test_set)
    except (DataError, EvaluationError) as err:
        raise EvaluationError(f"training finished and the model is saved in {run_dir}, but its final evaluation "
                              f"failed: {err}. After fixing this, `reconad test {run_dir}` evaluates it") from err
    jsonl.write({"batch": done, "step": done // loop.accumulate, "kind": "final", **metrics})
    selected = {}
    if cfg.eval.selection == "best_test":
        selected = _select_best_test(jsonl.read(), metrics, done, batches_per_epoch, cfg.eval.selection_metrics)
        jsonl.write({"batch": done, "kind": "selected", **selected})
    write_json(run_dir / METRICS_FILE, {"metrics": metrics, **selected, **summary})
    (run_dir / PENDING_METRICS_FILE).unlink(missing_ok=True)
    write_test_results(out, run_dir, cfg.eval.pixel_metrics and getattr(test_set, "has_masks", True))
    write_overlays(out, test_set, run_dir / "overlays", cfg.eval.overlays)
    if cfg.eval.examples:
        from ..plots.runs import read_calibration
        from ..visualize import write_examples

        write_examples(out, test_set, run_dir / "examples", cfg.eval.examples, read_calibration(run_dir))
    if cfg.eval.plots:
        from ..plots import plot_run

        plot_run(run_dir)
    return RunResult(run_dir, metrics, jsonl.read())


def _weights_source(method: Method, cfg: RunConfig) -> str:
    source = getattr(method.backbone, "weights_source", None)
    if source:
        return str(source)
    return "random" if cfg.backbone.weights is None else str(cfg.backbone.weights)


def _holdout_images(holdout_set: Dataset | None) -> torch.Tensor | None:
    if holdout_set is None:
        return None
    return torch.stack([holdout_set[i]["image"] for i in range(len(holdout_set))])


def _calibrate(method: Method, cfg: RunConfig, holdout_set: Dataset | None, test_set: Dataset) -> dict[str, Any]:
    """Run ``method.calibrate`` on held-out normals, or (parity only) on the test set's good images."""
    if cfg.eval.calibrate_on == "test_good":
        labels = getattr(test_set, "labels", None) or [test_set[i]["label"] for i in range(len(test_set))]
        good = torch.utils.data.Subset(test_set, [i for i, label in enumerate(labels) if label == 0])
        method.calibrate(make_loader(good, cfg.data.eval_batch_size, cfg.data.num_workers))
        return {"calibration": {"data": "test_good", "images": len(good),
                                "label": "calibrated on good TEST images (official parity; test-set leakage)"}}
    if holdout_set is not None:
        method.calibrate(make_loader(holdout_set, cfg.data.eval_batch_size, cfg.data.num_workers))
        return {"calibration": {"data": "holdout", "images": len(holdout_set)}}
    return {}


def _select_best_test(history: list[dict[str, Any]], final: dict[str, float], done: int, batches_per_epoch: int,
                      keys=("pixel_auroc", "image_auroc", "aupro_per_image")) -> dict[str, Any]:
    """The official RD++ / ULSAD rule: the epoch-end evaluation (or the final model) with the best mean of ``keys``
    on the TEST set; the first best wins, as the official strict ``>``."""
    candidates = [e for e in history if e.get("kind") == "eval" and e.get("epoch_end")]
    candidates.append({"batch": done, "epoch": (done - 1) // batches_per_epoch, **final})
    best, best_score = candidates[-1], -math.inf
    for entry in candidates:
        values = [entry[k] for k in keys if entry.get(k) is not None]
        score = float(np.mean(values)) if values else -math.inf
        if score > best_score:
            best, best_score = entry, score
    metrics = {k: v for k, v in best.items() if k not in ("batch", "step", "epoch", "kind", "epoch_end")}
    return {"selected_metrics": metrics, "selection": {
        "rule": "best_test", "label": "test-set model selection (official rule; optimistic, parity only)",
        "batch": best["batch"], "epoch": best["epoch"], "score": best_score, "keys": list(keys)}}


def _restore(run_dir: Path, method: Method, optimizer, scheduler) -> int:
    weights, state = load_checkpoint(run_dir)
    method.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["batches_done"])


class _TrainLoop:
    """The loop itself, split out of :func:`fit` so each piece stays short."""

    def __init__(self, cfg, fabric, model, method, optimizer, scheduler, train_set, test_set, run_dir, jsonl,
                 total, batches_per_epoch, accumulate, snapshots, cache=None):
        self.cfg, self.fabric, self.model, self.method = cfg, fabric, model, method
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_set, self.test_set, self.run_dir, self.jsonl = train_set, test_set, run_dir, jsonl
        self.total, self.per_epoch, self.accumulate = total, batches_per_epoch, accumulate
        self.snapshots = snapshots
        self.cache = cache
        self.timer = CheckpointTimer(cfg.train.checkpoint_every, cfg.train.checkpoint_minutes)
        self.window: dict[str, list[float]] = {}
        self.skipped = 0
        self.batch_size = cfg.data.batch_size // fabric.world_size  # per rank; the global batch is the config's
        self.desc = f"fit {cfg.method}"
        if fabric.world_size > 1:
            from .distributed import RankSampler

            self.sampler_class = RankSampler
        else:
            self.sampler_class = EpochSampler

    def batches(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg, done = self.cfg, start
        while done < self.total:
            epoch, offset = divmod(done, self.per_epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            sampler = self.sampler_class(len(self.train_set), cfg.train.seed, epoch, offset * self.batch_size,
                                   self.fabric.global_rank, self.fabric.world_size)
            for batch in self._epoch_batches(sampler, epoch):
                yield epoch, batch
                done += 1
                if done >= self.total:
                    return

    def _epoch_batches(self, sampler, epoch: int) -> Iterator[dict[str, Any]]:
        """The epoch's batches: from the data loader (with the cached rows added), or from the cache alone."""
        cfg, cache = self.cfg, self.cache
        if cache is not None and cache.replaces_images:
            yield from cached_batches(cache, list(sampler), self.batch_size, cfg.data.drop_last)
            return
        dataset = IndexedSamples(self.train_set) if cache is not None else self.train_set
        loader = make_loader(dataset, self.batch_size, cfg.data.num_workers, sampler, cfg.data.drop_last,
                             pin_memory=self.fabric.device.type == "cuda", seed=cfg.train.seed * 1_000_003 + epoch)
        yield from with_cached_rows(cache, loader) if cache is not None else loader

    def run(self, done: int, stop_after: int | None) -> int:
        cfg = self.cfg
        self.method.train()
        bar = progress(total=self.total, initial=done, desc=self.desc, disable=not self.fabric.is_global_zero)
        for epoch, batch in self.batches(done):
            terms = self.step(batch, done)
            done += 1
            bar.update(1)
            if terms:
                bar.set_postfix(loss=f"{terms['loss']:.4f}")
                self.record(terms, done, epoch)
            self.snapshots.after_batch(done, self.total)
            epoch_end = done % self.per_epoch == 0
            best_test_eval = cfg.eval.selection == "best_test" and epoch_end
            if done < self.total and (best_test_eval or (cfg.train.eval_every and done % cfg.train.eval_every == 0)):
                self.evaluate(done, epoch, best_test_eval)
            if done < self.total and self.timer.due(done, self.accumulate, epoch_end, stop_after):
                self.checkpoint(done)
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return done

    def step(self, batch: dict[str, Any], done: int) -> dict[str, float]:
        batch = to_device(batch, self.fabric.device, self.cfg.train.channels_last)
        local = self.model.loss(batch, done / self.total)
        terms = mean_over_ranks(self.fabric, local)  # the global batch's terms, the same on every rank
        values = self.backward(local["loss"], terms, done)
        if (done + 1) % self.accumulate == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        return values

    def backward(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], done: int) -> dict[str, float]:
        """Backward on ``loss``; returns the terms on the host ({} for a skipped non-finite batch).

        The terms come off the device in one transfer per batch. Without ``skip_nonfinite`` that happens after
        backward is queued, so the device does not idle between forward and backward; a non-finite loss still
        raises before the optimizer steps. A batch to skip must be recognised before backward, so that the gradients
        accumulated so far stay as they are.
        """
        skip = self.cfg.train.skip_nonfinite
        if skip:
            values = host_terms(terms)
            if not finite_terms(values, done + 1, skip=True):
                self.skipped += 1
                return {}
        self.fabric.backward(loss / self.accumulate if self.cfg.train.accumulate_mean else loss)
        if not skip:
            values = host_terms(terms)
            finite_terms(values, done + 1, skip=False)
        return values

    def record(self, terms: dict[str, float], done: int, epoch: int) -> None:
        for key, value in terms.items():
            self.window.setdefault(key, []).append(value)
        if done % max(1, self.cfg.train.log_every) == 0 or done == self.total:
            entry = {"batch": done, "step": done // self.accumulate, "epoch": epoch, "kind": "train",
                     "lr": [g["lr"] for g in self.optimizer.param_groups]}
            entry.update({k: float(np.mean(v)) for k, v in self.window.items()})
            if self.skipped:
                entry["skipped_batches"] = self.skipped
            self.jsonl.write(entry)
            self.window = {}

    def evaluate(self, done: int, epoch: int, epoch_end: bool = False) -> None:
        if self.fabric.world_size > 1:  # rank 0 evaluates the whole test set once; the others wait for it
            if self.fabric.is_global_zero:
                self._evaluate(done, epoch, epoch_end)
            self.fabric.barrier()
        else:
            self._evaluate(done, epoch, epoch_end)

    def _evaluate(self, done: int, epoch: int, epoch_end: bool = False) -> None:
        out = predict_dataset(self.method, self.test_set, self.cfg.data.eval_batch_size, self.fabric.device,
                              self.cfg.data.num_workers, self.fabric.autocast, desc=f"eval@{done}")
        metrics = score_outputs(out, self.cfg, self.test_set)
        self.jsonl.write({"batch": done, "step": done // self.accumulate, "epoch": epoch, "kind": "eval",
                          **({"epoch_end": True} if epoch_end else {}), **metrics})
        log.info("batch %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def checkpoint(self, done: int) -> None:
        if not self.fabric.is_global_zero:
            return
        state = {"batches_done": done, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "rng": rng_state()}
        save_checkpoint(self.run_dir, self.method.state_dict(), state)
        self.timer.saved()
