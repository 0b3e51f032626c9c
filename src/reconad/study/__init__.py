"""Studies: grids of runs (presets + overrides) × categories × seeds through the normal engine, with statistics.

A study folder holds ``study.yaml`` (the resolved study), one run folder per cell
``<study>/<run>/<category>/seed<k>``, and the tables written by :func:`write_tables`: ``results.csv`` /
``results.json`` (one row per cell, every metric), ``summary.csv`` (mean ± std over seeds per run × category,
plus the mean over categories and over the textures / objects groups) and ``paired.csv`` (paired comparisons
between runs over the same (category, seed) cells: difference of means, bootstrap CI, Wilcoxon p-value).

Cells are independent. They run one after another in this process (``launcher="sequential"``), as Ray tasks
(``launcher="ray"``), split over several processes with ``shard=(k, n)`` (one process per GPU, e.g. started by
``torchrun``), or taken one by one from a shared work queue by any number of ``worker=True`` processes on machines
that share the output folder (an atomic claim file per cell with a heartbeat; see ``docs/distributed.md``).

A study folder grows: a later call that adds runs, categories or seeds extends ``study.yaml`` (the union, with
``history`` saying when each part was added); a call that would change a finished cell's configuration is refused
with the difference shown.
"""

from __future__ import annotations

from .cells import (
    Cell,
    cell_dir,
    cell_status,
    check_finished,
    config_difference,
    grid,
    make_cells,
    order_cells,
    run_cell,
    select_cell,
    validate_cells,
)
from .console import CellReporter
from .definition import (
    CELL_FILE,
    CHECKPOINTS_PER_CELL,
    CLAIMS_DIR,
    DEFAULT_SEEDS,
    FAILED_FILE,
    ID_COLUMNS,
    ORDERS,
    STUDY_FILE,
    Study,
    StudyError,
    StudyRun,
    finite_number,
    load_study,
    merge_studies,
    parse_seeds,
    parse_sets,
    resolved,
    study_from_dict,
    study_from_options,
)
from .launch import parse_shard, prepare_study, run_study
from .results import category_groups, cell_row, collect, metric_columns, summarize
from .stats import PairedResult, bootstrap_ci, comparison_pairs, paired_comparison, paired_table, verdict, wilcoxon_p
from .tables import write_tables
from .workqueue import Claim, claim_path, run_worker, try_claim

__all__ = ["finite_number",
    "CELL_FILE",
    "CHECKPOINTS_PER_CELL",
    "CLAIMS_DIR",
    "Cell",
    "CellReporter",
    "Claim",
    "DEFAULT_SEEDS",
    "FAILED_FILE",
    "ID_COLUMNS",
    "ORDERS",
    "PairedResult",
    "STUDY_FILE",
    "Study",
    "StudyError",
    "StudyRun",
    "bootstrap_ci",
    "category_groups",
    "cell_dir",
    "cell_row",
    "cell_status",
    "check_finished",
    "claim_path",
    "collect",
    "comparison_pairs",
    "config_difference",
    "grid",
    "load_study",
    "make_cells",
    "merge_studies",
    "metric_columns",
    "order_cells",
    "paired_comparison",
    "paired_table",
    "parse_seeds",
    "parse_sets",
    "parse_shard",
    "prepare_study",
    "resolved",
    "run_cell",
    "run_study",
    "run_worker",
    "select_cell",
    "study_from_dict",
    "study_from_options",
    "summarize",
    "try_claim",
    "validate_cells",
    "verdict",
    "wilcoxon_p",
    "write_tables",
]
