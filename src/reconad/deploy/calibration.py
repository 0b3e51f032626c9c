"""Thresholds from normal images only: conformal false-alarm-rate thresholds, quantiles and normalisation.

This module imports nothing of torch (the torch-free runtime uses it); :func:`calibrate_run`, which runs a
trained model, imports the torch side lazily.

**Image threshold.** For ``n`` normal calibration scores and a target false-alarm rate ``far``, the threshold is
the ``k = ⌈(n+1)(1−far)⌉``-th smallest score. If normal images are exchangeable, a new normal image's score
exceeds it with probability ≤ ``far`` (split-conformal guarantee, finite ``n``, no distribution assumption);
``k ≤ n`` needs ``n ≥ ⌈(1−far)/far⌉`` normals. A score is *anomalous* when ``score > threshold``.

**Pixel threshold.** The same order statistic over the pooled pixel values of the normal maps at ``pixel_far``.
Pixels of one image are dependent, so for pixels this is a calibrated estimate, not a guarantee.

**Normalisation.** ``normalise_score(x) = (x − m) / (t − m)`` with ``m`` the median normal score and ``t`` the
image threshold: 0 is a typical normal image, 1.0 is the threshold. Maps use the pixel median and the pixel
threshold likewise. Both come from calibration statistics only, never from the images being predicted, so two
images (or two runs) share one scale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReconadError

__all__ = ["CALIBRATION_FILE", "QUANTILE_LEVELS", "Calibration", "CalibrationError", "calibrate_from_scores",
           "conformal_threshold", "labelled_operating_point", "load_calibration", "min_normals_for",
           "write_calibration"]

CALIBRATION_FILE = "calibration.json"
QUANTILE_LEVELS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 1.0)
_FORMAT = 1


class CalibrationError(ReconadError):
    """Calibration cannot be computed or read (too few normals, a damaged calibration.json)."""


def min_normals_for(far: float) -> int:
    """The fewest normal images for which the conformal threshold at ``far`` exists: ⌈(1−far)/far⌉."""
    return math.ceil((1.0 - far) / far - 1e-9)


def conformal_threshold(values: Sequence[float] | np.ndarray, far: float, what: str = "normal images") -> float:
    """The ⌈(n+1)(1−far)⌉-th smallest of ``values`` (P(new normal > it) ≤ far under exchangeability)."""
    if not 0.0 < far < 1.0:
        raise CalibrationError(f"false-alarm rate {far} must lie strictly between 0 and 1 (e.g. --far 0.01)")
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = values.size
    k = math.ceil((n + 1) * (1.0 - far) - 1e-9)
    if k > n:
        raise CalibrationError(f"a false-alarm rate of {far} needs at least {min_normals_for(far)} {what}, but only "
                               f"{n} were given; add normal images (--normal DIR) or choose a larger --far")
    return float(values[max(k, 1) - 1])


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {str(q): float(v) for q, v in zip(QUANTILE_LEVELS, np.quantile(values, QUANTILE_LEVELS))}


def _normalise(x: Any, median: float, threshold: float) -> np.ndarray:
    span = threshold - median
    span = span if abs(span) > 1e-12 else 1e-12  # degenerate calibration (all normals equal): keep it finite
    return (np.asarray(x, dtype=np.float64) - median) / span


@dataclass
class Calibration:
    """Statistics of normal images and the thresholds derived from them (``calibration.json``)."""

    n_images: int
    source: str
    """Where the normal images came from, e.g. ``"holdout"``, ``"folder:/data/normals"``."""
    far: float
    image_threshold: float
    pixel_far: float | None
    pixel_threshold: float | None
    score_quantiles: dict[str, float]
    pixel_quantiles: dict[str, float]
    normal_scores: list[float] = field(default_factory=list)
    """The sorted normal image scores: a new ``far`` needs no model run (:meth:`at_far`)."""
    labelled: dict[str, Any] | None = None
    """Figures that used labelled anomalous data (``uses_labelled_data: True``); never the default threshold."""
    n_pixels: int = 0

    # -- normalisation and decisions -------------------------------------------------------------------------
    def normalise_score(self, x: Any) -> np.ndarray:
        """``(x − median normal score) / (threshold − median)``: 1.0 is the image threshold."""
        return _normalise(x, self.score_quantiles["0.5"], self.image_threshold)

    def normalise_map(self, m: Any) -> np.ndarray:
        """``(m − median normal pixel) / (pixel threshold − median)`` as float32: 1.0 is the pixel threshold."""
        if self.pixel_threshold is None:
            raise CalibrationError("this calibration has no pixel threshold; run `reconad calibrate RUN "
                                   "--pixel_far 0.001` to add one")
        return _normalise(m, self.pixel_quantiles["0.5"], self.pixel_threshold).astype(np.float32)

    def label(self, score: float, threshold: float | None = None) -> str:
        """``"anomalous"`` when ``score > threshold`` (default: the stored image threshold), else ``"normal"``."""
        limit = self.image_threshold if threshold is None else threshold
        return "anomalous" if float(score) > limit else "normal"

    def at_far(self, far: float) -> Calibration:
        """The same statistics with the image threshold for another false-alarm rate (no model run)."""
        if not self.normal_scores:
            raise CalibrationError("this calibration holds no normal scores; re-run `reconad calibrate`")
        return replace(self, far=far, image_threshold=conformal_threshold(self.normal_scores, far), labelled=None)

    # -- files -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        fields = set(cls.__dataclass_fields__)
        missing = {"n_images", "far", "image_threshold", "score_quantiles"} - set(data)
        if missing:
            raise CalibrationError(f"calibration data lacks {sorted(missing)}; re-run `reconad calibrate RUN`")
        base = {"source": "unknown", "pixel_far": None, "pixel_threshold": None, "pixel_quantiles": {}}
        return cls(**{**base, **{k: v for k, v in data.items() if k in fields}})


def write_calibration(folder: str | Path, calibration: Calibration) -> Path:
    """``folder/calibration.json``, written atomically (a run folder or an export folder)."""
    from ..fileio import atomic_write_text  # reconad.fileio imports torch; only writers need it

    text = json.dumps(calibration.to_dict(), indent=2) + "\n"
    return atomic_write_text(Path(folder) / CALIBRATION_FILE, text)


def load_calibration(folder: str | Path) -> Calibration | None:
    """The calibration of a run or export folder (``calibration.json``), or ``None`` when it has none."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CalibrationError(f"{path} cannot be read ({err}); delete it and run `reconad calibrate` again") from err
    if not isinstance(data, dict):
        raise CalibrationError(f"{path} does not hold a calibration; delete it and run `reconad calibrate` again")
    return Calibration.from_dict(data)


