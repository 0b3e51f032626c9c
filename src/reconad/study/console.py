"""One line per cell as it starts and ends, with an ETA for the study."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cells import Cell, cell_status, run_cell
from .definition import _read_json, finite_number

log = logging.getLogger(__name__)


# -- the console ---------------------------------------------------------------------------------------------
class CellReporter:
    """One line per cell as it starts and ends, with an ETA for the study (log level INFO of ``reconad.study``,
    which ``reconad study`` shows by default): ``cell 3/18 recontrast/full · bottle · seed 1 — done in 3 min 02 s,
    I-AUROC 77.7 · ETA 41 min``."""

    def __init__(self, cells: Sequence[Cell], workers: int = 1):
        self.number = {c.key: i + 1 for i, c in enumerate(cells)}
        self.total, self.workers = len(cells), max(1, workers)
        self.cells = list(cells)
        self.durations: list[float] = []

    def name(self, cell: Cell) -> str:
        return f"cell {self.number[cell.key]}/{self.total} {cell.run} · {cell.category} · seed {cell.seed}"

    def started(self, cell: Cell, resumed: bool = False) -> None:
        log.info("%s — %s", self.name(cell), "resumed" if resumed else "started")

    def ended(self, cell: Cell, result: dict[str, Any], seconds: float) -> None:
        from ..progress import format_duration
        from ..run import METRICS_FILE

        if result.get("status") == "failed":
            text = f"failed after {format_duration(seconds)}: {result.get('error', '')}"
        else:
            self.durations.append(seconds)
            auroc = _read_json(cell.run_dir / METRICS_FILE).get("metrics", {}).get("image_auroc")
            text = f"done in {format_duration(seconds)}"
            if finite_number(auroc):
                text += f", I-AUROC {100 * auroc:.1f}"
        log.info("%s — %s%s", self.name(cell), text, self.eta())

    def eta(self) -> str:
        from ..progress import format_duration

        left = sum(cell_status(c.run_dir) not in ("done", "failed") for c in self.cells)
        if not left:
            return " · study finished"
        if not self.durations:
            return f" · {left} cell(s) left"
        return f" · {left} left, ETA {format_duration(left * float(np.mean(self.durations)) / self.workers)}"


def _run_reported(cell: Cell, reporter: CellReporter, fit: Callable | None) -> dict[str, Any]:
    reporter.started(cell, cell_status(cell.run_dir) == "partial")
    start = time.perf_counter()
    result = run_cell(cell, fit, desc=reporter.name(cell) if fit is None else None)
    reporter.ended(cell, result, time.perf_counter() - start)
    return result
