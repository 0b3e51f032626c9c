"""Figures of runs and studies in one house style (:mod:`.style`), read from saved run folders only.

* :func:`plot_run` — the figures of one run folder into ``run_dir/plots/`` (PNG + SVG): training quantities as
  small multiples, encoder feature diversity, evaluation metrics, ROC / PRO curves, the test score histogram.
* :mod:`.figures` — the figure types; :mod:`.runs` — reading run folders; :mod:`.logs` — ``log.jsonl`` series.

Nothing is drawn at import time; matplotlib runs with the ``Agg`` backend.
"""

from __future__ import annotations

from pathlib import Path

from . import figures, style
from .logs import read_log
from .runs import RunFiles, histogram_data, load_run
from .style import run_colors, safe_name, save

__all__ = ["PLOTS_DIR", "figures", "histogram_data", "load_run", "plot_run", "read_log", "run_colors", "safe_name",
           "save", "style"]

PLOTS_DIR = "plots"


def run_figures(files: RunFiles, label: str) -> dict[str, object]:
    """Name -> matplotlib figure of every figure one run has data for."""
    from .runs import diversity_panels_data, eval_data, training_panels_data

    group = {label: [files]}
    colors = run_colors([label])
    spe = files.schedule.steps_per_epoch
    out: dict[str, object] = {}
    train = training_panels_data(group)
    if train:
        out["training"] = figures.training_panels(train, colors, f"training — {label}", spe)
    diversity = diversity_panels_data(group)
    if diversity:
        out["diversity"] = figures.training_panels(diversity, colors, f"feature diversity — {label}", spe)
    evals = eval_data(group)
    if evals:
        out["evaluation"] = figures.evaluation_figure(evals, colors, f"evaluation — {label}", files.fpr_limit, spe)
    category = (files.config.get("data") or {}).get("category") or label
    for kind in ("image_roc", "pro"):
        if files.curves.get(kind):
            out[kind] = figures.curve_panels(kind, {category: {label: [files.curves]}}, colors, files.fpr_limit)
    hist = histogram_data(files.run_dir)
    if hist:
        out["score_histogram"] = figures.score_histograms({category: hist}, colors[label],
                                                          f"test image scores — {label}")
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every figure of a run folder to ``run_dir/plots/<name>.png`` and ``.svg``; returns the PNG paths
    (none when the folder has no log)."""
    run_dir = Path(run_dir)
    if not (run_dir / "log.jsonl").is_file():
        return []
    written = []
    for name, fig in run_figures(load_run(run_dir), run_dir.name).items():
        save(fig, run_dir / PLOTS_DIR / name)
        written.append(run_dir / PLOTS_DIR / f"{name}.png")
    return written
