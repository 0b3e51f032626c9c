"""Figures: what each figure type draws (panels, lines, colours, markers, legends), checked on matplotlib objects."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from sklearn.metrics import auc

from reconad import plots, visualize
from reconad.metrics import curve_auc
from reconad.plots import figures as pf
from reconad.plots import logs, style
from reconad.plots import runs as pr

from .conftest import write_tiny_mvtec


def _close(fig):
    style.pyplot().close(fig)


def recontrast_run(run_dir: Path, seed: int = 0, steps: int = 12, accumulate: int = 1, evals=(4, 8, 12),
                   epochs: int | None = None, step_key: bool = True, calibrated: bool = True) -> Path:
    """A ReContrast-like run folder: 2 streams × 3 levels of loss and diversity, evaluations, curves, scores."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng, entries = np.random.default_rng(seed), []
    for s in range(1, steps + 1):
        e = {"batch": s * accumulate, "epoch": (s - 1) // 4, "kind": "train", "lr": [2e-3, 1e-5], "loss": 3 / s}
        if step_key:
            e["step"] = s
        for stream in ("frozen", "trainable"):
            e[f"loss/{stream}"] = 1.5 / s
            for lv in (1, 2, 3):
                e[f"loss/{stream}/l{lv}"] = 0.5 * lv / s
                e[f"diversity/{stream}/l{lv}"] = 0.2 - 0.01 * lv - 0.002 * s + rng.normal(0, 1e-3)
        entries.append(e)
    for s in evals:
        entries.append({"batch": s * accumulate, "epoch": (s - 1) // 4, "kind": "eval",
                        "image_auroc": 0.6 + 0.02 * s + 0.01 * seed, "aupro": 0.5 + 0.01 * s})
    entries.append({"batches": steps * accumulate, "kind": "final", "image_auroc": 0.6 + 0.02 * steps + 0.01 * seed,
                    "aupro": 0.5 + 0.01 * steps})
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    train = {"accumulate": accumulate, "seed": seed, "epochs": epochs, "iterations": None if epochs else steps}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": "recontrast", "data": {"category": "stripes"},
                                                         "train": train, "eval": {"fpr_limit": 0.3}}))
    fpr = np.linspace(0, 1, 21)
    (run_dir / "curves.json").write_text(json.dumps({"image_roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()},
                                                     "pro": {"fpr": fpr.tolist(), "pro": (fpr ** 0.5).tolist()}}))
    scores = np.concatenate([rng.normal(0, 1, 10), rng.normal(3, 1, 10)])
    labels = [0] * 10 + [1] * 10
    (run_dir / "test_scores.csv").write_text("path,defect,label,score\n" + "".join(
        f"{i}.png,{'good' if lab == 0 else 'blob'},{lab},{s}\n" for i, (lab, s) in enumerate(zip(labels, scores))))
    if calibrated:
        (run_dir / "calibration.json").write_text(json.dumps({
            "image_threshold": 2.0, "score_quantiles": {"0.5": 0.5}, "pixel_threshold": 0.6,
            "pixel_quantiles": {"0.5": 0.1}}))
    return run_dir


# -- style ----------------------------------------------------------------------------------------------------
def test_style_colours_levels_and_labels():
    colors = style.run_colors(["full", "config_a", "rdpp", "full"])
    assert list(colors) == ["full", "config_a", "rdpp"] and len(set(colors.values())) == 3
    assert colors == style.run_colors(["full", "config_a", "rdpp"])  # deterministic: study order
    assert colors["full"] == style.OKABE_ITO[0] and len(set(style.PALETTE)) == len(style.PALETTE)
    assert style.level_style("loss/frozen/l2") == style.level_style("l2") != style.level_style("l1")
    assert style.level_style("")[1] > style.level_style("l1")[1]  # the total is the bold line
    assert style.metric_label("aupro", 0.3) == "AUPRO@0.3 (%)" and style.metric_label("image_auroc") == "I-AUROC (%)"
    assert "learning rate" in style.quantity_label("lr") and "diversity" in style.quantity_label("diversity/frozen")


