"""The house style of every reconad figure: palette, line styles per level, type sizes, axis labels, saving.

* Colours: Okabe & Ito's colour-blind-safe palette (then Paul Tol's "muted" set for large studies). A run keeps
  its colour in every figure of a study: :func:`run_colors` maps the study's run list, in study order.
* Line styles encode the feature level (``l1`` dotted, ``l2`` dashed, ``l3`` dash-dot); a group's total (no
  level) is a thicker solid line; the learning rate's parameter groups are solid, dashed, ... The style depends
  on the level's name, not on drawing order.
* Axis labels carry the metric's definition and unit (``AUPRO@0.3 (%)``); :func:`quantity_label`.
* Every figure is written as PNG (for the HTML report) and SVG (vector, for papers): :func:`save`.

Matplotlib is imported inside the functions with the ``Agg`` backend, so importing this module draws nothing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
PALETTE = OKABE_ITO[:7] + TOL_MUTED + OKABE_ITO[7:]  # yellow last: weakest contrast on white
NEUTRAL = "#7f7f7f"
LEVEL_STYLES: dict[str, Any] = {"": "-", "l1": ":", "l2": "--", "l3": "-.", "l4": (0, (5, 1, 1, 1, 1, 1)),
                                "l5": (0, (8, 2))}
GROUP_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.")  # parameter groups of the learning rate
TOTAL_WIDTH, LEVEL_WIDTH = 2.2, 1.4
FORMATS = ("png", "svg")

STYLE: dict[str, Any] = {
    "figure.dpi": 120, "savefig.dpi": 150, "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11,
    "axes.titleweight": "bold", "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#ebebeb", "grid.linewidth": 0.7, "axes.edgecolor": "#333333",
    "axes.axisbelow": True, "lines.linewidth": LEVEL_WIDTH, "svg.fonttype": "none", "figure.facecolor": "white",
    "savefig.facecolor": "white",
}

# metric -> (short name as in the papers, definition); the unit is always % (values × 100)
METRICS: dict[str, tuple[str, str]] = {
    "image_auroc": ("I-AUROC", "image-level AUROC"),
    "pixel_auroc": ("P-AUROC", "pixel-level AUROC"),
    "aupro": ("AUPRO@{fpr}", "area under the PRO curve up to FPR {fpr}, normalised"),
    "aupro_per_image": ("AUPRO@{fpr} (RD4AD per-image)", "RD4AD's per-image PRO, up to FPR {fpr}"),
    "image_f1_max": ("I-F1max", "best image-level F1 over thresholds"),
    "pixel_f1_max": ("P-F1max", "best pixel-level F1 over thresholds"),
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # inside the function: no import-time side effect, works without a display
    import matplotlib.pyplot as plt

    return plt


def rc() -> dict[str, Any]:
    """The rc parameters of the house style (with a neutral colour cycle: runs get colours explicitly)."""
    from cycler import cycler

    return {**STYLE, "axes.prop_cycle": cycler(color=[NEUTRAL])}


def run_colors(labels: Iterable[str]) -> dict[str, str]:
    """A fixed colour per run label: the i-th run of the study (study order) gets the i-th palette colour, so
    the same study draws every figure with the same colours."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


def level_style(level: str) -> tuple[Any, float]:
    """(line style, width) of a feature level name such as ``l2``, ``layer2``, ``frozen/l2``; the total is bold."""
    last = level.rsplit("/", 1)[-1]
    group = re.fullmatch(r"group (\d+)", last)
    if group:
        return GROUP_STYLES[int(group[1]) % len(GROUP_STYLES)], LEVEL_WIDTH + 0.4
    match = re.fullmatch(r"(?:l|layer|level)(\d+)", last)
    if not match:
        return "-", TOTAL_WIDTH
    return LEVEL_STYLES.get(f"l{match[1]}", LEVEL_STYLES["l5"]), LEVEL_WIDTH


def metric_name(metric: str, fpr_limit: float = 0.3) -> str:
    short = METRICS.get(metric, (metric, metric))[0]
    return short.format(fpr=f"{fpr_limit:g}")


def metric_label(metric: str, fpr_limit: float = 0.3) -> str:
    """Axis label with the metric's paper name and unit: ``AUPRO@0.3 (%)``."""
    return f"{metric_name(metric, fpr_limit)} (%)" if metric in METRICS else f"{metric} (a.u.)"


def metric_definition(metric: str, fpr_limit: float = 0.3) -> str:
    return METRICS.get(metric, (metric, metric))[1].format(fpr=f"{fpr_limit:g}")


def quantity_label(quantity: str) -> str:
    """Axis label with unit for a logged training quantity (loss terms, lr, diversity, ...)."""
    family = quantity.split("/", 1)[0]
    if quantity in METRICS:
        return metric_label(quantity)
    if family == "lr":
        return "learning rate (log scale)"
    if family == "alpha":
        return "hard-mining α (dimensionless)"
    if family == "hm_discard_rate":
        return "discarded pixels (fraction)"
    if family == "diversity":
        return "feature diversity (std, L2-norm. features)"
    return "loss (dimensionless)"


def step_label(epochs: bool = False) -> str:
    return "epoch" if epochs else "optimiser step"


def save(fig, stem: str | Path | None = None, formats: Iterable[str] = FORMATS) -> bytes:
    """Write ``stem.png`` and ``stem.svg`` (atomically) and return the PNG bytes; the figure is closed."""
    from ..fileio import atomic_write

    plt = pyplot()
    outputs = {}
    for fmt in dict.fromkeys(["png", *formats]):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        outputs[fmt] = buffer.getvalue()
    plt.close(fig)
    if stem is not None:
        stem = Path(stem)
        for fmt in formats:
            data = outputs[fmt]
            # not with_suffix: stems may contain dots (``..._score0.8123``)
            atomic_write(stem.parent / f"{stem.name}.{fmt}", lambda fh, data=data: fh.write(data))
    return outputs["png"]


def safe_name(name: str) -> str:
    """A file-name-safe version of a quantity or run name."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
