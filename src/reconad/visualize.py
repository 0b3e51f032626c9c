"""Heat-map overlays of anomaly maps on their images (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image


def heatmap_overlay(image01: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
                    alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image01: (H, W, 3) float image in [0, 1].
        amap: (H, W) anomaly map; coloured on the fixed range [vmin, vmax] so overlays are comparable.
        mask: optional (H, W) ground truth, drawn as a white outline.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    span = max(vmax - vmin, 1e-12)
    heat = colormaps[cmap](np.clip((amap - vmin) / span, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * image01 + alpha * heat
    if mask is not None and mask.any():
        from skimage.segmentation import find_boundaries

        blended[find_boundaries(mask > 0, mode="inner")] = 1.0
    return (np.clip(blended, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))


def save_float_map(path: str | Path, amap: np.ndarray) -> None:
    """Raw float32 anomaly map as a single-channel TIFF (values kept exactly)."""
    from .checkpoint import atomic_write

    atomic_write(path, lambda fh: Image.fromarray(amap.astype(np.float32), mode="F").save(fh, format="TIFF"))