# -- logs -----------------------------------------------------------------------------------------------------
def test_log_series_use_optimiser_steps_and_group_levels(tmp_path):
    run = recontrast_run(tmp_path / "r", accumulate=2, step_key=False)  # old log: no "step", RD++-like accumulate
    files = pr.load_run(run)
    assert files.schedule.accumulate == 2
    x, y = files.train["loss"][""]
    assert x.tolist() == list(range(1, 13)) and y[0] == 3.0  # batch 2k -> step k, not batch
    assert set(files.train["loss/frozen"]) == {"", "l1", "l2", "l3"}
    assert set(files.train["diversity/trainable"]) == {"l1", "l2", "l3"}
    assert set(files.train["lr"]) == {"group 0", "group 1"}
    steps, values = files.evals["image_auroc"]
    assert steps.tolist() == [4, 8, 12] and values == pytest.approx([68, 76, 84])  # final replaces the eval at 12
    assert logs.panel_and_level("loss/frozen/l2") == ("loss/frozen", "l2")
    assert logs.panel_and_level("distill") == ("distill", "")


def test_epoch_recipe_gets_its_epoch_length(tmp_path):
    files = pr.load_run(recontrast_run(tmp_path / "r", epochs=3))
    assert files.schedule.steps_per_epoch == 4.0  # 12 steps, last entry in epoch 2 of 3
    assert pr.load_run(recontrast_run(tmp_path / "i")).schedule.steps_per_epoch is None


# -- figure types -------------------------------------------------------------------------------------------
def _lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")]


def test_training_small_multiples_one_panel_per_group_and_a_style_per_level(tmp_path):
    files = pr.load_run(recontrast_run(tmp_path / "r"))
    group = {"full": [files]}
    fig = pf.training_panels(pr.training_panels_data(group), style.run_colors(["full"]), "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "loss/frozen", "loss/trainable", "lr"]  # no diversity: it has its own figure
    frozen = next(ax for ax in fig.axes if ax.get_title() == "loss/frozen")
    lines = _lines(frozen)
    assert [ln.get_label() for ln in lines] == ["total", "l1", "l2", "l3"]
    assert len({str(ln.get_linestyle()) for ln in lines[1:]}) == 3  # one line style per level
    assert {to_hex(ln.get_color()) for ln in lines} == {style.OKABE_ITO[0].lower()}  # one colour: one run
    assert lines[0].get_linewidth() > lines[1].get_linewidth()
    lr = next(ax for ax in fig.axes if ax.get_title() == "lr")
    assert lr.get_yscale() == "log" and lr.get_xlabel() == "optimiser step"
    _close(fig)


def test_study_curves_mean_and_band_over_seeds_and_distinct_run_colours(tmp_path):
    groups = {"full": [pr.load_run(recontrast_run(tmp_path / f"a{s}", seed=s)) for s in (0, 1)],
              "config_a": [pr.load_run(recontrast_run(tmp_path / "b", seed=5))]}
    colors = style.run_colors(groups)
    fig = pf.evaluation_figure(pr.eval_data(groups), colors, "eval")
    ax = next(a for a in fig.axes if a.get_title() == "I-AUROC")
    lines = {ln.get_label(): ln for ln in _lines(ax)}
    assert set(lines) == {"full", "config_a"}
    assert to_hex(lines["full"].get_color()) != to_hex(lines["config_a"].get_color())
    assert lines["full"].get_ydata() == pytest.approx([68.5, 76.5, 84.5])  # mean of seeds 0 and 1
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # the two-seed run has a band, the one-seed run none
    _close(fig)
    fig = pf.training_panels(pr.training_panels_data(groups), colors, "train", totals_only=True)
    frozen = next(a for a in fig.axes if a.get_title() == "loss/frozen")
    assert [ln.get_label() for ln in _lines(frozen)] == ["full · total", "config_a · total"]
    _close(fig)


def test_a_single_evaluation_is_a_labelled_marker_not_a_line(tmp_path):
    files = pr.load_run(recontrast_run(tmp_path / "r", evals=()))  # only the final evaluation
    fig = pf.evaluation_figure(pr.eval_data({"r": [files]}), style.run_colors(["r"]), "one eval")
    (ax,) = fig.axes
    assert all(len(ln.get_xdata()) == 1 and ln.get_linestyle() == "None" for ln in ax.get_lines())
    assert len(ax.get_lines()) == 2 and ax.get_xlabel() == "value (%)"
    assert sorted(t.get_text() for t in ax.texts) == ["62.0", "84.0"]  # the values are written beside the dots
    assert [t.get_text() for t in ax.get_yticklabels()] == ["I-AUROC (%)", "AUPRO@0.3 (%)"]
    _close(fig)
    one_point = {"m": {"r": [{"": (np.array([5.0]), np.array([70.0]))}]}, "n": {"r": [
        {"": (np.array([1.0, 5.0]), np.array([60.0, 70.0]))}]}}
    two_runs = {"r": [pr.load_run(recontrast_run(tmp_path / "r", evals=()))],
                "q": [pr.load_run(recontrast_run(tmp_path / f"q{s}", seed=s, evals=())) for s in (1, 2)]}
    fig = pf.evaluation_figure(pr.eval_data(two_runs), style.run_colors(two_runs), "two runs")
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 4 and all(ln.get_linestyle() == "None" for ln in ax.get_lines())
    assert "85.5 ± 0.7" in [t.get_text() for t in ax.texts]  # mean ± std over q's two seeds
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["r", "q"]
    _close(fig)
    fig = pf.evaluation_figure(one_point, {"r": "#000000"}, "mixed")  # one metric with one point, one with two
    single = next(a for a in fig.axes if a.get_title() == "m").get_lines()
    assert len(single) == 1 and single[0].get_linestyle() == "None" and single[0].get_marker() == "o"
    _close(fig)


def test_roc_and_pro_panels_carry_auc_and_the_fpr_limit(tmp_path):
    files = pr.load_run(recontrast_run(tmp_path / "r"))
    fpr, tpr = np.array(files.curves["image_roc"]["fpr"]), np.array(files.curves["image_roc"]["tpr"])
    fig = pf.curve_panels("image_roc", {"stripes": {"r": [files.curves]}}, {"r": "#0072B2"})
    (label,) = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert label == f"r: AUROC {100 * auc(fpr, tpr):.1f}%"
    _close(fig)
    fig = pf.curve_panels("pro", {"stripes": {"r": [files.curves]}, "empty": {"r": [{}]}}, {"r": "#0072B2"}, 0.3)
    assert len(fig.axes) == 1  # a category without a curve gets no panel
    ax = fig.axes[0]
    expected = 100 * curve_auc(fpr, np.array(files.curves["pro"]["pro"]), 0.3)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"r: AUPRO@0.3 {expected:.1f}%"]
    assert any(ln.get_xdata()[0] == 0.3 and ln.get_linestyle() == "--" for ln in ax.get_lines())  # limit marked
    assert any("FPR limit 0.3" in t.get_text() for t in ax.texts)
    _close(fig)


