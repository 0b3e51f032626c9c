"""Tests of reconad.metrics against scikit-learn and against slow references written from the definitions."""

from __future__ import annotations

import bisect
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage
from skimage import measure
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, roc_auc_score

from reconad import metrics as M
from reconad.metrics_reference import official_compute_pro
from reconad.metrics_reference import official_per_image_aupro as official_per_image

FEW = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def hand_masks() -> np.ndarray:
    """Six 24x24 masks: separate regions, diagonal contact, borders, empty images, a single pixel, an L shape."""
    m = np.zeros((6, 24, 24), dtype=bool)
    m[0, 2:6, 3:9] = True  # two separate regions
    m[0, 14:20, 12:18] = True
    m[1, 5:7, 5:7] = True  # 2x2 and 3x3 squares touching only at a corner: one region under 8-connectivity
    m[1, 7:10, 7:10] = True
    m[2, 0:5, :] = True  # a band along the top border and a block on the right border
    m[2, 10:14, 20:24] = True
    # images 3 and 4 are normal
    m[5, 12, 12] = True  # a single pixel
    m[5, 2:10, 2] = True  # an L shape
    m[5, 9, 2:8] = True
    m[5, 20:24, 0:3] = True  # a block in the bottom-left corner
    return m


def random_maps(seed: int, masks: np.ndarray, quantize: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if quantize:
        maps = np.round(maps / quantize) * quantize  # many ties, also between normal and anomalous pixels
    return maps


# ----------------------------------------------------------------------------------------------------------------
# Slow references, written from the definitions
# ----------------------------------------------------------------------------------------------------------------


def mvtec_trapezoid(x, y, x_max):
    """The MVTec AD evaluation code's trapezoid with an upper limit, ported loop by loop."""
    x, y = list(map(float, x)), list(map(float, y))
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= x_max:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
    return area + correction


def regions_of(masks, connectivity=8):
    out = []
    for i, mask in enumerate(masks):
        lab = measure.label(mask, connectivity=2 if connectivity == 8 else 1)
        out += [(i, lab == r) for r in range(1, lab.max() + 1)]
    return out


def ref_overlap_auc(maps, regions, saturations, normal, limit, thresholds=None):
    """Loop over thresholds (every distinct score by default): y = mean over regions of min(TP / s, 1)."""
    ts = np.unique(maps)[::-1] if thresholds is None else thresholds
    fprs, ys = [0.0], [0.0]
    for t in ts:
        positive = maps >= t
        fprs.append(np.count_nonzero(positive & normal) / np.count_nonzero(normal))
        ys.append(np.mean([min(np.count_nonzero(positive[i] & r) / s, 1.0)
                           for (i, r), s in zip(regions, saturations, strict=True)]))
    fprs.append(1.0)
    ys.append(ys[-1])
    return mvtec_trapezoid(fprs, ys, limit) / limit


def ref_aupro(maps, masks, limit=0.3, connectivity=8, thresholds=None):
    regions = regions_of(masks, connectivity)
    return ref_overlap_auc(maps, regions, [r.sum() for _, r in regions], ~masks, limit, thresholds)


# ----------------------------------------------------------------------------------------------------------------
# AUROC and F1 against scikit-learn
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * 0.7, 1.0), int(rng.integers(0, 3)))  # coarse rounding: many ties
    assert M.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.image_auroc(scores.astype(np.float32), labels) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)


def test_pixel_auroc_equals_sklearn():
    masks = hand_masks()
    for quantize in (None, 0.05):
        maps = random_maps(1, masks, quantize).astype(np.float32)
        expected = roc_auc_score(masks.ravel(), maps.ravel())
        assert M.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
        assert M.pixel_auroc(maps[:, None], masks[:, None].astype(float)) == pytest.approx(expected, abs=1e-12)


def test_auroc_all_equal_scores_is_half():
    assert M.auroc(np.ones(10), [0, 1] * 5) == 0.5
    masks = hand_masks()
    assert M.pixel_auroc(np.zeros(masks.shape), masks) == 0.5


