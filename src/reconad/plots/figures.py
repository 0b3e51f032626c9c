"""The figure types, each drawn in the house style (:mod:`.style`) and returned as a matplotlib figure.

* :func:`training_panels` — loss terms and other logged quantities as small multiples (a panel per quantity or
  group, a colour per run, a line style per level), mean over seeds with a min–max band.
* :func:`evaluation_figure` — metrics over training; with a single evaluation a labelled dot chart (no line).
* :func:`curve_panels` — ROC and PRO curves with the AUC (AUPRO up to the FPR limit) in the legend, limit marked.
* :func:`score_histograms` — test scores of normal vs anomalous images, with the calibrated threshold.
* :func:`recontrast_fig5` — ReContrast's Fig. 5: (a) I-AUROC over training, (b) encoder feature diversity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import style
from .logs import Series, mean_band

RunSeeds = Mapping[str, Sequence[Series]]  # run -> one Series (level -> (x, y)) per seed


def _grid(n: int, cols: int = 3, width: float = 3.6, height: float = 2.7, sharex: bool = False):
    plt = style.pyplot()
    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 6.0), height * rows + 0.8), squeeze=False,
                             layout="constrained", sharex=sharex)
    for ax in axes.flat[n:]:
        ax.remove()  # no empty panel
    return fig, list(axes.flat[:n])


def _figure_legend(fig, axes, ncol: int = 4) -> None:
    """One legend for all panels, below them (constrained layout makes room)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(ncol, len(handles)))


def _seed_note(groups: Mapping[str, RunSeeds]) -> str:
    several = any(len(seeds) > 1 for runs in groups.values() for seeds in runs.values())
    return "line: mean over seeds · band: min–max over seeds" if several else "one seed per run"


def _epoch_axis(ax, steps_per_epoch: float | None) -> None:
    """Integer optimiser steps below; a secondary x axis in epochs above (recipes that count epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps_per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        top.set_xlabel(style.step_label(epochs=True))


def _draw_mean(ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], color: str, level: str, label: str) -> None:
    """Mean over seeds, min–max band when several; one point is a marker, never a line."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return
    x, mean, band = mean_band(curves)
    linestyle, width = style.level_style(level)
    if len(x) == 1:
        ax.plot(x, mean, linestyle="none", marker="o", markersize=6, color=color, label=label)
        return
    ax.plot(x, mean, color=color, linestyle=linestyle, linewidth=width, label=label)
    if len(curves) > 1:
        ax.fill_between(x, band[0], band[1], color=color, alpha=0.18, linewidth=0)


def _panel_levels(runs: RunSeeds, totals_only: bool) -> list[str]:
    levels = list(dict.fromkeys(lv for seeds in runs.values() for s in seeds for lv in s))
    if totals_only and "" in levels:
        return [""]
    return levels


def _panel_order(name: str) -> tuple[int, str]:
    """The total loss first, then its terms, other diagnostics, the learning rate last."""
    family = name.split("/", 1)[0]
    return (0 if name == "loss" else 1 if family == "loss" else 3 if family == "lr" else 2), name


def training_panels(panels: Mapping[str, RunSeeds], colors: Mapping[str, str], title: str,
                    steps_per_epoch: float | None = None, totals_only: bool = False):
    """Small multiples of logged training quantities against optimiser steps.

    Args:
        panels: panel name (``loss``, ``loss/frozen``, ``diversity/trainable``, ``lr``) -> run -> Series per seed.
        totals_only: Draw only a panel's total (level ``""``) where it has one: keeps many-run figures readable.
    """
    plt = style.pyplot()
    names = sorted((p for p in panels if any(len(s) for seeds in panels[p].values() for s in seeds)), key=_panel_order)
    with plt.rc_context(style.rc()):
        fig, axes = _grid(len(names))
        several_runs = len(colors) > 1
        for ax, name in zip(axes, names):
            runs = panels[name]
            for run, seeds in runs.items():
                for level in _panel_levels(runs, totals_only):
                    label = " · ".join(x for x in (run if several_runs else "", level or "total") if x)
                    _draw_mean(ax, [s[level] for s in seeds if level in s], colors[run], level, label)
            if name == "lr" and all((y > 0).all() for seeds in runs.values() for s in seeds for _, y in s.values()):
                ax.set_yscale("log")
            ax.set(title=name, xlabel=style.step_label(), ylabel=style.quantity_label(name))
            _epoch_axis(ax, steps_per_epoch)
        _figure_legend(fig, axes)
        levels = any(lv for runs in panels.values() for seeds in runs.values() for s in seeds for lv in s
                     if not lv.startswith("group"))
        note = _seed_note(panels) + (" · line style: feature level (bold: total)" if levels else "")
        fig.suptitle(f"{title}\n{note}", fontsize=10)
    return fig


