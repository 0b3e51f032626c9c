"""Studies: grids of runs (presets + overrides) × categories × seeds through the normal engine, with statistics.

A study folder holds ``study.yaml`` (the resolved study), one run folder per cell
``<study>/<run>/<category>/seed<k>``, and the tables written by :func:`write_tables`: ``results.csv`` /
``results.json`` (one row per cell, every metric), ``summary.csv`` (mean ± std over seeds per run × category,
plus the mean over categories and over the textures / objects groups) and ``paired.csv`` (paired comparisons
between runs over the same (category, seed) cells: difference of means, bootstrap CI, Wilcoxon p-value).

Cells are independent. They run one after another in this process (``launcher="sequential"``), as Ray tasks
(``launcher="ray"``, when ``ray`` is installed), or split over several processes with ``shard=(k, n)`` (one
process per GPU, e.g. started by ``torchrun``; see ``docs/studies.md``). No scheduler of our own.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from .config import deep_merge, make_config
from .errors import UsageError
from .fileio import atomic_write_text, write_json, write_yaml

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
FAILED_FILE = "failed.json"
CELL_FILE = "cell.json"
DEFAULT_SEEDS = (1, 11, 111, 1111, 11111)
"""``seeds: n`` means the first n of these (1, 11, 111 are ReContrast's Table A2 seeds)."""
ID_COLUMNS = ("run", "preset", "category", "seed")
CHECKPOINTS_PER_CELL = 10
"""When a cell's config sets no ``train.checkpoint_every``, checkpoint ~10 times so a killed cell resumes."""


class StudyError(UsageError):
    """A mistake in a study file or its options (reported by the CLI without a traceback)."""


# -- the study file ----------------------------------------------------------------------------------------
@dataclass
class StudyRun:
    """One row of the grid: a preset with its own overrides, shown under ``name``."""

    preset: str
    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.preset.replace("/", "-")


@dataclass
class Study:
    """A study: runs × categories × seeds, with overrides shared by every cell.

    Attributes:
        runs: The compared runs (presets with optional overrides and display names); labels must be unique.
        root: Dataset root (MVTec layout); may also be given as ``overrides["data"]["root"]``.
        categories: Category names, or ``"all"`` for every category found under ``root``.
        seeds: Training seeds, or a count ``n`` meaning the first ``n`` of ``DEFAULT_SEEDS``.
        overrides: Nested config sections applied to every cell (run overrides win over these).
        baseline: Compare every run against this run label only; ``None`` compares every pair of runs.
        name: Display name of the study.
        n_resamples: Bootstrap resamples of the paired differences.
        confidence: Confidence level of the bootstrap interval.
        bootstrap_seed: Seed of the bootstrap, so that tables are reproducible.
    """

    runs: list[StudyRun]
    root: str | None = None
    categories: list[str] | str = "all"
    seeds: list[int] | int = field(default_factory=lambda: list(DEFAULT_SEEDS[:3]))
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    name: str | None = None
    n_resamples: int = 10_000
    confidence: float = 0.95
    bootstrap_seed: int = 0

    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, int):
            if not 1 <= self.seeds <= len(DEFAULT_SEEDS):
                raise StudyError(f"seeds: a count must be 1..{len(DEFAULT_SEEDS)}; list them for more")
            return list(DEFAULT_SEEDS[:self.seeds])
        return [int(s) for s in self.seeds]

    def data_root(self) -> str | None:
        return self.root or (self.overrides.get("data") or {}).get("root")

    def category_list(self) -> list[str]:
        if self.categories == "all":
            from .data import list_categories

            root = self.data_root()
            if not root:
                raise StudyError("categories: 'all' needs the dataset root (root: or --data.root)")
            found = list_categories(root)
            if not found:
                raise StudyError(f"no category folders found under {root}")
            return found
        if isinstance(self.categories, str):
            return [self.categories]
        return list(self.categories)

    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    def validate(self) -> None:
        if not self.runs:
            raise StudyError("a study needs at least one run")
        labels = self.labels()
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise StudyError(f"run names must be unique; repeated: {', '.join(duplicates)} (give each a name:)")
        if self.baseline is not None and self.baseline not in labels:
            raise StudyError(f"baseline {self.baseline!r} is not a run; runs: {', '.join(labels)}")
        if len(set(self.seed_list())) != len(self.seed_list()):
            raise StudyError(f"seeds repeat: {self.seed_list()}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study_from_dict(data: dict[str, Any]) -> Study:
    """A Study from a mapping (a study YAML file); unknown keys are errors."""
    data = dict(data)
    runs = []
    for entry in data.pop("runs", None) or []:
        entry = {"preset": entry} if isinstance(entry, str) else dict(entry)
        unknown = set(entry) - {"preset", "name", "overrides"}
        if unknown or "preset" not in entry:
            raise StudyError(f"a run needs 'preset' and may have 'name', 'overrides'; got keys {sorted(entry)}")
        runs.append(StudyRun(**entry))
    known = set(Study.__dataclass_fields__) - {"runs"}
    unknown = set(data) - known
    if unknown:
        raise StudyError(f"unknown study key(s) {sorted(unknown)}; known: runs, {', '.join(sorted(known))}")
    study = Study(runs=runs, **data)
    study.validate()
    return study


def load_study(path: str | Path) -> Study:
    """Read a study YAML file (see ``docs/studies.md`` for the schema)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise StudyError(f"{path} must hold a mapping (runs:, root:, categories:, seeds:, overrides:)")
    return study_from_dict(data)


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
    from .run import METRICS_FILE, checkpoint_step

    if (run_dir / METRICS_FILE).is_file():
        return "done"
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    if checkpoint_step(run_dir) is not None:
        return "partial"
    return "pending"


def _saved_config_matches(cell: Cell) -> bool:
    from .run import read_run_config

    try:
        return read_run_config(cell.run_dir) == cell.config
    except Exception:  # noqa: BLE001 — an unreadable saved config is a mismatch, reported as such
        return False


def run_cell(cell: Cell, fit: Callable | None = None) -> dict[str, Any]:
    """Run one cell unless it is finished: resume it from its checkpoint, or start it afresh.

    A failure is written to ``failed.json`` in the cell's folder and returned, never raised (the study goes
    on); ``KeyboardInterrupt`` stops the study and leaves the last checkpoint for the next call.
    """
    from . import engine

    fit = fit or engine.fit
    status = cell_status(cell.run_dir)
    if status == "done":
        return {"status": "done", "ran": False}
    resume = status == "partial" and _saved_config_matches(cell)
    if not resume:
        _clear_partial(cell.run_dir)
    (cell.run_dir / FAILED_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        fit(cell.config, cell.run_dir, resume=resume)
    except Exception as err:  # noqa: BLE001 — one failed cell must not stop the others
        log.error("cell %s failed: %s", cell.run_dir, err)
        return _record_failure(cell, err)
    seconds = time.perf_counter() - start
    write_json(cell.run_dir / CELL_FILE, {"run": cell.run, "preset": cell.preset, "category": cell.category,
                                          "seed": cell.seed, "fit_seconds": seconds, "resumed": resume})
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


def check_finished(cells: Sequence[Cell]) -> None:
    """Refuse to mix results: a finished cell must have been trained with the configuration asked for now."""
    stale = [str(c.run_dir) for c in cells if cell_status(c.run_dir) == "done" and not _saved_config_matches(c)]
    if stale:
        raise StudyError(f"{len(stale)} finished cell(s) were trained with another configuration than the study "
                         f"asks for now: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}. Delete them "
                         "to re-run them, or restore the study file.")


def resolved(study: Study) -> Study:
    """The study with its category and seed lists spelled out (what ``study.yaml`` records)."""
    from dataclasses import replace

    return replace(study, categories=study.category_list(), seeds=study.seed_list())


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


def _run_with_ray(cells: list[Cell], ray_options: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError as err:
        raise StudyError("launcher 'ray' needs `pip install ray`") from err
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    remote = ray.remote(**(ray_options or {"num_cpus": 1}))(run_cell)
    return ray.get([remote.remote(cell) for cell in cells])


def run_study(study: Study, output: str | Path, *, launcher: Literal["sequential", "ray"] = "sequential",
              shard: str | tuple[int, int] | None = None, ray_options: dict[str, Any] | None = None,
              fit: Callable | None = None, tables: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) every cell of a study, then write its tables.

    Args:
        study: The study.
        output: The study folder; finished cells found there are not run again.
        launcher: ``sequential`` (this process) or ``ray`` (one Ray task per cell).
        shard: Run only the cells ``i`` with ``i % n == k`` (``"k/n"``) or a torchrun worker's share
            (``"torchrun"``); tables then cover what is on disk so far (``reconad report`` collects all).
        ray_options: ``ray.remote`` resources per cell, e.g. ``{"num_gpus": 1}``.
        fit: The training function (default ``reconad.engine.fit``); tests substitute it.
        tables: Write the result tables after the cells.

    Returns:
        The result rows (see :func:`collect`).
    """
    output = Path(output)
    if shard == "torchrun":
        k, n = parse_shard(shard)
        _torchrun_worker_env()
    else:
        k, n = parse_shard(shard)
    study = resolved(study)
    cells = make_cells(study, output)
    check_finished(cells)
    output.mkdir(parents=True, exist_ok=True)
    if k == 0:
        write_yaml(output / STUDY_FILE, study.to_dict())
    mine = [c for i, c in enumerate(cells) if i % n == k]
    log.info("study %s: %d cells, %d in this shard", output, len(cells), len(mine))
    if launcher == "ray":
        _run_with_ray(mine, ray_options or {})
    elif launcher == "sequential":
        for cell in mine:
            run_cell(cell, fit)
    else:
        raise StudyError(f"launcher must be 'sequential' or 'ray', got {launcher!r}")
    rows = collect(output, study)
    if tables:
        write_tables(output, rows, study)
    return rows


