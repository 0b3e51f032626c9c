"""Results: one tidy row per cell, summaries over seeds and categories."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .cells import Cell, cell_status, grid
from .definition import (
    CELL_FILE,
    FAILED_FILE,
    ID_COLUMNS,
    STUDY_FILE,
    Study,
    _read_json,
    finite_number,
    study_from_dict,
)

log = logging.getLogger(__name__)


# -- results ------------------------------------------------------------------------------------------------


def cell_row(cell: Cell) -> dict[str, Any]:
    """One tidy row: identity, status, error, timing and every metric of the cell."""
    from ..run import METRICS_FILE

    status = cell_status(cell.run_dir)
    row: dict[str, Any] = {"run": cell.run, "preset": cell.preset, "category": cell.category, "seed": cell.seed,
                           "status": status, "error": "", "run_dir": str(cell.run_dir)}
    if status == "failed":
        row["error"] = _read_json(cell.run_dir / FAILED_FILE).get("error", "")
    if status == "done":
        saved = _read_json(cell.run_dir / METRICS_FILE)
        row["batches"] = saved.get("batches")
        row["fit_seconds"] = _read_json(cell.run_dir / CELL_FILE).get("fit_seconds")
        row.update(saved.get("metrics", {}))
    return row


def collect(output: str | Path, study: Study | None = None) -> list[dict[str, Any]]:
    """Result rows of every cell of a study folder (from ``study.yaml`` unless ``study`` is given)."""
    output = Path(output)
    if study is None:
        study = study_from_dict(yaml.safe_load((output / STUDY_FILE).read_text()))
    return [cell_row(cell) for cell in grid(study, output)]


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric names present in the rows, in ``reconad.metrics.METRIC_NAMES`` order then first appearance."""
    from ..metrics import METRIC_NAMES

    skip = {*ID_COLUMNS, "status", "error", "run_dir", "batches", "fit_seconds"}
    found = list(dict.fromkeys(k for r in rows for k in r if k not in skip))
    return [m for m in METRIC_NAMES if m in found] + [m for m in found if m not in METRIC_NAMES]


def _done(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "done"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for one value)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def category_groups(categories: Sequence[str]) -> dict[str, list[str]]:
    """Textures / objects (MVTec AD) or VisA's groups, where every member category is in the study."""
    from ..metrics import MVTEC_AD_GROUPS, VISA_GROUPS

    groups = {}
    for table in (MVTEC_AD_GROUPS, VISA_GROUPS):
        for group, members in table.items():
            if all(m in categories for m in members):
                groups[group] = list(members)
    return groups


def summarize(rows: Sequence[dict[str, Any]], categories: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean ± std over seeds per run × category, then per run the mean over categories (and groups).

    The std of a mean over categories is taken over seeds: for each seed the categories are averaged first,
    so it measures seed-to-seed variation of the reported mean. Only seeds finished in every category count.
    """
    done, metrics = _done(rows), metric_columns(rows)
    categories = list(categories or dict.fromkeys(r["category"] for r in done))
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in done if r["run"] == run]
        for category in categories:
            cells = [r for r in mine if r["category"] == category]
            if cells:
                out.append(_summary_row(run, category, cells, metrics))
        for group, members in {"mean": categories, **{f"mean ({g})": m for g, m in
                                                    category_groups(categories).items()}}.items():
            out.append(_group_row(run, group, members, mine, metrics))
    return out


def _summary_row(run: str, category: str, cells: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run, "category": category, "n_seeds": len(cells)}
    for m in metrics:
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([c[m] for c in cells if finite_number(c.get(m))])
    return row


def _group_row(run: str, label: str, members: Sequence[str], cells: list[dict[str, Any]],
               metrics: list[str]) -> dict[str, Any]:
    seeds = [s for s in dict.fromkeys(c["seed"] for c in cells)
             if all(any(c["seed"] == s and c["category"] == m for c in cells) for m in members)]
    row: dict[str, Any] = {"run": run, "category": label, "n_seeds": len(seeds)}
    for m in metrics:
        per_seed = []
        for s in seeds:
            values = [c.get(m) for c in cells if c["seed"] == s and c["category"] in members]
            if all(finite_number(v) for v in values):
                per_seed.append(float(np.mean(values)))
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(per_seed)
    return row


