"""Figures of runs and studies: training curves from ``log.jsonl``, ROC and PRO curves from ``curves.json``.

One style for every figure (:data:`STYLE`), one colour per run (:func:`run_colors`), labelled axes with units,
legends and titles. Matplotlib is imported inside the functions with the non-interactive ``Agg`` backend, so
importing this module has no side effect.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PLOTS_DIR = "plots"
# Okabe & Ito's colour-blind-safe palette, then a few more distinct colours for large studies
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
           "#7F3C8D", "#11A579", "#3969AC", "#F2B701")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)))
STYLE: dict[str, Any] = {
    "figure.dpi": 110, "savefig.dpi": 110, "font.size": 9, "axes.titlesize": 10,
    "axes.titleweight": "bold", "axes.labelsize": 9, "legend.fontsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e6e6e6",
    "grid.linewidth": 0.7, "axes.edgecolor": "#444444", "axes.axisbelow": True, "lines.linewidth": 1.6,
    "font.family": "DejaVu Sans",
}
TRAIN_SKIP = {"batch", "batches", "epoch", "kind"}
PERCENT_METRICS = {"image_auroc", "pixel_auroc", "aupro", "aupro_per_image", "image_f1_max", "pixel_f1_max"}
Series = dict[str, tuple[np.ndarray, np.ndarray]]  # level -> (x, y)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # inside the function: no import-time side effect, works without a display
    import matplotlib.pyplot as plt

    return plt


def run_colors(labels: Iterable[str]) -> dict[str, str]:
    """A fixed colour per run label, in order, shared by every figure of a report."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


def ylabel(quantity: str) -> str:
    """Axis label with unit for a logged quantity."""
    if quantity in PERCENT_METRICS:
        return f"{quantity} (%)"
    if quantity == "lr":
        return "learning rate"
    if quantity == "alpha":
        return "α (mixing weight, dimensionless)"
    if quantity == "hm_discard_rate":
        return "discarded fraction of pixels"
    if quantity == "diversity":
        return "std of L2-normalised features"
    if quantity.startswith("loss") or quantity.endswith("loss") or quantity == "ssot":
        return f"{quantity} (dimensionless)"
    return f"{quantity} (a.u.)"


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _x(entry: Mapping[str, Any]) -> float:
    return float(entry.get("batch", entry.get("batches", math.nan)))