# -- results ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def cell_row(cell: Cell) -> dict[str, Any]:
    """One tidy row: identity, status, error, timing and every metric of the cell."""
    from .run import METRICS_FILE

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
    from .metrics import METRIC_NAMES

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
    from .metrics import MVTEC_AD_GROUPS, VISA_GROUPS

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
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([c[m] for c in cells if _finite(c.get(m))])
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
            if all(_finite(v) for v in values):
                per_seed.append(float(np.mean(values)))
        row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(per_seed)
    return row


def _finite(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and math.isfinite(float(v))


# -- paired comparisons -------------------------------------------------------------------------------------
@dataclass
class PairedResult:
    """``b`` vs ``a`` on one metric over matched cells: differences are ``b - a``."""

    a: str
    b: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    note: str = ""


def bootstrap_ci(diffs: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean paired difference (``scipy.stats.bootstrap``, seeded).

    The percentile method is used because BCa is undefined when all resampled means are equal (n small, ties).
    """
    from scipy.stats import bootstrap

    d = np.asarray(diffs, dtype=float)
    if d.size < 2 or np.all(d == d[0]):
        return (float(d[0]), float(d[0])) if d.size else (math.nan, math.nan)
    options = {"n_resamples": n_resamples, "confidence_level": confidence, "method": "percentile"}
    try:
        res = bootstrap((d,), np.mean, rng=np.random.default_rng(seed), **options)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = bootstrap((d,), np.mean, random_state=np.random.default_rng(seed), **options)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilcoxon_p(diffs: Sequence[float]) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``) and a note.

    Zero differences are dropped (``zero_method="wilcox"``); with no non-zero difference the p-value is NaN.
    The note says when n is too small for p < 0.05 to be attainable at all (exact test: min p = 2 / 2**n).
    """
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=float)
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return math.nan, "all differences are zero: no test"
    p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    notes = []
    if nonzero < d.size:
        notes.append(f"{d.size - nonzero} zero difference(s) dropped")
    if 2.0 / 2**nonzero > 0.05:
        notes.append(f"n={nonzero} non-zero pairs: p < 0.05 is unattainable (min p = {2.0 / 2**nonzero:.3g})")
    return p, "; ".join(notes)


def verdict(a: str, b: str, ci: tuple[float, float], p: float, alpha: float = 0.05) -> str:
    """``b > a`` / ``b < a`` when the CI excludes 0 and p < alpha (higher metric = better), else no evidence."""
    low, high = ci
    if _finite(p) and p < alpha and low > 0:
        return f"{b} better"
    if _finite(p) and p < alpha and high < 0:
        return f"{a} better"
    return "no clear difference"


def paired_comparison(rows: Sequence[dict[str, Any]], a: str, b: str, metric: str, *, n_resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Compare runs ``b`` and ``a`` on ``metric`` over the (category, seed) cells both finished."""
    done = {(r["run"], r["category"], r["seed"]): r.get(metric) for r in _done(rows)}
    keys = sorted({(c, s) for run, c, s in done if run == a} & {(c, s) for run, c, s in done if run == b})
    keys = [k for k in keys if _finite(done[(a, *k)]) and _finite(done[(b, *k)])]
    va = np.array([done[(a, *k)] for k in keys], dtype=float)
    vb = np.array([done[(b, *k)] for k in keys], dtype=float)
    if not keys:
        return PairedResult(a, b, metric, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                            "no matched cells", "no (category, seed) cell finished for both runs")
    d = vb - va
    ci = bootstrap_ci(d, n_resamples, confidence, seed)
    p, note = wilcoxon_p(d)
    if d.size < 2:
        note = "; ".join(filter(None, [note, "one matched cell: no interval"]))
    return PairedResult(a, b, metric, int(d.size), float(va.mean()), float(vb.mean()), float(d.mean()), *ci, p,
                        verdict(a, b, ci, p), note)


def comparison_pairs(labels: Sequence[str], baseline: str | None = None) -> list[tuple[str, str]]:
    """(a, b) pairs: every run against ``baseline``, or every pair in study order (later run as ``b``)."""
    if baseline is not None:
        return [(baseline, b) for b in labels if b != baseline]
    return list(combinations(labels, 2))


def paired_table(rows: Sequence[dict[str, Any]], study: Study | None = None) -> list[PairedResult]:
    labels = study.labels() if study else list(dict.fromkeys(r["run"] for r in rows))
    options = {"n_resamples": study.n_resamples, "confidence": study.confidence,
               "seed": study.bootstrap_seed} if study else {}
    return [paired_comparison(rows, a, b, m, **options)
            for a, b in comparison_pairs(labels, study.baseline if study else None) for m in metric_columns(rows)]


# -- writing ------------------------------------------------------------------------------------------------
def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(output: str | Path, rows: Sequence[dict[str, Any]], study: Study | None = None) -> dict[str, Path]:
    """``results.csv`` / ``results.json``, ``summary.csv`` / ``summary.json``, ``paired.csv`` / ``paired.json``."""
    output = Path(output)
    categories = study.category_list() if study else None
    summary = summarize(rows, categories)
    paired = [asdict(p) for p in paired_table(rows, study)]
    paths = {}
    for name, table in (("results", list(rows)), ("summary", summary), ("paired", paired)):
        paths[f"{name}.csv"] = atomic_write_text(output / f"{name}.csv", _csv_text(table))
        paths[f"{name}.json"] = write_json(output / f"{name}.json", table)
    return paths


# -- command line ---------------------------------------------------------------------------------------------
def parse_sets(assignments: Sequence[str]) -> dict[str, Any]:
    """``["train.iterations=200", "model.loss=regional"]`` → nested overrides (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"--set expects section.key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def parse_seeds(values: Sequence[str] | None) -> list[int] | int | None:
    """One number is a count (``--seeds 3`` = 1, 11, 111); several, or a comma list, are the seeds."""
    if not values:
        return None
    items = [v for value in values for v in str(value).split(",") if v.strip()]
    try:
        seeds = [int(v) for v in items]
    except ValueError as err:
        raise StudyError(f"--seeds expects integers, got {values}") from err
    return seeds[0] if len(values) == 1 and "," not in str(values[0]) else seeds


def study_from_options(study_file: str | None, presets: Sequence[str] | None, names: Sequence[str] | None,
                       root: str | None, categories: Sequence[str] | None, seeds: Sequence[str] | None,
                       sets: Sequence[str], baseline: str | None) -> Study:
    """A study from a study file and/or the command-line shorthand (options given on the command line win)."""
    data = (yaml.safe_load(Path(study_file).read_text()) or {}) if study_file else {}
    if presets:
        names = list(names or [])
        if names and len(names) != len(presets):
            raise StudyError(f"--names needs one name per preset ({len(presets)}), got {len(names)}")
        data["runs"] = [{"preset": p, **({"name": names[i]} if names else {})} for i, p in enumerate(presets)]
    if not data.get("runs"):
        raise StudyError("give a study file or --presets")
    if root:
        data["root"] = root
    if categories:
        data["categories"] = "all" if list(categories) == ["all"] else list(categories)
    parsed_seeds = parse_seeds(seeds)
    if parsed_seeds is not None:
        data["seeds"] = parsed_seeds
    if sets:

        data["overrides"] = deep_merge(data.get("overrides") or {}, parse_sets(sets))
    if baseline:
        data["baseline"] = baseline
    return study_from_dict(data)
