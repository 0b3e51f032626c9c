"""Deployment: calibrated thresholds, predictions with decisions, verified export and a torch-free runtime.

Names load lazily, so ``import reconad.deploy`` (and ``reconad.deploy.runtime``) needs no torch; only
:func:`calibrate_run`, :func:`open_predictor` on a run folder, :func:`predict_folder` and :func:`export_run`
import it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Calibration": "calibration", "CalibrationError": "calibration", "calibrate_from_scores": "calibration",
    "calibrate_run": "calibrate", "conformal_threshold": "calibration", "load_calibration": "calibration",
    "write_calibration": "calibration", "min_normals_for": "calibration",
    "Detector": "runtime", "DetectorResult": "runtime", "ExportError": "runtime", "preprocess": "runtime",
    "RunPredictor": "predict", "PredictSummary": "predict", "open_predictor": "predict", "predict_folder": "predict",
    "ExportParityError": "export", "export_run": "export", "verify_export": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
