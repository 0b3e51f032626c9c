"""Speed of reconad.metrics on synthetic MVTec AD- and VisA-sized categories.

Each metric is timed against a reference and the two values are compared:

* image / pixel AUROC: ``sklearn.metrics.roc_auc_score``;
* pixel F1-max: ``sklearn.metrics.precision_recall_curve`` and the max of 2PR / (P + R);
* dataset AUPRO: (a) the MVTec AD evaluation algorithm written out plainly (per-image ``scipy.ndimage.label``,
  one ``argsort`` of all pixels, cumulative sums, ties merged, trapezoid with interpolation at the limit; exact,
  with float64 FPRs instead of the original's float32), and (b) the textbook loop over 1000 thresholds evenly
  spaced between the smallest and largest score, compared with ``aupro(num_thresholds=1000)``, which evaluates the
  same approximation;
* per-image AUPRO: RD4AD's ``compute_pro`` ported line by line (skimage ``label``/``regionprops`` at each of the
  200 thresholds, ``sklearn.metrics.auc``), image by image;
* sPRO (blobs as LOCO regions, relative saturation 0.5): one ``argsort`` of all pixels and a cumulative sum per
  region, exact.

The data: ``n`` images of 256x256, half of them anomalous with 1-3 smooth blobs (thresholded Gaussian-blurred
noise); maps = blurred noise plus a signal inside the blobs, float32. Times are the median of ``--repeats`` runs
for reconad and of ``--ref-repeats`` runs for the references (the slowest references run once).

Run: ``python benchmarks/metrics_speed.py`` (writes ``benchmarks/results/metrics_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
import sklearn
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from reconad import metrics as M
from reconad.metrics_reference import official_per_image_aupro as reference_aupro_per_image

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_speed.json"


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------------


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-3 smooth blobs: the largest components of thresholded, Gaussian-blurred noise."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=rng.uniform(5, 10))
    field = field > np.quantile(field, rng.uniform(0.94, 0.99))
    labels, n = ndimage.label(field, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel())[1:]
    keep = np.argsort(areas)[::-1][: rng.integers(1, 4)] + 1
    return np.isin(labels, keep)


def make_category(n_images: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images // 2):
        masks[i] = blob_mask(rng, size)
    maps = np.empty(masks.shape, dtype=np.float32)
    for i in range(n_images):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=4)
        signal = ndimage.gaussian_filter(masks[i].astype(np.float64), sigma=3)
        maps[i] = noise / noise.std() + 2.5 * signal * rng.uniform(0.3, 1.5)
    labels = masks.reshape(n_images, -1).any(axis=1).astype(int)
    return maps, masks, labels


def loco_regions_of(masks: np.ndarray) -> list[list[tuple[np.ndarray, float]]]:
    regions = []
    for mask in masks:
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([(lab == r, float(int(0.5 * np.count_nonzero(lab == r)))) for r in range(1, n + 1)])
    return regions


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """The MVTec AD evaluation code's trapezoid with an upper integration limit."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def reference_aupro_global_sort(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AD evaluation code's compute_pro + trapezoid, with float64 FPRs."""
    fp_change = np.zeros(maps.shape, dtype=np.float64)
    pro_change = np.zeros(maps.shape, dtype=np.float64)
    n_regions, n_normal = 0, 0
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        n_regions += n
        ok = labels == 0
        n_normal += int(ok.sum())
        fp_change[i][ok] = 1
        for k in range(n):
            region = labels == k + 1
            pro_change[i][region] = 1.0 / region.sum()
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / n_normal
    pros = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], fprs[keep], [1.0]])
    pros = np.concatenate([[0.0], pros[keep], [1.0]])
    return trapezoid_to(fprs, pros, limit) / limit


def reference_aupro_loop(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3, num: int = 1000) -> float:
    """Loop over ``num`` evenly spaced thresholds: positives = score >= t."""
    labels, n_regions = ndimage.label(masks, structure=np.stack([np.zeros((3, 3)), np.ones((3, 3)),
                                                                  np.zeros((3, 3))]))
    normal = maps[~masks]
    anomalous = maps[masks]
    region = labels[masks]
    areas = np.bincount(region, minlength=n_regions + 1)[1:]
    fprs, pros = [0.0], [0.0]
    for t in np.linspace(float(maps.max()), float(maps.min()), num):
        fprs.append(np.count_nonzero(normal >= t) / normal.size)
        tp = np.bincount(region[anomalous >= t], minlength=n_regions + 1)[1:]
        pros.append(float(np.mean(tp / areas)))
    return trapezoid_to(np.array(fprs), np.array(pros), limit) / limit


def reference_spro(maps: np.ndarray, regions: list, limit: float = 0.3) -> float:
    """One argsort of all pixels; per region, a cumulative sum of its pixels in that order, saturated."""
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    union = np.zeros(maps.shape, dtype=bool)
    spro = np.zeros(order.size)
    n_regions = sum(len(r) for r in regions)
    for i, image_regions in enumerate(regions):
        for mask, saturation in image_regions:
            union[i] |= mask
            member = np.zeros(maps.shape, dtype=bool)
            member[i] = mask
            spro += np.minimum(np.cumsum(member.ravel()[order]) / saturation, 1.0)
    fprs = np.cumsum(~union.ravel()[order]) / np.count_nonzero(~union)
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], fprs[keep]])
    spro = np.concatenate([[0.0], spro[keep] / n_regions])
    return trapezoid_to(fprs, spro, limit) / limit


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1[:-1]))


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(median seconds, value) over ``repeats`` calls."""
    times, value = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(value)


