"""A study's cells: one run folder each, their status, running one, and checking them before any trains."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import deep_merge, make_config
from ..errors import UsageError
from ..fileio import write_json
from .definition import CELL_FILE, CHECKPOINTS_PER_CELL, FAILED_FILE, ORDERS, Study, StudyError

log = logging.getLogger(__name__)


# -- cells --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    run: str
    preset: str
    category: str
    seed: int
    run_dir: Path
    config: Any = None  # RunConfig; None when cells are only collected from disk

    @property
    def key(self) -> tuple[str, str, int]:
        return self.run, self.category, self.seed


def cell_dir(output: str | Path, run: str, category: str, seed: int) -> Path:
    return Path(output) / run / category / f"seed{seed}"


def grid(study: Study, output: str | Path) -> list[Cell]:
    """The cells of a study folder without their configs (no preset or dataset needed): for collecting."""
    return [Cell(run.label, run.preset, category, seed, cell_dir(output, run.label, category, seed))
            for run in study.runs for category in study.category_list() for seed in study.seed_list()]


def _deep_merge(*layers: dict[str, Any]) -> dict[str, Any]:

    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    return merged


def _with_checkpoints(cfg):
    """Cells checkpoint so that a killed study resumes them (checkpoints never change the training itself)."""
    if cfg.train.checkpoint_every is None and cfg.train.iterations:
        cfg.train.checkpoint_every = max(1, math.ceil(cfg.train.iterations / CHECKPOINTS_PER_CELL))
    elif cfg.train.checkpoint_every is None:
        cfg.train.checkpoint_every = 100
    return cfg


def make_cells(study: Study, output: str | Path) -> list[Cell]:
    """Every (run, category, seed) cell with its resolved config; config mistakes are raised before any run."""

    study.validate()
    cells, root = [], study.data_root()
    for run in study.runs:
        for category in study.category_list():
            for seed in study.seed_list():
                grid = {"data": {"category": category, **({"root": str(root)} if root else {})},
                        "train": {"seed": seed}}
                try:
                    cfg = make_config(run.preset, **_deep_merge(study.overrides, run.overrides, grid))
                except UsageError as err:
                    raise StudyError(f"run {run.label!r}: {err}") from err
                run_dir = cell_dir(output, run.label, category, seed)
                cells.append(Cell(run.label, run.preset, category, seed, run_dir, _with_checkpoints(cfg)))
    return cells


def cell_status(run_dir: Path) -> str:
    """``done`` (metrics.json), ``failed`` (failed.json), ``partial`` (a checkpoint to resume) or ``pending``."""
    from ..run import METRICS_FILE, checkpoint_step

    if (run_dir / METRICS_FILE).is_file():
        return "done"
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    if checkpoint_step(run_dir) is not None:
        return "partial"
    return "pending"


def _saved_config_matches(cell: Cell) -> bool:
    from ..run import read_run_config

    try:
        return read_run_config(cell.run_dir) == cell.config
    except Exception:  # noqa: BLE001 — an unreadable saved config is a mismatch, reported as such
        return False


def run_cell(cell: Cell, fit: Callable | None = None, desc: str | None = None) -> dict[str, Any]:
    """Run one cell unless it is finished: resume it from its checkpoint, or start it afresh.

    A failure is written to ``failed.json`` in the cell's folder and returned, never raised (the study goes
    on); ``KeyboardInterrupt`` stops the study and leaves the last checkpoint for the next call.
    """
    if fit is None:  # the engine's fit, calibrated at its end like `reconad fit`
        from functools import partial

        from .. import engine
        from ..deploy.calibrate import calibrate_after_fit

        fit = partial(engine.fit, after_save=calibrate_after_fit)
    status = cell_status(cell.run_dir)
    if status == "done":
        return {"status": "done", "ran": False}
    resume = status == "partial" and _saved_config_matches(cell)
    if not resume:
        _clear_partial(cell.run_dir)
    (cell.run_dir / FAILED_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        if desc is None:
            fit(cell.config, cell.run_dir, resume=resume)
        else:
            fit(cell.config, cell.run_dir, resume=resume, desc=desc)
    except Exception as err:  # noqa: BLE001 — one failed cell must not stop the others
        log.error("cell %s failed: %s", cell.run_dir, err)
        return _record_failure(cell, err)
    seconds = time.perf_counter() - start
    write_json(cell.run_dir / CELL_FILE, {"run": cell.run, "preset": cell.preset, "category": cell.category,
                                          "seed": cell.seed, "fit_seconds": seconds, "resumed": resume,
                                          "host": socket.gethostname(), "pid": os.getpid()})
    return {"status": "done", "ran": True, "resumed": resume, "fit_seconds": seconds}


def _clear_partial(run_dir: Path) -> None:
    # A fresh start must not append to an old log or keep a checkpoint of another configuration: the cell's
    # folder is the study's own, so a cell that starts afresh starts from an empty folder
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(cell: Cell, err: BaseException) -> dict[str, Any]:
    info = {"status": "failed", "ran": True, "error": f"{type(err).__name__}: {err}"}
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell.run_dir / FAILED_FILE, {**info, "traceback": traceback.format_exc(), "time": time.time()})
    return info


def config_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["train.iterations: 2 → 3", ...]``: the settings in which two config mappings differ."""
    lines = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} → {b!r}")
    return lines


