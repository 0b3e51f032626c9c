"""Slow, line-by-line ports of official evaluation code, kept to check ``reconad.metrics`` against.

Used by the tests and by ``benchmarks/metrics_speed.py``; never by the engine. Not vectorised on purpose: each line
mirrors the official source so that a reader can compare them side by side.
"""

from __future__ import annotations

import statistics

import numpy as np


def official_compute_pro(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """RD4AD's ``compute_pro`` (official_code.md §1.8), line by line; ``np.bool`` and ``DataFrame.append``
    (removed from numpy/pandas) replaced by their equivalents.

    Args:
        masks: (N, H, W) 0/1 integer masks.
        amaps: (N, H, W) anomaly maps.
    """
    from skimage import measure
    from sklearn.metrics import auc

    assert set(masks.flatten()) == {0, 1}, "set(masks.flatten()) must be {0, 1}"
    rows = []
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th = amaps.min()
    max_th = amaps.max()
    delta = (max_th - min_th) / num_th
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th] = 0
        binary_amaps[amaps > th] = 1
        pros = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                axes0_ids = region.coords[:, 0]
                axes1_ids = region.coords[:, 1]
                tp_pixels = binary_amap[axes0_ids, axes1_ids].sum()
                pros.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        rows.append((statistics.mean(pros), fpr))
    pro = np.array([r[0] for r in rows])
    fpr = np.array([r[1] for r in rows])
    keep = fpr < 0.3
    with np.errstate(invalid="ignore"):
        fpr = fpr[keep] / fpr[keep].max() if keep.any() else fpr[keep]
    return auc(fpr, pro[keep])


def official_per_image_aupro(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> float:
    """RD4AD's reported AUPRO: the mean of :func:`official_compute_pro` over the anomalous images, one at a time."""
    return float(np.mean([official_compute_pro(masks[i][None].astype(int), maps[i][None])
                          for i in np.flatnonzero(labels)]))
