"""Evaluation: run a model over a labelled test set, score it, and write what reports need later."""

from __future__ import annotations

import csv
import io
import json
import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import RunConfig
from ..errors import ReconadError
from ..fileio import atomic_write_text, write_json
from ..methods.base import Method
from ..progress import progress
from ..run import METRICS_FILE, load, read_run_config
from .training import make_loader

log = logging.getLogger(__name__)


class EvaluationError(ReconadError):
    """The test set cannot be scored (undefined metric, non-finite maps); the trained model is saved regardless."""


@dataclass
class EvalOutputs:
    maps: np.ndarray  # (N, H, W) float32
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) uint8
    paths: list[str]
    defects: list[str]


def predict_dataset(method: Method, dataset: Dataset, batch_size: int, device: torch.device,
                    num_workers: int = 0, autocast=None, desc: str = "eval") -> EvalOutputs:
    """Run a model over a labelled dataset and collect maps, scores, masks and labels on the CPU.

    On CUDA the host never waits for the batch it has just queued: each batch's map and scores are copied to
    pinned host memory without blocking, and the host waits for a batch's copy only after it has loaded and queued
    the next batch, so loading and the GPU's forward overlap (and the host stays at most one batch ahead).
    Elsewhere the copies are plain reads; the outputs are the same either way.
    """
    was_training = method.training
    method.eval()
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    readbacks: list[_Readback] = []
    try:
        with torch.inference_mode():
            for batch in progress(loader, desc=desc, leave=False):
                images = batch["image"].to(device, non_blocking=True)
                with autocast() if autocast else nullcontext():
                    pred = method(images)
                readbacks.append(_Readback.start(pred.anomaly_map.float().squeeze(1), pred.score.float(), batch))
                if len(readbacks) > 1:
                    readbacks[-2].wait()  # the previous batch, finished on the device before this one started
    finally:
        method.train(was_training)
    if readbacks:
        readbacks[-1].wait()
    return EvalOutputs(np.concatenate([r.maps.numpy() for r in readbacks]),
                       np.concatenate([r.scores.numpy() for r in readbacks]),
                       np.concatenate([r.labels for r in readbacks]), np.concatenate([r.masks for r in readbacks]),
                       [p for r in readbacks for p in r.paths], [d for r in readbacks for d in r.defects])


@dataclass
class _Readback:
    """One batch's outputs on their way to the host: map and scores (``event``: set when their copy is done, CUDA
    only) and the batch's labels, masks, paths and defects (not its images)."""

    maps: torch.Tensor
    scores: torch.Tensor
    labels: np.ndarray
    masks: np.ndarray
    paths: list[str]
    defects: list[str]
    event: Any = None

    @classmethod
    def start(cls, maps: torch.Tensor, scores: torch.Tensor, batch: dict[str, Any]) -> _Readback:
        host = (batch["label"].numpy(), batch["mask"].squeeze(1).numpy().astype(np.uint8), list(batch["path"]),
                list(batch["defect"]))
        if maps.device.type != "cuda":
            return cls(maps.cpu(), scores.cpu(), *host)
        # non_blocking device-to-host copies land in pinned memory; the event tells when they are complete
        readback = cls(maps.to("cpu", non_blocking=True), scores.to("cpu", non_blocking=True), *host,
                       event=torch.cuda.Event())
        readback.event.record()
        return readback

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _check_scorable(out: EvalOutputs) -> None:
    if not np.isfinite(out.scores).all() or not np.isfinite(out.maps).all():
        bad = [p for p, s in zip(out.paths, out.scores) if not np.isfinite(s)][:3]
        raise EvaluationError(f"the model gives non-finite scores or maps (e.g. {', '.join(bad) or 'in the maps'}); "
                              "the training diverged — lower --optim.lr or check the loss terms in log.jsonl")
    classes = set(out.labels.tolist())
    if classes != {0, 1}:
        missing = "anomalous" if 1 not in classes else "normal"
        raise EvaluationError(f"the test set holds no {missing} images, so AUROC is undefined; add {missing} test "
                              "images (or evaluate on another set with `reconad test RUN --data.root ...`)")