def train_quantities(entries: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Train-log quantities grouped by family: ``diversity/layer1`` → family ``diversity``, level ``layer1``;
    the learning-rate list → family ``lr``, one level per parameter group."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for e in entries:
        if e.get("kind") != "train":
            continue
        for key, value in e.items():
            if key in TRAIN_SKIP:
                continue
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                family, _, level = key.partition("/")
                level = f"group {i}" if isinstance(value, list) else level
                points.setdefault(family, {}).setdefault(level, []).append((_x(e), float(v)))
    return {f: {lv: (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) for lv, pts in levels.items()}
            for f, levels in points.items()}


def eval_quantities(entries: Sequence[Mapping[str, Any]]) -> Series:
    """Evaluation metrics over batches (periodic ``eval`` entries and the ``final`` one), in %."""
    points: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        if e.get("kind") not in ("eval", "final"):
            continue
        for key, value in e.items():
            if key not in TRAIN_SKIP and isinstance(value, int | float) and not isinstance(value, bool):
                points.setdefault(key, []).append((_x(e), 100.0 * float(value)))
    return {k: (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) for k, pts in points.items()}


def save_figure(fig, path: str | Path | None = None) -> bytes:
    """PNG bytes of a figure (also written to ``path`` when given); the figure is closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        from .checkpoint import atomic_write

        atomic_write(path, lambda fh: fh.write(data))
    return data


def _levels_legend(ax, series: Series, color: str, label_prefix: str = "") -> None:
    for i, (level, (x, y)) in enumerate(series.items()):
        name = level or "total"
        ax.plot(x, y, color=color, linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker="o" if len(x) <= 3 else None, markersize=3, label=f"{label_prefix}{name}".strip())


def _single_axes(plt):
    # fixed margins instead of a layout engine: one draw per figure (plot_run runs after every training)
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.9)
    return fig, ax


def plot_series(quantity: str, series: Series, title: str, color: str = PALETTE[0]):
    """One quantity of one run, every level as its own line style."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = _single_axes(plt)
        _levels_legend(ax, series, color)
        if quantity == "lr" and all((y > 0).all() for _, y in series.values()):
            ax.set_yscale("log")
        ax.set(xlabel="training batch", ylabel=ylabel(quantity), title=title)
        _integer_x(ax)
        ax.legend(loc="best")
    return fig


def plot_eval(series: Series, title: str):
    """Evaluation metrics of one run over batches (one line per metric, %)."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = _single_axes(plt)
        for i, (metric, (x, y)) in enumerate(series.items()):
            ax.plot(x, y, color=PALETTE[i % len(PALETTE)], marker="o", markersize=3, label=metric)
        ax.set(xlabel="training batch", ylabel="metric (%)", title=title)
        _integer_x(ax)
        ax.legend(loc="best")
    return fig


def plot_run(run_dir: str | Path) -> list[Path]:
    """Training-curve PNGs of a run folder into ``run_dir/plots/``: one per logged quantity, plus the
    evaluation metrics over batches. Returns the written files (none when the log is empty)."""
    run_dir = Path(run_dir)
    entries = read_log(run_dir)
    out, written = run_dir / PLOTS_DIR, []
    for family, series in train_quantities(entries).items():
        fig = plot_series(family, series, f"{family} — {run_dir.name}")
        save_figure(fig, out / f"train_{_safe(family)}.png")
        written.append(out / f"train_{_safe(family)}.png")
    evals = eval_quantities(entries)
    if evals:
        save_figure(plot_eval(evals, f"evaluation — {run_dir.name}"), out / "eval_metrics.png")
        written.append(out / "eval_metrics.png")
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# -- study figures: one line per run, one panel per category ---------------------------------------------------
def _panels(n: int, width: float = 4.0, height: float = 3.0):
    plt = _pyplot()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and min/max over seeds at the x values all seeds share (logs are written at the same batches)."""
    common = curves[0][0]
    for x, _ in curves[1:]:
        common = np.intersect1d(common, x)
    ys = np.stack([y[np.searchsorted(x, common)] for x, y in curves])
    return common, ys.mean(0), np.stack([ys.min(0), ys.max(0)])


def plot_quantity_grid(quantity: str, data: Mapping[str, Mapping[str, Sequence[Series]]],
                       colors: Mapping[str, str], title: str):
    """A quantity over batches: a panel per category, a colour per run (mean over seeds, band = min–max over
    seeds), a line style per level.

    Args:
        data: category -> run -> one Series per seed.
    """
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(data))
        for ax, (category, runs) in zip(axes, data.items()):
            for run, seeds in runs.items():
                levels = list(dict.fromkeys(lv for s in seeds for lv in s))
                for i, level in enumerate(levels):
                    curves = [s[level] for s in seeds if level in s and len(s[level][0])]
                    if not curves:
                        continue
                    x, mean, band = _mean_band(curves)
                    name = f"{run} · {level or 'total'}" if len(levels) > 1 else run
                    ax.plot(x, mean, color=colors[run], linestyle=LINESTYLES[i % len(LINESTYLES)], label=name,
                            marker="o" if len(x) <= 3 else None, markersize=3)
                    if len(curves) > 1:
                        ax.fill_between(x, band[0], band[1], color=colors[run], alpha=0.15, linewidth=0)
            if quantity == "lr":
                ax.set_yscale("log")
            ax.set(xlabel="training batch", ylabel=ylabel(quantity), title=category)
            _integer_x(ax)
        _figure_legend(fig, axes)
        fig.suptitle(f"{title} (line: mean over seeds; band: min–max)", fontweight="bold")
    return fig


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure_legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:  # below the panels, outside them: constrained layout makes room for it
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncol=min(4, len(labels)))


def plot_curves_grid(kind: str, data: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                     colors: Mapping[str, str], fpr_limit: float = 0.3):
    """ROC (``kind="image_roc"``) or PRO (``kind="pro"``) curves: a panel per category, a colour per run, one thin
    line per seed.

    Args:
        data: category -> run -> the ``curves.json`` dicts of its seeds.
    """
    plt = _pyplot()
    ykey, ylab = ("tpr", "true positive rate") if kind == "image_roc" else ("pro", "per-region overlap (PRO)")
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(data), 3.6, 3.2)
        for ax, (category, runs) in zip(axes, data.items()):
            for run, seeds in runs.items():
                for i, curves in enumerate(seeds):
                    c = curves.get(kind)
                    if c:
                        ax.plot(c["fpr"], c[ykey], color=colors[run], alpha=0.85, linewidth=1.1,
                                label=run if i == 0 else None)
            if kind == "image_roc":
                ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
                ax.set(xlim=(0, 1), ylim=(0, 1.02))
            else:
                ax.axvline(fpr_limit, color="#999999", linestyle=":", linewidth=1, label=f"FPR limit {fpr_limit:g}")
                ax.set(xlim=(0, min(1.0, 2 * fpr_limit)), ylim=(0, 1.02))
            ax.set(xlabel="false positive rate", ylabel=ylab, title=category)
        _figure_legend(fig, axes)
        fig.suptitle("image-level ROC" if kind == "image_roc" else "PRO curves (pixel level)", fontweight="bold")
    return fig