def test_mask_threshold_changes_binarisation():
    masks = np.zeros((2, 8, 8))
    masks[0, :4] = 0.3
    masks[1, :4] = 0.8
    maps = random_maps(2, masks > 0)
    assert M.pixel_auroc(maps, masks, mask_threshold=0.0) == pytest.approx(roc_auc_score(masks.ravel() > 0,
                                                                                        maps.ravel()))
    assert M.pixel_auroc(maps, masks, mask_threshold=0.5) == pytest.approx(roc_auc_score(masks.ravel() > 0.5,
                                                                                        maps.ravel()))
    assert M.image_labels_from_masks(masks).tolist() == [0, 1]
    assert M.image_labels_from_masks(masks, mask_threshold=0.0).tolist() == [1, 1]


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1[:-1]))


@pytest.mark.parametrize("seed", range(6))
def test_f1_max_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels, 1.0), int(rng.integers(0, 3)))
    f1, threshold = M.f1_max(scores, labels)
    assert f1 == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-9)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)
    at = M.accuracy_f1_at(scores, labels, threshold)
    assert at["f1"] == pytest.approx(f1, abs=1e-12)
    assert at["accuracy"] == pytest.approx(accuracy_score(labels, scores >= threshold), abs=1e-12)


def test_pixel_f1_max_equals_sklearn():
    masks = hand_masks()
    maps = random_maps(3, masks, 0.02)
    f1, threshold = M.pixel_f1_max(maps, masks)
    assert f1 == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-9)
    assert f1_score(masks.ravel(), maps.ravel() >= threshold) == pytest.approx(f1, abs=1e-12)


def test_accuracy_f1_at_counts_and_zero_division():
    out = M.accuracy_f1_at([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 1, 0)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == 1.0 and out["accuracy"] == 0.75
    none = M.accuracy_f1_at([0.1, 0.2], [0, 1], 0.9)
    assert none["f1"] == none["precision"] == none["recall"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Dataset AUPRO against the slow reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "quantize", "limit"), [(0, None, 0.3), (1, 0.05, 0.3), (2, 0.01, 0.05),
                                                         (3, 0.1, 1.0), (4, None, 0.17)])
def test_aupro_equals_reference(seed, quantize, limit):
    masks = hand_masks()
    maps = random_maps(seed, masks, quantize)
    expected = ref_aupro(maps, masks, limit)
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    fpr, pro, _ = M.pro_curve(maps, masks)
    assert M.curve_auc(fpr, pro, limit) == pytest.approx(expected, abs=1e-12)
    assert M.aupro(maps.astype(np.float32), masks, fpr_limit=limit) == pytest.approx(
        ref_aupro(maps.astype(np.float32), masks, limit), abs=1e-12)


def test_aupro_connectivity_4_equals_reference():
    masks = hand_masks()
    maps = random_maps(5, masks, 0.05)
    assert M.aupro(maps, masks, connectivity=4) == pytest.approx(ref_aupro(maps, masks, connectivity=4), abs=1e-12)


def test_aupro_num_thresholds_is_the_documented_approximation():
    masks = hand_masks()
    maps = random_maps(6, masks)
    thresholds = np.linspace(maps.max(), maps.min(), 50)
    approx = M.aupro(maps, masks, num_thresholds=50)
    assert approx == pytest.approx(ref_aupro(maps, masks, thresholds=thresholds), abs=1e-12)
    assert approx == pytest.approx(M.aupro(maps, masks), abs=0.05)


def test_diagonal_contact_is_one_region_under_8_connectivity():
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 2:4, 2:4] = True  # 4 pixels
    masks[0, 4:7, 4:7] = True  # 9 pixels, touching the first only at a corner
    maps = np.zeros(masks.shape)
    maps[0, 2:4, 2:4] = 1.0
    maps[0, 4:7, 4:7] = 0.5
    normal = np.flatnonzero(~masks.ravel())
    maps.ravel()[normal[: int(0.2 * normal.size)]] = 0.75  # 20 % of normal pixels between the two regions
    f = int(0.2 * normal.size) / normal.size
    # Curve: (0, p) -> (f, p) -> (f, 1) -> (1, 1), with p the PRO when only the 2x2 square is detected.
    for connectivity, p in ((8, 4 / 13), (4, 0.5)):
        expected = (f * p + (0.3 - f) * 1.0) / 0.3
        assert M.aupro(maps, masks, connectivity=connectivity) == pytest.approx(expected, abs=1e-12)
    assert len(regions_of(masks, 8)) == 1 and len(regions_of(masks, 4)) == 2


def test_aupro_all_equal_scores():
    masks = hand_masks()
    # One threshold: the curve is the diagonal from (0, 0) to (1, 1); its area up to 0.3 is 0.045.
    assert M.aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=1e-12)
    assert M.aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(ref_aupro(np.full(masks.shape, 0.7), masks))


