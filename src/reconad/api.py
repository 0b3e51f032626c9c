"""The Python API; it mirrors the command line (``reconad fit`` ↔ :func:`fit`, and so on)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import RunConfig, make_config
from .engine import RunResult
from .engine import evaluate as _evaluate
from .engine import fit as _fit
from .run import load, read_run_config

__all__ = ["calibrate", "demo", "evaluate", "evaluate_shifts", "export", "fit", "fit_config", "load", "make_config",
           "predict", "read_run_config", "resume"]


def fit(preset: str = "rd4ad", *, run_dir: str | Path | None = None, overwrite: bool = False,
        **sections: Any) -> RunResult:
    """Train from a preset with overrides per config section.

    ``reconad.fit("rd4ad", data={"root": "mvtec", "category": "bottle"}, train={"epochs": 5})``
    An existing ``run_dir`` is refused unless ``overwrite=True`` (use :func:`resume` to continue one).
    """
    return fit_config(make_config(preset, **sections), run_dir, overwrite=overwrite)


def fit_config(cfg: RunConfig, run_dir: str | Path | None = None, *, overwrite: bool = False) -> RunResult:
    """Train from a resolved :class:`reconad.config.RunConfig` (what ``reconad fit`` parses from argv); the run is
    calibrated at its end when it has normal images (held-out or ``eval.normal_dir``)."""
    from .deploy.calibrate import calibrate_after_fit

    return _fit(cfg, run_dir, overwrite=overwrite, after_save=calibrate_after_fit)


def resume(run_dir: str | Path) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with its saved configuration."""
    from .deploy.calibrate import calibrate_after_fit

    return _fit(read_run_config(run_dir), run_dir, resume=True, after_save=calibrate_after_fit)


def evaluate(run_dir: str | Path, device: str = "cpu", **data_overrides: Any) -> dict[str, float]:
    """Metrics of a trained run on its test set; ``data_overrides`` select another root or category."""
    return _evaluate(run_dir, data_overrides, device=device)


def predict(run_dir: str | Path, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
            device: str = "cpu", batch_size: int = 8, **options: Any) -> Any:
    """Scores, labels, masks, float maps, figures and ``scores.csv`` for an image file, a folder or a list of
    images, with a run folder or an ONNX export; returns a :class:`reconad.deploy.PredictSummary` (a list of the
    rows). ``options``: ``threshold``, ``far``, ``masks``, ``figures``, ``overwrite`` (see
    :func:`reconad.deploy.predict_folder`)."""
    from .deploy.predict import predict_folder

    return predict_folder(run_dir, inputs, output_dir, device=device, batch_size=batch_size, **options)


def calibrate(run_dir: str | Path, normal_dir: str | Path | None = None, far: float = 0.01,
              pixel_far: float | None = 0.001, **options: Any) -> Any:
    """Thresholds from normal images only (``run_dir/calibration.json``); ``options``: ``anomalous_dir``,
    ``mask_dir``, ``device``, ``batch_size`` (see :func:`reconad.deploy.calibrate_run`)."""
    from .deploy.calibrate import calibrate_run

    return calibrate_run(run_dir, normal_dir, far=far, pixel_far=pixel_far, **options)


def export(run_dir: str | Path, output_dir: str | Path, format: str = "onnx", **options: Any) -> dict[str, Any]:
    """Export a run with a parity check against eager PyTorch; returns ``export.json``'s content. ``options``:
    ``images``, ``tolerance``, ``opset``, ``overwrite``, ``model_overrides`` (see :func:`reconad.deploy.export_run`)."""
    from .deploy.export import export_run

    return export_run(run_dir, output_dir, format=format, **options)


def evaluate_shifts(run_dir: str | Path, shifts: Mapping[str, str | Path], device: str = "cpu",
                    write: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate one trained run on its own test set (column ``clean``) and on each shifted dataset root.

    Args:
        run_dir: A run folder.
        shifts: Column name → dataset root with the run's category in the same layout (a corrupted copy, or
            another domain such as a PACS domain prepared by :mod:`reconad.data.prepare`).
        device: Where to run the model.
        write: Also write ``shift_metrics.json`` into the run folder.
    """
    from .fileio import write_json

    results = {"clean": _evaluate(run_dir, None, device=device, write=False)}
    for name, root in shifts.items():
        results[name] = _evaluate(run_dir, {"root": str(root)}, device=device, write=False)
    if write:
        write_json(Path(run_dir) / "shift_metrics.json",
                   {"shifts": {k: str(v) for k, v in shifts.items()}, "metrics": results})
    return results


def demo(output_dir: str | Path = "runs/demo", categories: Sequence[str] | None = None,
         threads: int | None = None, **sections: Any) -> dict[str, RunResult]:
    """Train RD4AD with the offline EfficientNet-Lite0 backbone on each built-in demo category."""
    from .data.demo import DEMO_CATEGORIES, ensure_demo_data
    from .errors import ConfigError

    unknown = sorted(set(categories or ()) - set(DEMO_CATEGORIES))
    if unknown:
        raise ConfigError(f"unknown demo categories {unknown}; choose from {', '.join(DEMO_CATEGORIES)}")
    root = ensure_demo_data()
    train = {**sections.pop("train", {}), **({"threads": threads} if threads else {})}
    data = sections.pop("data", {})
    results = {}
    for category in categories or DEMO_CATEGORIES:
        cfg = make_config("demo", data={**data, "root": str(root), "category": category}, train=train, **sections)
        run_dir = Path(output_dir) / category
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo's own folder: always a fresh run
        results[category] = fit_config(cfg, run_dir)
    return results