def evaluation_figure(metrics: Mapping[str, RunSeeds], colors: Mapping[str, str], title: str,
                      fpr_limit: float = 0.3, steps_per_epoch: float | None = None):
    """Evaluation metrics: a panel per metric over optimiser steps; a run with a single evaluation is a marker.

    When every run has a single evaluation per metric this is a labelled dot chart instead (metric rows).

    Args:
        metrics: metric -> run -> per seed ``{"": (steps, values %)}``.
    """
    n_points = {len(s[""][0]) for runs in metrics.values() for seeds in runs.values() for s in seeds if "" in s}
    if n_points <= {1}:
        return _dot_chart(metrics, colors, title, fpr_limit)
    plt = style.pyplot()
    with plt.rc_context(style.rc()):
        fig, axes = _grid(len(metrics))
        for ax, (metric, runs) in zip(axes, metrics.items()):
            for run, seeds in runs.items():
                _draw_mean(ax, [s[""] for s in seeds if "" in s], colors[run], "", run)
                for line in ax.lines[-1:]:
                    line.set_marker("o")
                    line.set_markersize(3.5)
            ax.set(title=style.metric_name(metric, fpr_limit), xlabel=style.step_label(),
                   ylabel=style.metric_label(metric, fpr_limit))
            _epoch_axis(ax, steps_per_epoch)
        _figure_legend(fig, axes)
        fig.suptitle(f"{title}\n{_seed_note(metrics)}", fontsize=10)
    return fig


def _dot_chart(metrics: Mapping[str, RunSeeds], colors: Mapping[str, str], title: str, fpr_limit: float):
    """One evaluation per run: a dot per (metric, run) with its value written beside it, no line."""
    plt = style.pyplot()
    names = list(metrics)
    runs = list(dict.fromkeys(r for m in metrics.values() for r in m))
    with plt.rc_context(style.rc()):
        fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(names) * max(1, len(runs)) + 1.4), layout="constrained")
        offsets = np.linspace(-0.25, 0.25, len(runs)) if len(runs) > 1 else [0.0]
        for j, run in enumerate(runs):
            for i, metric in enumerate(names):
                values = [s[""][1][-1] for s in metrics[metric].get(run, []) if "" in s]
                if not values:
                    continue
                y, mean = i + offsets[j], float(np.mean(values))
                ax.plot([mean], [y], linestyle="none", marker="o", markersize=7, color=colors[run],
                        label=run if i == 0 else None)
                spread = f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
                ax.annotate(f"{mean:.1f}{spread}", (mean, y), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=9)
        ax.set_yticks(range(len(names)), [style.metric_label(m, fpr_limit) for m in names])
        ax.invert_yaxis()
        ax.set_xlim(max(0.0, ax.get_xlim()[0] - 5), min(104.0, ax.get_xlim()[1] + 6))
        ax.set(xlabel="value (%)")
        fig.suptitle(f"{title}\none evaluation per run (final model)", fontsize=10)
        ax.grid(axis="y", visible=False)
        if len(runs) > 1:
            _figure_legend(fig, [ax])
    return fig


def _auc(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    from ..metrics import curve_auc

    order = np.argsort(fpr, kind="stable")
    try:
        return float(curve_auc(fpr[order], y[order], limit))
    except ValueError:  # a curve that does not reach the limit has no AUC up to it
        return math.nan


def _mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray):
    """Curves of several seeds on a common FPR grid (step interpolation keeps a ROC's corners)."""
    ys = []
    for fpr, y in curves:
        order = np.argsort(fpr, kind="stable")
        ys.append(np.interp(grid, fpr[order], y[order]))
    ys = np.stack(ys)
    return ys.mean(0), ys.min(0), ys.max(0)


