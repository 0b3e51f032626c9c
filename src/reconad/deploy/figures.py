"""One figure per prediction: input | heat map in normalised units (colour bar) | overlay with contours.

Plain matplotlib (Agg, no pyplot state); the house style of ``reconad.plots`` is not needed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .calibration import Calibration
from .runtime import DetectorResult


def save_prediction_figure(path: Path, image: np.ndarray, result: DetectorResult, calibration: Calibration | None,
                           truth: np.ndarray | None = None) -> None:
    """Write ``path`` (PNG). Without calibration the heat map shows raw values (the colour bar says so)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_write

    if result.normalised_map is not None:
        heat, vmin, vmax, unit = result.normalised_map, 0.0, 2.0, "normalised (1 = threshold)"
    else:
        heat, vmin, vmax, unit = result.anomaly_map, float(result.anomaly_map.min()), \
            float(result.anomaly_map.max()), "raw (no calibration)"
    fig = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(np.clip(image, 0, 1))
    axes[0].set_title("input")
    shown = axes[1].imshow(heat, cmap="jet", vmin=vmin, vmax=vmax)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04).set_label(unit)
    axes[1].set_title(f"score {result.score:.4g}" + (f" ({result.normalised_score:.2f})"
                                                     if result.normalised_score is not None else ""))
    axes[2].imshow(np.clip(image, 0, 1))
    axes[2].imshow(heat, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.4)
    if result.mask is not None and result.mask.any():
        axes[2].contour(result.mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    if truth is not None and truth.any():
        axes[2].contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.2, linestyles="--")
    axes[2].set_title(result.label or "no threshold")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