def calibrate_from_scores(scores: Sequence[float] | np.ndarray, pixel_values: np.ndarray | None = None,
                          far: float = 0.01, pixel_far: float | None = 0.001, source: str = "holdout") -> Calibration:
    """A :class:`Calibration` from the image scores (and optionally pooled map pixels) of normal images only.

    Args:
        scores: One score per normal image.
        pixel_values: Map values of those images, any shape (pooled); ``None``: no pixel threshold.
        far: Target image false-alarm rate.
        pixel_far: Target fraction of normal pixels above the pixel threshold; ``None``: none.
        source: Where the normals came from (recorded).

    Raises:
        CalibrationError: Too few normals for ``far`` (the message says how many are needed).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise CalibrationError(f"no normal images to calibrate on ({source}); pass a folder of normal images "
                               "(--normal DIR) or set data.holdout_fraction")
    threshold = conformal_threshold(scores, far)
    pixel_threshold, pixel_q, n_pixels = None, {}, 0
    if pixel_values is not None and pixel_far is not None:
        pixels = np.asarray(pixel_values, dtype=np.float64).ravel()
        pixel_threshold = conformal_threshold(pixels, pixel_far, what="normal pixels")
        pixel_q, n_pixels = _quantiles(pixels), int(pixels.size)
    return Calibration(n_images=int(scores.size), source=source, far=far, image_threshold=threshold,
                       pixel_far=pixel_far if pixel_threshold is not None else None, pixel_threshold=pixel_threshold,
                       score_quantiles=_quantiles(scores), pixel_quantiles=pixel_q,
                       normal_scores=[float(s) for s in scores], n_pixels=n_pixels)


def labelled_operating_point(calibration: Calibration, anomalous_scores: Sequence[float],
                             pixel_labels: np.ndarray | None = None,
                             pixel_values: np.ndarray | None = None) -> dict[str, Any]:
    """F1-optimal image threshold and (precision, recall) at the FAR threshold, from labelled anomalous images.

    Normals are the calibration's own scores. With ``pixel_labels``/``pixel_values`` (pooled ground truth and
    map values of the anomalous images), also pixel precision/recall at the pixel threshold.
    """
    from sklearn.metrics import precision_recall_curve

    normal = np.asarray(calibration.normal_scores, np.float64)
    anomalous = np.asarray(anomalous_scores, np.float64).ravel()
    if anomalous.size == 0:
        raise CalibrationError("no anomalous images given (--anomalous DIR holds none)")
    y = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    s = np.r_[normal, anomalous]
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    flagged = s > calibration.image_threshold
    tp = int((flagged & (y == 1)).sum())
    out: dict[str, Any] = {
        "uses_labelled_data": True, "n_anomalous": int(anomalous.size),
        # sklearn flags score >= t; the next-lower score keeps "score > threshold" equivalent
        "f1_optimal_threshold": float(np.nextafter(thresholds[best], -np.inf)), "f1_optimal_f1": float(f1[best]),
        "precision_at_far_threshold": tp / max(int(flagged.sum()), 1),
        "recall_at_far_threshold": tp / anomalous.size,
    }
    if pixel_labels is not None and pixel_values is not None and calibration.pixel_threshold is not None:
        truth = np.asarray(pixel_labels).ravel() > 0
        hit = np.asarray(pixel_values).ravel() > calibration.pixel_threshold
        out["pixel_precision_at_threshold"] = float((hit & truth).sum() / max(hit.sum(), 1))
        out["pixel_recall_at_threshold"] = float((hit & truth).sum() / max(truth.sum(), 1))
    return out