def score_outputs(out: EvalOutputs, cfg: RunConfig, dataset: Dataset | None = None) -> dict[str, float]:
    """The standard metrics of one test set, plus whatever the dataset adds.

    A dataset may define ``extra_metrics(outputs: EvalOutputs) -> dict[str, float]`` (e.g. MVTec LOCO's
    structural/logical AUROC and sPRO) and ``has_masks`` (False: image-level metrics only).
    """
    from ..metrics import compute_metrics

    _check_scorable(out)
    has_masks = getattr(dataset, "has_masks", True)
    if cfg.eval.pixel_metrics and has_masks and out.masks.any():
        names = ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image")
        metrics = compute_metrics(out.scores, out.labels, out.maps, out.masks, metrics=names,
                                  mask_threshold=0.5, fpr_limit=cfg.eval.fpr_limit)
    else:
        metrics = compute_metrics(out.scores, out.labels, metrics=("image_auroc",))
    if hasattr(dataset, "extra_metrics"):
        metrics.update(dataset.extra_metrics(out))
    return metrics


def write_test_results(out: EvalOutputs, folder: Path, pixel_curves: bool = True) -> None:
    """``test_scores.csv`` (one row per test image) and ``curves.json`` (image ROC; PRO curve when masks exist),
    so that reports can be drawn later without the model or the data."""
    from sklearn.metrics import roc_curve

    from ..metrics import pro_curve

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "defect", "label", "score"])
    writer.writerows(zip(out.paths, out.defects, out.labels.tolist(), out.scores.tolist()))
    atomic_write_text(folder / "test_scores.csv", buffer.getvalue())
    curves: dict[str, Any] = {}
    if len(set(out.labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(out.labels, out.scores)
        curves["image_roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if pixel_curves and out.masks.any() and not out.masks.all():
        fpr, pro, _ = pro_curve(out.maps, out.masks, num_thresholds=256)
        curves["pro"] = {"fpr": fpr.tolist(), "pro": pro.tolist()}
    write_json(folder / "curves.json", curves)


def write_overlays(out: EvalOutputs, dataset: Dataset, folder: Path, count: int) -> list[Path]:
    """Overlays for up to ``count`` test images spread over the score ranking (highest, lowest, between)."""
    from ..visualize import heatmap_overlay, save_png, spread_over_ranking

    picks = spread_over_ranking(out.scores, count)
    if not picks:
        return []
    vmin, vmax = float(np.percentile(out.maps, 1)), float(out.maps.max())
    written = []
    for i in picks:
        image = dataset[i]["image"].permute(1, 2, 0).numpy()
        rgb = heatmap_overlay(image, out.maps[i], vmin, vmax, out.masks[i])
        path = folder / f"{i:04d}_{out.defects[i]}_{Path(out.paths[i]).stem}_score{out.scores[i]:.4f}.png"
        save_png(path, rgb)
        written.append(path)
    return written


def evaluate(run_dir: str | Path, data_overrides: dict[str, Any] | None = None, device: str = "cpu",
             write: bool = True) -> dict[str, float]:
    """Evaluate a trained run on its (or another) test set.

    Writes ``test_metrics.json`` and ``test_overlays/``; when the run's own final evaluation never completed
    (``metrics.json`` missing, e.g. an unreadable test image at the end of ``fit``), this evaluation of the
    run's own test set becomes its ``metrics.json``.
    """
    from ..data import build_datasets

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if data_overrides:
        cfg.data = replace(cfg.data, **data_overrides)
    from ..acceleration import apply_inference_speedups

    method = load(run_dir, device)
    apply_inference_speedups(method, cfg.eval)
    _, _, test_set = build_datasets(cfg.data)
    out = predict_dataset(method, test_set, cfg.data.eval_batch_size, torch.device(device), cfg.data.num_workers)
    metrics = score_outputs(out, cfg, test_set)
    if write:
        write_json(run_dir / "test_metrics.json", {"metrics": metrics, "data": asdict(cfg.data)})
        write_overlays(out, test_set, run_dir / "test_overlays", cfg.eval.overlays)
        if not data_overrides and not (run_dir / METRICS_FILE).is_file():
            pending = run_dir / "pending_metrics.json"
            extra = json.loads(pending.read_text()) if pending.is_file() else {}
            write_json(run_dir / METRICS_FILE, {**extra, "metrics": metrics, "method": cfg.method,
                                                "category": cfg.data.category, "n_test": len(test_set)})
            write_test_results(out, run_dir, cfg.eval.pixel_metrics and getattr(test_set, "has_masks", True))
            pending.unlink(missing_ok=True)
            log.info("final evaluation of %s completed: metrics.json written", run_dir)
    return metrics