def test_score_histogram_in_calibrated_units_with_the_threshold(tmp_path):
    run = recontrast_run(tmp_path / "r")
    hist = pr.histogram_data(run)
    scores, labels = pr.test_scores(run)
    assert hist["threshold"] == 1.0 and hist["normal"] == pytest.approx((scores[labels == 0] - 0.5) / 1.5)
    fig = pf.score_histograms({"stripes": hist}, "#D55E00", "scores")
    (ax,) = fig.axes
    assert [ln.get_xdata()[0] for ln in ax.get_lines()] == [1.0]
    assert sum(p.get_height() for p in ax.patches) == 20  # every test image counted once
    assert "calibrated" in ax.get_xlabel() and "(s − median) / (threshold − median)" in fig.get_suptitle()
    _close(fig)
    (run / "calibration.json").unlink()
    assert pr.histogram_data(run)["threshold"] is None and pr.histogram_data(run)["units"] == "raw model units"


def test_recontrast_fig5_auroc_and_encoder_diversity_per_level(tmp_path):
    groups = {"full": [pr.load_run(recontrast_run(tmp_path / "f"))],
              "config_a": [pr.load_run(recontrast_run(tmp_path / "a", seed=3))]}
    auroc, diversity = pr.fig5_data(groups)
    assert list(diversity) == ["l1", "l2", "l3"] and set(auroc) == {"full", "config_a"}
    fig = pf.recontrast_fig5(auroc, diversity, style.run_colors(groups), "fig5")
    assert [ax.get_title() for ax in fig.axes] == ["(a) I-AUROC over training", "(b) encoder diversity, l1",
                                                   "(b) encoder diversity, l2", "(b) encoder diversity, l3"]
    for ax in fig.axes:
        assert len({to_hex(ln.get_color()) for ln in _lines(ax)}) == 2
    trainable = groups["full"][0].train["diversity/trainable"]["l2"][1]
    assert _lines(fig.axes[2])[0].get_ydata() == pytest.approx(trainable)  # the encoder being trained
    _close(fig)


