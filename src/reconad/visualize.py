"""Anomaly maps as pictures: blended overlays (PNG) and example panels for reports.

An example panel shows, for one test image, **input | heat map with colour bar | overlay** with the ground-truth
contour and the predicted-region contour, twice: at the model's input size and at the original image size (the
map upsampled to the original resolution, so the defect is shown where it is on the real image). With a
calibration (``calibration.json``: thresholds and quantiles of held-out normal images) the map is shown in
normalised units ``(x − median) / (threshold − median)`` — 0 is a median normal pixel, 1 the pixel threshold — and
the predicted region is the map above the threshold; without one the map is in raw model units and no region is
predicted (there is no threshold to draw it with).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

GT_COLOR, PRED_COLOR = "#FFFFFF", "#F0E442"  # white ground truth, Okabe–Ito yellow prediction (on "inferno")
CMAP = "inferno"  # perceptually uniform and readable in grey


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
    from .fileio import atomic_write

    atomic_write(path, lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))


def save_float_map(path: str | Path, amap: np.ndarray) -> None:
    """Raw float32 anomaly map as a single-channel TIFF (values kept exactly)."""
    from .fileio import atomic_write

    atomic_write(path, lambda fh: Image.fromarray(amap.astype(np.float32), mode="F").save(fh, format="TIFF"))


# -- units ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapUnits:
    """How map values are shown: raw, or normalised by a calibration (``(x − median) / (threshold − median)``)."""

    median: float = 0.0
    threshold: float | None = None
    calibrated: bool = False

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if not self.calibrated:
            return np.asarray(values, float)
        span = self.threshold - self.median
        return (np.asarray(values, float) - self.median) / (span if span else 1.0)

    @property
    def shown_threshold(self) -> float | None:
        return 1.0 if self.calibrated else None

    @property
    def label(self) -> str:
        if self.calibrated:
            return "anomaly score, normalised\n(x − median) / (threshold − median)"
        return "anomaly score (raw model units)"


def pixel_units(calibration: Mapping[str, Any] | None) -> MapUnits:
    """Map units from a ``calibration.json`` dict: normalised when it has a pixel threshold and median."""
    if not calibration or calibration.get("pixel_threshold") is None:
        return MapUnits()
    median = (calibration.get("pixel_quantiles") or {}).get("0.5")
    if median is None:
        return MapUnits(0.0, float(calibration["pixel_threshold"]), False)
    return MapUnits(float(median), float(calibration["pixel_threshold"]), True)


def spread_over_ranking(scores: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over the score ranking (highest, lowest and between), sorted."""
    if count <= 0 or len(scores) == 0:
        return []
    order = np.argsort(-np.asarray(scores), kind="stable")
    return sorted(set(order[np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)].tolist()))