def _difference_to_saved(cell: Cell) -> list[str]:
    from ..config import config_to_dict
    from ..run import read_run_config

    try:
        saved = config_to_dict(read_run_config(cell.run_dir))
    except Exception as err:  # noqa: BLE001 — an unreadable saved config is a difference, reported as such
        return [f"its config.yaml cannot be read ({err})"]
    return config_difference(saved, config_to_dict(cell.config))


def check_finished(cells: Sequence[Cell]) -> None:
    """Refuse to mix results: a finished cell must have been trained with the configuration asked for now."""
    stale = [c for c in cells if cell_status(c.run_dir) == "done" and not _saved_config_matches(c)]
    if stale:
        shown = "; ".join(f"{c.run_dir}: {', '.join(_difference_to_saved(c)[:4])}" for c in stale[:3])
        raise StudyError(f"{len(stale)} finished cell(s) were trained with another configuration than the study "
                         f"asks for now ({shown}{' ...' if len(stale) > 3 else ''}). Delete them to re-run them, "
                         "or call with the settings they were trained with.")


def order_cells(cells: list[Cell], order: str) -> list[Cell]:
    if order not in ORDERS:
        raise StudyError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "grid":
        return list(cells)
    runs = list(dict.fromkeys(c.run for c in cells))
    categories = list(dict.fromkeys(c.category for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    if order == "seed":
        key = lambda c: (seeds.index(c.seed), categories.index(c.category), runs.index(c.run))  # noqa: E731
    else:
        key = lambda c: (categories.index(c.category), seeds.index(c.seed), runs.index(c.run))  # noqa: E731
    return sorted(cells, key=key)


def select_cell(cells: Sequence[Cell], spec: str) -> Cell:
    """The cell named ``run/category/seed`` (the run label may itself hold slashes: the last two parts are the
    category and the seed)."""
    *run, category, seed = spec.split("/") if spec.count("/") >= 2 else ("", "", "")
    seed = seed.removeprefix("seed")
    for cell in cells:
        if (cell.run, cell.category, str(cell.seed)) == ("/".join(run), category, seed):
            return cell
    known = ", ".join(f"{c.run}/{c.category}/{c.seed}" for c in cells[:4])
    raise StudyError(f"--cell {spec!r} is not a cell of this study; cells look like {known}, ...")


def validate_cells(cells: Sequence[Cell]) -> None:
    """Every cell's backbone, taps, widths and settings checked before any cell trains, named by its cell."""
    from ..validation import validate_study_cells

    validate_study_cells({f"{c.run}/{c.category}/seed{c.seed}": c.config for c in cells})