def bench_category(name: str, n_images: int, repeats: int, ref_repeats: int) -> list[dict]:
    maps, masks, labels = make_category(n_images)
    scores = maps.reshape(n_images, -1).max(axis=1)
    regions = loco_regions_of(masks)
    cases = [
        ("image AUROC", lambda: M.auroc(scores, labels), "sklearn roc_auc_score",
         lambda: roc_auc_score(labels, scores), ref_repeats),
        ("pixel AUROC", lambda: M.pixel_auroc(maps, masks), "sklearn roc_auc_score",
         lambda: roc_auc_score(masks.ravel(), maps.ravel()), ref_repeats),
        ("pixel F1-max", lambda: M.pixel_f1_max(maps, masks)[0], "sklearn precision_recall_curve",
         lambda: sklearn_f1_max(masks.ravel(), maps.ravel()), ref_repeats),
        ("AUPRO (exact)", lambda: M.aupro(maps, masks), "MVTec AD algorithm, argsort of all pixels",
         lambda: reference_aupro_global_sort(maps, masks), ref_repeats),
        ("AUPRO (1000 thresholds)", lambda: M.aupro(maps, masks, num_thresholds=1000), "loop over 1000 thresholds",
         lambda: reference_aupro_loop(maps, masks), 1),
        ("AUPRO per image (RD4AD)", lambda: M.aupro_per_image(maps, masks), "official compute_pro, line by line",
         lambda: reference_aupro_per_image(maps, masks, labels), 1),
        ("sPRO AUC (exact)", lambda: M.spro_auc(maps, regions), "argsort + cumsum per region",
         lambda: reference_spro(maps, regions), 1),
    ]
    rows = []
    for metric, ours, ref_name, ref, n_ref in cases:
        t_ours, v_ours = timed(ours, repeats)
        t_ref, v_ref = timed(ref, n_ref)
        rows.append({"metric": metric, "ours_s": t_ours, "reference": ref_name, "reference_s": t_ref,
                     "speedup": t_ref / t_ours, "ours": v_ours, "reference_value": v_ref,
                     "abs_diff": abs(v_ours - v_ref)})
        print(f"  {name}: {metric}: {t_ours:.3f} s vs {t_ref:.3f} s", file=sys.stderr)
    # The engine's call: all six metrics at once, sharing one validation and one sort of the pixels.
    t_all, _ = timed(lambda: M.compute_metrics(scores, labels, maps, masks, metrics=M.METRIC_NAMES)["aupro"], repeats)
    covered = ("image AUROC", "pixel AUROC", "pixel F1-max", "AUPRO (exact)", "AUPRO per image (RD4AD)")
    t_ref = sum(r["reference_s"] for r in rows if r["metric"] in covered)
    rows.append({"metric": "compute_metrics (all 6)", "ours_s": t_all, "reference": "sum of the 5 rows it covers",
                 "reference_s": t_ref, "speedup": t_ref / t_all, "ours": None, "reference_value": None,
                 "abs_diff": None})
    return rows


def markdown(name: str, shape: tuple, rows: list[dict]) -> str:
    lines = [f"### {name}: {shape[0]} images of {shape[1]}x{shape[2]} ({shape[0] * shape[1] * shape[2]:,} pixels)",
             "", "| metric | ours (s) | reference | reference (s) | speed-up | \\|difference\\| |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        diff = "–" if r["abs_diff"] is None else f"{r['abs_diff']:.1e}"
        lines.append(f"| {r['metric']} | {r['ours_s']:.4f} | {r['reference']} | {r['reference_s']:.2f} | "
                     f"{r['speedup']:.0f}x | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of reconad per metric (median)")
    parser.add_argument("--ref-repeats", type=int, default=3, help="runs of the fast references (median)")
    parser.add_argument("--quick", action="store_true", help="small categories, for a smoke test")
    args = parser.parse_args()
    if "torch" in sys.modules:  # nothing here imports torch; if something did, keep its threads from competing
        sys.modules["torch"].set_num_threads(1)
    sizes = {"MVTec AD-sized": 100, "VisA-sized": 200} if not args.quick else {"quick": 8}
    report = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
              "sklearn": sklearn.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "repeats": args.repeats, "ref_repeats": args.ref_repeats, "categories": {}}
    tables = []
    for name, n in sizes.items():
        rows = bench_category(name, n, args.repeats, args.ref_repeats)
        shape = (n, 256, 256)
        report["categories"][name] = {"shape": list(shape), "rows": rows}
        tables.append(markdown(name, shape, rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print("\n\n".join(tables))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