# -- the original resolution ----------------------------------------------------------------------------------
def upsample_to_original(amap: np.ndarray, original_hw: tuple[int, int], image_size: int,
                         crop_size: int | None = None) -> np.ndarray:
    """The model's map on the original image grid (bilinear). The model saw the image resized to ``image_size``
    squared and centre-cropped to ``crop_size``: outside that crop the map is NaN (not seen, drawn blank)."""
    h, w = original_hw
    crop = crop_size or image_size
    x0, x1 = (image_size - crop) / 2 * w / image_size, (image_size + crop) / 2 * w / image_size
    y0, y1 = (image_size - crop) / 2 * h / image_size, (image_size + crop) / 2 * h / image_size
    box = (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
    inside = Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(
        (box[2] - box[0], box[3] - box[1]), Image.BILINEAR)
    out = np.full((h, w), np.nan, np.float32)
    out[box[1]:box[3], box[0]:box[2]] = np.asarray(inside)
    return out


def _original_mask(dataset: Any, index: int, hw: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask at the original resolution (all zero for normal images or without a file)."""
    records = getattr(dataset, "records", None)
    path = getattr(records[index], "mask", None) if records is not None else None
    if path is None:
        return np.zeros(hw, bool)
    from .data.transforms import mask_to_gray

    gray = np.asarray(mask_to_gray(Image.open(path), path))
    threshold = 255 * float(getattr(dataset, "mask_threshold", 0.5))
    return gray > threshold


# -- panels -----------------------------------------------------------------------------------------------------
def _contour(ax, mask: np.ndarray, color: str, linestyle: str = "-") -> bool:
    if mask is None or not np.any(mask) or np.all(mask):
        return False
    ax.contour(np.asarray(mask, float), levels=[0.5], colors=[color], linewidths=1.4, linestyles=[linestyle])
    return True


def _row(fig, axes, image: np.ndarray, shown: np.ndarray, mask: np.ndarray | None, units: MapUnits,
         vrange: tuple[float, float], size_note: str) -> None:
    ax_in, ax_map, ax_over = axes
    ax_in.imshow(image)
    ax_in.set_title(f"input ({size_note})")
    im = ax_map.imshow(shown, cmap=CMAP, vmin=vrange[0], vmax=vrange[1])
    ax_map.set_title("anomaly map")
    bar = fig.colorbar(im, ax=ax_map, fraction=0.046, pad=0.03)
    bar.set_label(units.label, fontsize=8)
    if units.shown_threshold is not None and vrange[0] <= units.shown_threshold <= vrange[1]:
        bar.ax.axhline(units.shown_threshold, color=PRED_COLOR, linewidth=1.5)
    ax_over.imshow(image)
    ax_over.imshow(shown, cmap=CMAP, vmin=vrange[0], vmax=vrange[1], alpha=0.45)
    _contour(ax_over, mask, GT_COLOR)
    if units.shown_threshold is not None:
        _contour(ax_over, np.nan_to_num(shown, nan=-np.inf) > units.shown_threshold, PRED_COLOR, "--")
    ax_over.set_title("overlay")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)


def example_figure(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *, units: MapUnits,
                   vrange: tuple[float, float], title: str, original: tuple[np.ndarray, np.ndarray,
                                                                            np.ndarray | None] | None = None):
    """Input | heat map with colour bar | overlay (ground truth: white line; predicted region: yellow dashes).

    Args:
        image, amap, mask: at the model's input size, (H, W, 3) in [0, 1], (H, W) raw map, (H, W) or None.
        units: How the map is shown (:func:`pixel_units`); ``vrange`` is in those units.
        original: (image, upsampled raw map, mask) at the original size: a second row.
    """
    from .plots import style

    plt = style.pyplot()
    rows = [(image, amap, mask, f"model input, {image.shape[1]}×{image.shape[0]} px")]
    if original is not None:
        o_image, o_map, o_mask = original
        rows.append((o_image, o_map, o_mask, f"original, {o_image.shape[1]}×{o_image.shape[0]} px"))
    with plt.rc_context(style.rc()):
        fig, axes = plt.subplots(len(rows), 3, figsize=(9.6, 3.2 * len(rows) + 0.5), squeeze=False,
                                 layout="constrained")
        for ax_row, (img, raw, msk, note) in zip(axes, rows):
            _row(fig, ax_row, img, units(raw), msk, units, vrange, note)
        legend = "white: ground truth" + (" · yellow dashes: predicted region (map > threshold)"
                                          if units.shown_threshold is not None else " · uncalibrated: no threshold")
        fig.suptitle(f"{title}\n{legend}", fontsize=10)
    return fig


def write_examples(out: Any, dataset: Any, folder: str | Path, count: int,
                   calibration: Mapping[str, Any] | None = None) -> list[Path]:
    """Example panels (PNG + SVG) for up to ``count`` test images spread over the score ranking.

    Files are named like the overlays, ``<index>_<defect>_<stem>_score<score>.png``, so reports pick them the
    same way. The colour range is fixed over the test set (1st percentile to maximum) so panels compare.

    Args:
        out: ``reconad.engine.EvalOutputs`` of the test set (maps at model input size, scores, masks, paths).
        dataset: The test dataset (images at model input size; ``records`` give the original mask files).
        calibration: The run's ``calibration.json`` content, if any.
    """
    from .data.transforms import load_image
    from .plots import style

    if count <= 0 or len(out.scores) == 0:
        return []
    folder = Path(folder)
    picks = spread_over_ranking(out.scores, count)
    units = pixel_units(calibration)
    vrange = (float(units(np.percentile(out.maps, 1))), float(units(out.maps.max())))
    image_size = int(getattr(dataset, "image_size", out.maps.shape[-1]))
    written = []
    for i in picks:
        image = dataset[i]["image"].permute(1, 2, 0).numpy()
        original = np.asarray(load_image(out.paths[i]), np.float32) / 255.0
        hw = original.shape[:2]
        o_map = upsample_to_original(out.maps[i], hw, image_size, getattr(dataset, "crop_size", None))
        title = f"{Path(out.paths[i]).name} · {out.defects[i]} · image score {out.scores[i]:.4g}"
        same_grid = original.shape[:2] == image.shape[:2]  # nothing new to show at the original size
        fig = example_figure(image, out.maps[i], out.masks[i], units=units, vrange=vrange, title=title,
                             original=None if same_grid else (original, o_map, _original_mask(dataset, i, hw)))
        stem = folder / f"{i:04d}_{out.defects[i]}_{Path(out.paths[i]).stem}_score{out.scores[i]:.4f}"
        style.save(fig, stem)
        written.append(stem.parent / f"{stem.name}.png")
    return written