def test_aupro_perfect_and_inverted_maps():
    masks = hand_masks()
    rng = np.random.default_rng(7)
    perfect = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.4 * rng.random(masks.shape))
    assert M.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)


@FEW
@given(seed=st.integers(0, 2**32 - 1), transform=st.sampled_from(["exp", "cube", "affine", "arctan"]),
       quantize=st.sampled_from([None, 0.05]))
def test_aupro_and_auroc_invariant_to_monotone_transforms(seed, transform, quantize):
    masks = hand_masks()
    maps = random_maps(seed, masks, quantize)
    f = {"exp": np.exp, "cube": lambda x: x**3 + x, "affine": lambda x: 3.0 * x - 7.0, "arctan": np.arctan}[transform]
    assert M.aupro(f(maps), masks) == pytest.approx(M.aupro(maps, masks), abs=1e-12)
    assert M.pixel_auroc(f(maps), masks) == pytest.approx(M.pixel_auroc(maps, masks), abs=1e-12)
    scores = maps.reshape(6, -1).max(axis=1)
    labels = [1, 1, 1, 0, 0, 1]
    assert M.auroc(f(scores), labels) == pytest.approx(M.auroc(scores, labels), abs=1e-12)


@FEW
@given(seed=st.integers(0, 2**32 - 1), limit=st.floats(0.01, 1.0), quantize=st.sampled_from([None, 0.1, 0.5]))
def test_aupro_is_within_unit_interval(seed, limit, quantize):
    masks = hand_masks()
    value = M.aupro(random_maps(seed, masks, quantize), masks, fpr_limit=limit)
    assert -1e-12 <= value <= 1 + 1e-12


# ----------------------------------------------------------------------------------------------------------------
# RD4AD per-image AUPRO against the port of the official compute_pro
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "quantize"), [(0, None), (1, 0.005), (2, 0.05)])
def test_aupro_per_image_equals_official(seed, quantize):
    masks = hand_masks()
    maps = random_maps(seed, masks, quantize)  # 0.005 puts pixel values exactly on the threshold grid
    labels = masks.reshape(6, -1).any(axis=1)
    assert M.aupro_per_image(maps, masks) == pytest.approx(official_per_image(maps, masks, labels), abs=1e-12)


def test_aupro_per_image_ties_with_thresholds_follow_official():
    # Values k * 0.005 on [0, 1] coincide bit for bit with the thresholds arange(0, 1, 0.005): this checks the
    # strict `value > th` binarisation. In image 0, exactly 168 of 560 normal pixels (FPR = 0.3 exactly) lie at
    # 0.5, which checks the strict `fpr < 0.3` cut.
    rng = np.random.default_rng(14)
    masks = hand_masks()[:3]
    masks[0] = False
    masks[0, 10:14, 10:14] = True
    maps = rng.integers(0, 201, masks.shape) * 0.005
    maps[:, 0, 0], maps[:, 0, 1] = 0.0, 1.0
    normal = np.flatnonzero(~masks[0].ravel())
    maps[0].ravel()[normal] = 0.0
    maps[0].ravel()[normal[2:170]] = 0.5
    maps[0].ravel()[normal[1]] = 1.0
    maps[0, 10:14, 10:14] = np.arange(16).reshape(4, 4) * 0.05 + 0.2
    labels = masks.reshape(3, -1).any(axis=1)
    assert M.aupro_per_image(maps, masks) == pytest.approx(official_per_image(maps, masks, labels), abs=1e-12)


def test_aupro_per_image_float32_equals_official():
    masks = hand_masks()
    maps = random_maps(4, masks).astype(np.float32)
    labels = masks.reshape(6, -1).any(axis=1)
    assert M.aupro_per_image(maps, masks, labels=labels) == pytest.approx(official_per_image(maps, masks, labels),
                                                                          abs=1e-12)


@FEW
@given(seed=st.integers(0, 2**32 - 1), power=st.integers(-4, 4))
def test_aupro_per_image_invariant_to_power_of_two_scaling(seed, power):
    masks = hand_masks()
    maps = random_maps(seed, masks)
    assert M.aupro_per_image(maps * 2.0**power, masks) == M.aupro_per_image(maps, masks)


