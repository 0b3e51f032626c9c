"""Running a study: sequentially, sharded (k/n, torchrun), as Ray tasks, or as queue workers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..fileio import write_yaml
from .cells import (
    Cell,
    cell_status,
    check_finished,
    make_cells,
    order_cells,
    run_cell,
    select_cell,
    validate_cells,
)
from .console import CellReporter, _run_reported
from .definition import STUDY_FILE, Study, StudyError, _saved_study, merge_studies
from .results import collect
from .tables import write_tables
from .workqueue import run_worker

log = logging.getLogger(__name__)


# -- running ------------------------------------------------------------------------------------------------
def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"k/n"`` → (k, n); ``"torchrun"`` → (RANK, WORLD_SIZE) of a torchrun worker; ``None`` → (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        k, n = shard
    elif shard == "torchrun":
        k, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    else:
        try:
            k, n = (int(x) for x in shard.split("/"))
        except ValueError as err:
            raise StudyError(f"shard must be 'k/n' or 'torchrun', got {shard!r}") from err
    if not 0 <= k < n:
        raise StudyError(f"shard {k}/{n}: need 0 <= k < n")
    return k, n


def _torchrun_worker_env() -> None:
    """Turn a torchrun worker into an independent single-device process: each cell is its own Fabric run."""
    local_rank = os.environ.get("LOCAL_RANK")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE"):
        os.environ.pop(key, None)
    if local_rank is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = local_rank


def _run_with_ray(cells: list[Cell], ray_options: dict[str, Any], reporter: CellReporter) -> list[dict[str, Any]]:
    """Each cell a Ray task (``ray_options``: its resources, default one CPU); ``RAY_ADDRESS`` joins a cluster,
    else a local one is started. Lines are printed here, in the driver, as tasks finish."""
    try:
        import ray
    except ImportError as err:
        raise StudyError("launcher 'ray' needs `pip install 'reconad[ray]'` (or `pip install ray`)") from err
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    address = getattr(ray.get_runtime_context(), "gcs_address", None)
    log.info("ray: %d cell(s) as tasks on the cluster at %s", len(cells), address)
    remote = ray.remote(**(ray_options or {"num_cpus": 1}))(run_cell)
    start = time.perf_counter()
    pending = {remote.remote(cell): cell for cell in cells}
    results = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        results[cell.key] = ray.get(ready[0])
        reporter.ended(cell, results[cell.key], time.perf_counter() - start)
    return [results[c.key] for c in cells]


def prepare_study(study: Study, output: str | Path, *, write: bool = True) -> tuple[Study, list[Cell]]:
    """The folder's study grown by ``study`` and its cells, checked: configs valid, finished cells unchanged.

    Nothing is written when a check fails; ``write`` records the grown ``study.yaml``.
    """
    output = Path(output)
    merged = merge_studies(_saved_study(output), study)
    cells = make_cells(merged, output)
    validate_cells(cells)
    check_finished(cells)
    if write:
        output.mkdir(parents=True, exist_ok=True)
        write_yaml(output / STUDY_FILE, merged.to_dict())
    return merged, cells


def run_study(study: Study, output: str | Path, *, launcher: Literal["sequential", "ray"] = "sequential",
              shard: str | tuple[int, int] | None = None, ray_options: dict[str, Any] | None = None,
              fit: Callable | None = None, tables: bool = True, worker: bool = False, cell: str | None = None,
              order: str = "grid", heartbeat_seconds: float = 30.0) -> list[dict[str, Any]]:
    """Run (or continue) every cell of a study, then write its tables.

    Args:
        study: The study; a folder that already holds one grows by it (:func:`merge_studies`).
        output: The study folder.
        launcher: ``sequential`` (this process) or ``ray`` (one Ray task per cell).
        shard: ``(k, n)`` / ``"k/n"``: run cells ``k, k+n, ...`` only; ``"torchrun"``: this torchrun worker's
            share; tables then cover what is on disk so far (``reconad report`` collects all).
        ray_options: ``ray.remote`` resources per cell, e.g. ``{"num_gpus": 1}``.
        fit: The training function (default ``reconad.engine.fit``); tests substitute it.
        tables: Write the result tables after the cells.
        worker: Take cells from the shared work queue (claim files) instead of a fixed share.
        cell: Run this one cell only (``run/category/seed``).
        order: ``grid``, ``seed`` or ``category`` (:data:`ORDERS`).
        heartbeat_seconds: Worker claims are renewed this often and taken over after 4× this.

    Returns:
        The result rows (see :func:`collect`).
    """
    output = Path(output)
    k, n = parse_shard(shard)
    if shard == "torchrun":
        _torchrun_worker_env()
    study, cells = prepare_study(study, output, write=k == 0)
    cells = order_cells(cells, order)
    reporter = CellReporter(cells)
    mine = [select_cell(cells, cell)] if cell else [c for i, c in enumerate(cells) if i % n == k]
    log.info("study %s: %d cells, %d to run here (%s)", output, len(cells), len(mine),
             "work queue" if worker else launcher)
    if worker:
        run_worker(mine, output, reporter, fit, heartbeat_seconds)
    elif launcher == "ray":
        _run_with_ray(mine, ray_options or {}, reporter)
    elif launcher == "sequential":
        for c in mine:
            if cell_status(c.run_dir) != "done":
                _run_reported(c, reporter, fit)
    else:
        raise StudyError(f"launcher must be 'sequential' or 'ray', got {launcher!r}")
    rows = collect(output, study)
    if tables:
        write_tables(output, rows, study)
    return rows