def test_plot_run_writes_png_and_svg_of_every_figure(tmp_path):
    run = recontrast_run(tmp_path / "r", epochs=3)
    written = plots.plot_run(run)
    names = sorted(p.stem for p in written)
    assert names == ["diversity", "evaluation", "image_roc", "pro", "score_histogram", "training"]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        root = ET.parse(png.with_suffix(".svg")).getroot()
        assert root.tag.endswith("svg") and len(list(root.iter())) > 50  # a real vector drawing
    svg = (run / "plots" / "training.svg").read_text()
    assert "optimiser step" in svg and "epoch" in svg  # text kept as text (svg.fonttype none)
    assert plots.plot_run(tmp_path / "empty") == []


# -- anomaly example panels -----------------------------------------------------------------------------------
def test_map_upsampled_to_the_original_image_and_cropped_region():
    amap = np.arange(16, dtype=np.float32).reshape(4, 4)
    full = visualize.upsample_to_original(amap, (40, 60), image_size=4)
    assert full.shape == (40, 60) and np.isfinite(full).all()
    assert full[0, 0] == pytest.approx(0.0) and full[-1, -1] == pytest.approx(15.0)
    cropped = visualize.upsample_to_original(amap, (40, 40), image_size=8, crop_size=4)
    assert np.isnan(cropped[:10]).all() and np.isnan(cropped[:, 30:]).all() and np.isfinite(cropped[10:30, 10:30]).all()
    units = visualize.pixel_units({"pixel_threshold": 0.6, "pixel_quantiles": {"0.5": 0.1}})
    assert units(np.array([0.1, 0.6, 1.1])) == pytest.approx([0.0, 1.0, 2.0]) and units.calibrated
    assert not visualize.pixel_units(None).calibrated and "raw" in visualize.pixel_units(None).label


def test_example_panels_at_model_and_original_size(tmp_path):
    from reconad.config import DataConfig
    from reconad.data import build_datasets

    root = write_tiny_mvtec(tmp_path / "data", size=48)
    _, _, test = build_datasets(DataConfig(root=str(root), category="stripes", image_size=32))
    masks = np.stack([test[i]["mask"][0].numpy() for i in range(len(test))])
    maps = (masks * 0.8 + np.random.default_rng(0).uniform(0, 0.3, masks.shape)).astype(np.float32)
    out = SimpleNamespace(maps=maps, scores=maps.max((1, 2)), masks=masks.astype(np.uint8),
                          paths=[str(r.path) for r in test.records], defects=[r.defect for r in test.records])
    calibration = {"pixel_threshold": 0.5, "pixel_quantiles": {"0.5": 0.15}}
    written = visualize.write_examples(out, test, tmp_path / "examples", 2, calibration)
    assert [p.name for p in written] == ["0000_blob_000_score1.0985.png", "0004_good_001_score0.2993.png"]
    assert all(p.is_file() and p.with_suffix(".svg").is_file() for p in written)  # the score's dot is kept
    anomalous = next(i for i in range(len(test)) if test.records[i].label == 1)
    original = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out.paths[anomalous]))
    o_map = visualize.upsample_to_original(maps[anomalous], original.shape[:2], 32)
    fig = visualize.example_figure(test[anomalous]["image"].permute(1, 2, 0).numpy(), maps[anomalous],
                                   masks[anomalous], units=visualize.pixel_units(calibration), vrange=(0, 4),
                                   title="x", original=(original / 255.0, o_map,
                                                        visualize._original_mask(test, anomalous, (48, 48))))
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 6  # 2 sizes × (input, map, overlay)
    assert [im.get_array().shape[:2] for ax in images for im in ax.images[:1]] == [(32, 32)] * 3 + [(48, 48)] * 3
    colorbars = [ax for ax in fig.axes if "normalised" in ax.get_ylabel()]
    assert len(colorbars) == 2
    overlay = images[5]
    assert len(overlay.collections) == 2  # ground-truth and predicted-region contours
    assert "original, 48×48 px" in images[3].get_title() and "model input, 32×32 px" in images[0].get_title()
    assert math.isclose(images[4].images[0].get_array().max(), (o_map.max() - 0.15) / 0.35, rel_tol=1e-5)
    _close(fig)