def curve_panels(kind: str, data: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                 colors: Mapping[str, str], fpr_limit: float = 0.3):
    """ROC (``kind="image_roc"``) or PRO (``kind="pro"``) curves, a panel per category, a colour per run.

    Several seeds: the mean curve on a common FPR grid and a min–max band. The legend gives each run's AUC
    (mean over seeds; AUPRO normalised up to ``fpr_limit``, which is marked).

    Args:
        data: category -> run -> the ``curves.json`` dicts of its seeds.
    """
    plt = style.pyplot()
    ykey, ylabel = ("tpr", "true positive rate") if kind == "image_roc" else ("pro", "per-region overlap (PRO)")
    limit = 1.0 if kind == "image_roc" else fpr_limit
    auc_name = "AUROC" if kind == "image_roc" else f"AUPRO@{fpr_limit:g}"
    cats = [c for c, runs in data.items() if any(cv.get(kind) for seeds in runs.values() for cv in seeds)]
    grid = np.linspace(0, 1, 501)
    with plt.rc_context(style.rc()):
        fig, axes = _grid(len(cats), width=3.5, height=3.3)
        for ax, category in zip(axes, cats):
            for run, seeds in data[category].items():
                curves = [(np.asarray(c[kind]["fpr"], float), np.asarray(c[kind][ykey], float)) for c in seeds
                          if c.get(kind)]
                if not curves:
                    continue
                aucs = [_auc(f, y, limit) for f, y in curves]
                mean, low, high = _mean_curve(curves, grid)
                label = f"{run}: {auc_name} {100 * np.nanmean(aucs):.1f}%"
                ax.plot(grid, mean, color=colors[run], linewidth=style.LEVEL_WIDTH + 0.2, label=label)
                if len(curves) > 1:
                    ax.fill_between(grid, low, high, color=colors[run], alpha=0.18, linewidth=0)
            if kind == "image_roc":
                ax.plot([0, 1], [0, 1], color=style.NEUTRAL, linestyle=":", linewidth=1)
                ax.set(xlim=(0, 1))
            else:
                ax.axvline(fpr_limit, color=style.NEUTRAL, linestyle="--", linewidth=1)
                ax.axvspan(fpr_limit, 1, color="#f2f2f2", zorder=0)
                ax.annotate(f"FPR limit {fpr_limit:g}", (fpr_limit, 0.97), xytext=(4, 0), textcoords="offset points",
                            fontsize=8, color="#555555", va="top")
                ax.set(xlim=(0, min(1.0, 2 * fpr_limit)))
            ax.set(ylim=(0, 1.02), xlabel="false positive rate", ylabel=ylabel, title=category)
            ax.legend(loc="lower right", fontsize=8)
        fig.suptitle("image-level ROC curves" if kind == "image_roc" else
                     f"PRO curves (pixel level); AUPRO integrates up to FPR {fpr_limit:g}", fontsize=11)
    return fig


def score_histograms(data: Mapping[str, Mapping[str, Any]], color: str, title: str):
    """Per category: image scores of normal vs anomalous test images, threshold marked when calibrated.

    Args:
        data: category -> {"normal": scores, "anomalous": scores, "threshold": float | None, "units": str}.
    """
    plt = style.pyplot()
    cats = list(data)
    with plt.rc_context(style.rc()):
        fig, axes = _grid(len(cats), width=3.5, height=2.8)
        for ax, category in zip(axes, cats):
            d = data[category]
            normal, anomalous = np.asarray(d["normal"], float), np.asarray(d["anomalous"], float)
            both = np.concatenate([normal, anomalous])
            bins = np.histogram_bin_edges(both, bins=min(30, max(5, both.size // 3)))
            ax.hist(normal, bins=bins, color=style.NEUTRAL, alpha=0.6, label=f"normal (n={normal.size})")
            ax.hist(anomalous, bins=bins, color=color, alpha=0.6, label=f"anomalous (n={anomalous.size})")
            if d.get("threshold") is not None:
                ax.axvline(d["threshold"], color="#000000", linestyle="--", linewidth=1.2, label="threshold")
            ax.set(title=category, xlabel=f"image score\n({d.get('units', 'raw model units')})",
                   ylabel="test images")
            ax.grid(axis="x", visible=False)
        _figure_legend(fig, axes, ncol=3)
        if any(str(d.get("units", "")).startswith("calibrated") for d in data.values()):
            title += "\nscores normalised as (s − median) / (threshold − median) of held-out normal images"
        fig.suptitle(title, fontsize=10)
    return fig


def recontrast_fig5(auroc: RunSeeds, diversity: Mapping[str, RunSeeds], colors: Mapping[str, str], title: str,
                    steps_per_epoch: float | None = None):
    """ReContrast Fig. 5 from our logs: (a) I-AUROC over training, (b) encoder feature diversity per level.

    Args:
        auroc: run -> per seed ``{"": (steps, I-AUROC %)}``.
        diversity: level (``l1`` ...) -> run -> per seed ``{"": (steps, diversity)}``.
    """
    plt = style.pyplot()
    levels = list(diversity)
    with plt.rc_context(style.rc()):
        fig, axes = _grid(1 + len(levels), cols=1 + len(levels), width=3.4, height=3.0)
        for run, seeds in auroc.items():
            _draw_mean(axes[0], [s[""] for s in seeds if "" in s], colors[run], "", run)
        axes[0].set(title="(a) I-AUROC over training", xlabel=style.step_label(), ylabel=style.metric_label(
            "image_auroc"))
        for ax, level in zip(axes[1:], levels):
            for run, seeds in diversity[level].items():
                _draw_mean(ax, [s[""] for s in seeds if "" in s], colors[run], level, run)
            ax.set(title=f"(b) encoder diversity, {level}", xlabel=style.step_label(),
                   ylabel=style.quantity_label("diversity"))
        for ax in axes:
            _epoch_axis(ax, steps_per_epoch)
        _figure_legend(fig, axes)
        fig.suptitle(f"{title}\n(ReContrast Fig. 5: encoder being trained, or the frozen one when none is)",
                     fontsize=10)
    return fig
