"""Calibrating a trained run: score normal images (a folder or the run's held-out normals) and write
``calibration.json``; the statistics and thresholds themselves are in :mod:`reconad.deploy.calibration`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .calibration import (
    Calibration,
    CalibrationError,
    calibrate_from_scores,
    labelled_operating_point,
    write_calibration,
)
from .predict import RunPredictor, find_mask, image_files, load_truth

__all__ = ["calibrate_after_fit", "calibrate_run"]


# -- calibrating a run ------------------------------------------------------------------------------------------
def _pooled_pixels(maps: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """The pixels of (B, H, W) maps, at most ``cap`` per image (a fixed-seed sample) to bound memory."""
    flat = maps.reshape(maps.shape[0], -1)
    if flat.shape[1] <= cap:
        return flat.ravel().astype(np.float32)
    return np.stack([row[rng.choice(row.size, cap, replace=False)] for row in flat]).ravel().astype(np.float32)


def _score_images(predictor: Any, batches: Any, cap: int, truth: bool = False) -> tuple[np.ndarray, ...]:
    """Scores, pooled pixels (and pooled ground truth) of batches of preprocessed (image, mask or None) pairs."""
    rng = np.random.default_rng(0)
    scores, pixels, labels = [], [], []
    for images, masks in batches:
        maps, batch_scores = predictor.run(np.stack(images))
        scores.append(batch_scores.astype(np.float64))
        if truth:  # every pixel of labelled images is kept: masks are small compared with the normals
            labels.append(np.stack(masks).ravel())
            pixels.append(maps[:, 0].ravel())
        else:
            pixels.append(_pooled_pixels(maps[:, 0], cap, rng))
    return (np.concatenate(scores), np.concatenate(pixels)) + ((np.concatenate(labels),) if truth else ())


def _folder_batches(predictor: Any, folder: str | Path, batch_size: int, mask_dir: str | Path | None = None):
    from ..progress import progress

    files = image_files(folder)
    for start in progress(range(0, len(files), batch_size), desc=f"calibrate {Path(folder).name}"):
        chunk = files[start:start + batch_size]
        images = [predictor.preprocess(path) for path, _ in chunk]
        masks = []
        for _, name in chunk:
            mask = find_mask(Path(mask_dir), name) if mask_dir is not None else None
            masks.append(load_truth(mask, predictor.metadata) if mask is not None
                         else np.zeros((predictor.image_size,) * 2, bool))
        yield images, masks


def _holdout_batches(predictor: Any, batch_size: int):
    from ..data import build_datasets
    from ..progress import progress

    holdout = build_datasets(predictor.config.data)[1]
    if holdout is None:
        raise CalibrationError(f"{predictor.run_dir} has no held-out normal images (data.holdout_fraction is 0); "
                               "pass a folder of normal images: `reconad calibrate RUN --normal DIR`")
    for start in progress(range(0, len(holdout), batch_size), desc="calibrate holdout"):
        stop = min(start + batch_size, len(holdout))
        yield [holdout[i]["image"].numpy() for i in range(start, stop)], [None] * (stop - start)


def calibrate_run(run_dir: str | Path, normal_dir: str | Path | None = None, far: float = 0.01,
                  pixel_far: float | None = 0.001, anomalous_dir: str | Path | None = None,
                  mask_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 8,
                  max_pixels_per_image: int = 16384) -> Calibration:
    """Calibrate a trained run on normal images only and write ``run_dir/calibration.json`` (atomic).

    Args:
        run_dir: A trained run folder.
        normal_dir: Folder of normal images; default: the run's held-out normals (``data.holdout_fraction``).
        far: Target image false-alarm rate (conformal threshold).
        pixel_far: Target fraction of normal pixels flagged; ``None``: no pixel threshold.
        anomalous_dir: Optional labelled anomalous images: adds the F1-optimal threshold and the operating
            point at the FAR threshold (``labelled``, marked ``uses_labelled_data``); never changes the threshold.
        mask_dir: Ground-truth masks of ``anomalous_dir`` (pixel precision/recall at the pixel threshold).
        max_pixels_per_image: Pixels per normal image pooled for the pixel statistics (fixed-seed sample).

    Raises:
        CalibrationError: No or too few normal images for ``far`` / ``pixel_far``.
    """
    predictor = RunPredictor(run_dir, device, batch_size)
    if normal_dir is not None:
        batches, source = _folder_batches(predictor, normal_dir, batch_size), f"folder:{normal_dir}"
    else:
        batches, source = _holdout_batches(predictor, batch_size), "holdout"
    scores, pixels = _score_images(predictor, batches, max_pixels_per_image)
    calibration = calibrate_from_scores(scores, pixels, far, pixel_far, source)
    if anomalous_dir is not None:
        bad = _score_images(predictor, _folder_batches(predictor, anomalous_dir, batch_size, mask_dir),
                            max_pixels_per_image, truth=True)
        use_pixels = mask_dir is not None
        calibration.labelled = labelled_operating_point(calibration, bad[0], bad[2] if use_pixels else None,
                                                        bad[1] if use_pixels else None)
    write_calibration(run_dir, calibration)
    return calibration


def calibrate_after_fit(run_dir: Path, cfg: Any, device: Any) -> dict[str, Any]:
    """The end of ``fit``: the decision threshold from normal images only — ``eval.normal_dir`` or the held-out
    normals — exactly as ``reconad calibrate`` computes it, on the final checkpoint just saved (passed to
    ``reconad.engine.fit`` as ``after_save``). Too few normals for ``eval.far`` is not fatal — the trained model is
    saved — but said once, with the fix."""
    import logging

    if not cfg.data.holdout_fraction and not cfg.eval.normal_dir:
        return {}
    try:
        calibration = calibrate_run(run_dir, cfg.eval.normal_dir, far=cfg.eval.far, pixel_far=cfg.eval.pixel_far,
                                    device=str(device), batch_size=cfg.data.eval_batch_size)
    except CalibrationError as err:
        logging.getLogger(__name__).warning(
            "no decision threshold for %s: %s. Calibrate later with `reconad calibrate %s --normal DIR` or a "
            "larger --data.holdout_fraction", run_dir, err, run_dir)
        return {"threshold": {"skipped": str(err)}}
    return {"threshold": {"far": calibration.far, "image_threshold": calibration.image_threshold,
                          "n_images": calibration.n_images, "source": calibration.source}}