def test_aupro_per_image_not_invariant_to_nonlinear_transforms():
    masks = hand_masks()
    maps = random_maps(8, masks)
    assert M.aupro_per_image(maps**4, masks) != pytest.approx(M.aupro_per_image(maps, masks), abs=1e-6)
    assert M.aupro(maps**4, masks) == pytest.approx(M.aupro(maps, masks), abs=1e-12)


def one_image(normal_value, anomalous_value=0.0):
    mask = np.zeros((1, 24, 24), dtype=bool)
    mask[0, 10:14, 10:14] = True
    amap = np.where(mask, anomalous_value, normal_value)
    return amap, mask


def test_degenerate_constant_map():
    amap, mask = one_image(0.5, 0.5)
    with pytest.raises(ValueError, match="arange"), np.errstate(invalid="ignore"):
        official_compute_pro(mask.astype(int), amap)
    with pytest.raises(ValueError, match="image 0: its map is constant"):
        M.aupro_per_image(amap, mask)
    assert np.isnan(M.aupro_per_image(amap, mask, degenerate="nan"))
    with pytest.raises(ValueError, match="every anomalous image is degenerate"):
        M.aupro_per_image(amap, mask, degenerate="skip")


def test_degenerate_single_retained_point():
    # 20 % of normal pixels at 1.0, 80 % between the last two thresholds (0.99, 0.995): only the last has FPR < 0.3.
    amap, mask = one_image(0.993)
    normal = np.flatnonzero(~mask.ravel())
    amap.ravel()[normal[: normal.size // 5]] = 1.0
    with pytest.raises(ValueError, match="At least 2 points"):
        official_compute_pro(mask.astype(int), amap)
    with pytest.raises(ValueError, match=r"only 1 threshold\(s\)"):
        M.aupro_per_image(amap, mask)


def test_degenerate_all_retained_fpr_zero():
    amap, mask = one_image(0.0, 1.0)  # a perfect map whose normal pixels all equal the minimum
    with np.errstate(invalid="ignore"):
        assert np.isnan(official_compute_pro(mask.astype(int), amap))
    with pytest.raises(ValueError, match="divides 0 by 0"):
        M.aupro_per_image(amap, mask)
    assert np.isnan(M.aupro_per_image(amap, mask, degenerate="nan"))


def test_degenerate_masks_and_skip_policy():
    masks = hand_masks()
    maps = random_maps(9, masks)
    full = np.ones((1, 24, 24), dtype=bool)
    with pytest.raises(AssertionError):
        official_compute_pro(full.astype(int), maps[:1])
    with pytest.raises(ValueError, match="no normal pixel"):
        M.aupro_per_image(maps[:1], full)
    labels = [1, 1, 1, 1, 0, 1]  # image 3 is labelled anomalous but its mask is empty
    with pytest.raises(ValueError, match="image 3: its mask has no anomalous pixel"):
        M.aupro_per_image(maps, masks, labels=labels)
    skipped = M.aupro_per_image(maps, masks, labels=labels, degenerate="skip")
    assert skipped == pytest.approx(M.aupro_per_image(maps, masks), abs=1e-15)


def test_perfect_map_with_varying_background_gives_one_per_image():
    masks = hand_masks()
    rng = np.random.default_rng(10)
    perfect = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.4 * rng.random(masks.shape))
    assert M.aupro_per_image(perfect, masks) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# sPRO
# ----------------------------------------------------------------------------------------------------------------


def loco_case(seed):
    masks = hand_masks()
    maps = random_maps(seed, masks, 0.02)
    regions = [[] for _ in range(6)]
    saturations = []
    for k, (i, r) in enumerate(regions_of(masks)):
        s = float(max(1, int(r.sum() * (0.3 + 0.2 * (k % 3)))))  # below, at and above half the area
        regions[i].append((r, s))
        saturations.append(s)
    overlap = np.zeros((24, 24), dtype=bool)  # a second channel of image 0 that overlaps its first region
    overlap[4:9, 6:12] = True
    regions[0].append((overlap, 7.0))
    return maps, regions


def flat_regions(regions):
    pairs = [((i, m.astype(bool)), s) for i, rs in enumerate(regions) for m, s in rs]
    return [p for p, _ in pairs], [s for _, s in pairs]


@pytest.mark.parametrize(("seed", "fpr_pixels", "limit"), [(0, "all", 0.3), (1, "good", 0.3), (2, "all", 0.05),
                                                           (3, "all", 1.0)])
def test_spro_equals_reference(seed, fpr_pixels, limit):
    maps, regions = loco_case(seed)
    union = np.zeros(maps.shape, dtype=bool)
    for i, rs in enumerate(regions):
        for m, _ in rs:
            union[i] |= m
    normal = ~union if fpr_pixels == "all" else np.broadcast_to(~union.any(axis=(1, 2))[:, None, None], maps.shape)
    flat, sats = flat_regions(regions)
    expected = ref_overlap_auc(maps, flat, sats, normal, limit)
    assert M.spro_auc(maps, regions, fpr_limit=limit, fpr_pixels=fpr_pixels) == pytest.approx(expected, abs=1e-12)
    fpr, spro, _ = M.spro_curve(maps, regions, fpr_pixels=fpr_pixels)
    assert M.curve_auc(fpr, spro, limit) == pytest.approx(expected, abs=1e-12)


def test_spro_with_full_saturation_is_aupro():
    masks = hand_masks()
    maps = random_maps(11, masks)
    regions = [[] for _ in range(6)]
    for i, r in regions_of(masks):
        regions[i].append((r, float(r.sum())))
    assert M.spro_auc(maps, regions) == pytest.approx(M.aupro(maps, masks), abs=1e-12)
    assert M.spro_auc(maps, regions, num_thresholds=40) == pytest.approx(M.aupro(maps, masks, num_thresholds=40),
                                                                         abs=1e-12)


def test_loco_config_and_regions(tmp_path):
    config = [
        {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
        {"defect_name": "extra", "pixel_value": 100, "saturation_threshold": 20, "relative_saturation": False},
    ]
    (tmp_path / "defects_config.json").write_text(json.dumps(config))
    defects = M.load_defects_config(tmp_path / "defects_config.json")
    assert defects == {255: (0.5, True), 100: (20.0, False)}
    a = np.zeros((16, 16), dtype=np.uint8)
    a[0:3, 0:5] = 255  # area 15: relative saturation int(0.5 * 15) = 7
    b = np.zeros((16, 16), dtype=np.uint8)
    b[10:13, 10:14] = 100  # area 12 < 20: absolute saturation is capped at the area
    folder = tmp_path / "ground_truth" / "logical_anomalies" / "000"
    folder.mkdir(parents=True)
    Image.fromarray(a).save(folder / "000.png")
    Image.fromarray(b).save(folder / "001.png")
    regions = M.load_loco_regions(folder, defects)
    assert [s for _, s in regions] == [7.0, 12.0]
    assert regions[0][0].sum() == 15 and regions[1][0].dtype == bool
    assert [s for _, s in M.loco_regions([a, b], defects, area_scale=0.25)] == [7.0, 5.0]
    with pytest.raises(ValueError, match="not in the defects config"):
        M.loco_regions([np.full((4, 4), 7, dtype=np.uint8)], defects)


def test_spro_input_errors():
    maps, regions = loco_case(0)
    with pytest.raises(ValueError, match="6 entries"):
        M.spro_auc(maps[:5], regions)
    with pytest.raises(ValueError, match="positive saturation"):
        M.spro_auc(maps, [[(regions[0][0][0], 0.0)]] + regions[1:])
    with pytest.raises(ValueError, match="empty region"):
        M.spro_auc(maps, [[(np.zeros((24, 24)), 3.0)]] + regions[1:])
    with pytest.raises(ValueError, match="at least one ground-truth region"):
        M.spro_auc(maps, [[] for _ in range(6)])
    with pytest.raises(ValueError, match="fpr_pixels"):
        M.spro_auc(maps, regions, fpr_pixels="normal")


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_inputs_are_named_and_counted():
    masks = hand_masks()
    maps = random_maps(0, masks)
    maps[0, 0, :3] = [np.nan, np.inf, -np.inf]
    for fn in (M.aupro, M.aupro_per_image, M.pixel_auroc):
        with pytest.raises(ValueError, match=r"maps contains 3 non-finite value\(s\)"):
            fn(maps, masks)
    with pytest.raises(ValueError, match=r"scores contains 1 non-finite"):
        M.auroc([0.1, np.nan, 0.3], [0, 1, 1])
    bad = np.zeros((4, 4, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="maps contains 1 non-finite"):
        M.spro_auc(bad, [[]] * 4)


def test_empty_inputs():
    with pytest.raises(ValueError, match="empty"):
        M.auroc([], [])
    with pytest.raises(ValueError, match="empty"):
        M.aupro(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))
    with pytest.raises(ValueError, match="empty"):
        M.compute_metrics([], [])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 1, 8, 9\)"):
        M.aupro(np.zeros((2, 8, 8)), np.zeros((2, 1, 8, 9)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        M.auroc([0.1, 0.2], [0, 1, 1])


def test_single_class_and_missing_regions():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        M.auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        M.pixel_auroc(np.ones((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="at least one anomalous region"):
        M.aupro(np.ones((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="only 0"):
        M.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.ones((2, 4, 4)), np.ones((2, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="connectivity"):
        M.aupro(np.ones((2, 4, 4)), np.ones((2, 4, 4)), connectivity=6)


# ----------------------------------------------------------------------------------------------------------------
# compute_metrics, tables, imports
# ----------------------------------------------------------------------------------------------------------------


def test_compute_metrics_matches_the_functions():
    masks = hand_masks()
    maps = random_maps(12, masks, 0.01).astype(np.float32)
    scores = maps.reshape(6, -1).max(axis=1)
    labels = masks.reshape(6, -1).any(axis=1).astype(int)
    out = M.compute_metrics(scores, labels, maps[:, None], masks[:, None].astype(np.float32),
                            metrics=M.METRIC_NAMES)
    assert list(out) == list(M.METRIC_NAMES)
    assert out["image_auroc"] == M.auroc(scores, labels)
    assert out["pixel_auroc"] == M.pixel_auroc(maps, masks)
    assert out["aupro"] == M.aupro(maps, masks)
    assert out["aupro_per_image"] == M.aupro_per_image(maps, masks, labels=labels)
    assert out["image_f1_max"] == M.f1_max(scores, labels)[0]
    assert out["pixel_f1_max"] == M.pixel_f1_max(maps, masks)[0]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    image_only = M.compute_metrics(scores, labels, metrics=M.DEFAULT_METRICS)
    assert list(image_only) == ["image_auroc"]
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(scores, labels, metrics=("image_auroc", "iou"))
    with pytest.raises(ValueError, match="6 images"):
        M.compute_metrics(scores[:5], labels[:5], maps, masks)


def test_torch_tensors_are_accepted():
    import torch

    masks = hand_masks()
    maps = random_maps(13, masks)
    scores = maps.reshape(6, -1).max(axis=1)
    labels = masks.reshape(6, -1).any(axis=1).astype(int)
    expected = M.compute_metrics(scores, labels, maps, masks)
    got = M.compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels),
                            torch.from_numpy(maps).requires_grad_(True), torch.from_numpy(masks))
    assert got == expected
    assert M.auroc(torch.tensor([0.1, 0.9], dtype=torch.bfloat16), torch.tensor([0, 1])) == 1.0


def test_import_has_no_side_effects():
    code = "import sys, reconad.metrics; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_results_table_and_markdown():
    per = {c: {"image_auroc": 0.9 + 0.001 * i, "aupro": 0.8} for i, c in enumerate(
        M.MVTEC_AD_GROUPS["textures"] + M.MVTEC_AD_GROUPS["objects"])}
    rows = M.results_table(per, M.MVTEC_AD_GROUPS)
    names = [r["category"] for r in rows]
    assert names[-3:] == ["mean (textures)", "mean (objects)", "mean"]
    assert rows[-3]["image_auroc"] == pytest.approx(0.902)
    assert rows[-1]["image_auroc"] == pytest.approx(0.907)
    text = M.to_markdown(rows)
    assert text.splitlines()[0] == "| category | image_auroc | aupro |"
    assert "| carpet | 90.0 | 80.0 |" in text
    assert "| mean | 90.7 | 80.0 |" in text
    partial = M.results_table({"carpet": {"aupro": 0.5}, "bottle": {"image_auroc": 0.75}}, M.MVTEC_AD_GROUPS)
    assert [r["category"] for r in partial] == ["carpet", "bottle", "mean"]  # incomplete groups are left out
    assert np.isnan(partial[-1]["aupro"])
    assert "| mean | – | – |" in M.to_markdown(partial, columns=["aupro", "image_auroc"])
    assert "| bottle | 0.750 |" in M.to_markdown(partial, columns=["image_auroc"], scale=1.0, decimals=3)


def test_connected_component_labelling_matches_scipy_full_structure():
    masks = hand_masks()
    for mask in masks:
        assert measure.label(mask).max() == ndimage.label(mask, structure=np.ones((3, 3)))[1]
