"""Prediction results → JSON: numbers as they are, maps as base64 PNG coloured on a stated range."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

COLORMAP = "jet"
# the display range of normalised maps: calibration puts the median normal pixel at 0 and the pixel threshold at
# 1.0 (reconad.deploy.calibration), so [0, 2] shows the decision boundary mid-bar on every image alike
NORMALISED_RANGE = (0.0, 2.0)
RAW_UNITS = "raw (per-image range: no pixel calibration)"
MASK_RGBA = (255, 0, 255, 255)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = COLORMAP) -> np.ndarray:
    """(H, W) floats → (H, W, 3) uint8 colours on the fixed range [vmin, vmax] (values outside are clipped)."""
    from matplotlib import colormaps

    span = max(vmax - vmin, 1e-12)
    rgb = colormaps[cmap](np.clip((np.asarray(amap, np.float64) - vmin) / span, 0.0, 1.0))[..., :3]
    return (rgb * 255 + 0.5).astype(np.uint8)


def colorbar_stops(n: int = 11, cmap: str = COLORMAP) -> list[str]:
    """CSS colours at n evenly spaced points of the colour map: the page draws its colour bar from them."""
    rgb = colorize(np.linspace(0.0, 1.0, n)[None, :], 0.0, 1.0, cmap)[0]
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool → (H, W, 4) RGBA: the region's inner boundary opaque, a faint fill, transparent elsewhere."""
    from skimage.segmentation import find_boundaries

    mask = np.asarray(mask, bool)
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*MASK_RGBA[:3], 60)
    rgba[find_boundaries(mask, mode="inner")] = MASK_RGBA
    return rgba


def map_range(result: Any, calibrated: bool, calibration: Any = None) -> tuple[str, float, float]:
    """(units, vmin, vmax) the map of one result is coloured on."""
    if calibrated and result.normalised_map is not None:
        vmin, vmax = getattr(calibration, "map_range", None) or NORMALISED_RANGE
        return "normalised", float(vmin), float(vmax)
    amap = np.asarray(result.anomaly_map, np.float64)
    finite = amap[np.isfinite(amap)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return RAW_UNITS, lo, hi


def result_json(name: str, shape: tuple[int, int], result: Any, calibration: Any, maps: bool) -> dict[str, Any]:
    """One image's answer; decisions (label, threshold, mask) are ``None`` when the model has no calibration."""
    calibrated = calibration is not None
    out: dict[str, Any] = {
        "filename": name, "height": int(shape[0]), "width": int(shape[1]),
        "score": _float_or_none(result.score),
        "normalised_score": _float_or_none(result.normalised_score) if calibrated else None,
        "label": result.label if calibrated else None,
        "threshold": _float_or_none(result.threshold) if calibrated else None,
    }
    mask = result.mask if calibrated else None
    out["mask_fraction"] = float(np.asarray(mask, bool).mean()) if mask is not None else None
    if maps:
        units, vmin, vmax = map_range(result, calibrated, calibration)
        shown = result.normalised_map if units == "normalised" else result.anomaly_map
        out["map"] = {"png": png_base64(colorize(shown, vmin, vmax)), "units": units, "vmin": vmin, "vmax": vmax}
        out["mask"] = {"png": png_base64(mask_outline(mask))} if mask is not None else None
    return out
