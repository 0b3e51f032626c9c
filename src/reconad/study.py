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

import csv
import io
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
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
CLAIMS_DIR = ".claims"
"""Work-queue claims live beside the cells (a cell's own folder is emptied when it starts afresh)."""
ORDERS = ("grid", "seed", "category")
"""Cell order: ``grid`` (run, category, seed), ``seed`` (every run and category of a seed before the next seed:
paired comparisons early), ``category`` (every run and seed of a category before the next)."""
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
    history: list[dict[str, Any]] = field(default_factory=list)
    """When each part of a grown study was added: ``{"added": ISO time, "runs": [...], "categories": [...],
    "seeds": [...]}`` per call that extended it (written by :func:`merge_studies`)."""

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
            found = list_categories(root, **self._layout())
            if not found:
                raise StudyError(f"no category folders found under {root}")
            return found
        if isinstance(self.categories, str):
            return [self.categories]
        return list(self.categories)

    def _layout(self) -> dict[str, str]:
        layout = (self.overrides.get("data") or {}).get("layout")
        if layout is None and self.runs:  # the first run's preset says which dataset layout it reads
            try:
                layout = make_config(self.runs[0].preset, **self.runs[0].overrides).data.layout
            except UsageError:
                layout = None
        return {"layout": layout} if layout else {}

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


def run_cell(cell: Cell, fit: Callable | None = None, desc: str | None = None) -> dict[str, Any]:
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
    from .config import config_to_dict
    from .run import read_run_config

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


def resolved(study: Study) -> Study:
    """The study with its category and seed lists spelled out (what ``study.yaml`` records)."""
    from dataclasses import replace

    return replace(study, categories=study.category_list(), seeds=study.seed_list())


# -- a study folder grows -----------------------------------------------------------------------------------
def merge_studies(saved: Study | None, new: Study, when: str | None = None) -> Study:
    """The union of a folder's study and a later call: runs, categories and seeds are added (never removed).

    Settings shared by every cell (overrides, baseline, statistics options) are the new call's; a run label given
    again takes the new definition. Whether that changes a finished cell is checked on the cells
    (:func:`check_finished`), so only contradictions with trained cells are refused.
    """
    from dataclasses import replace

    new = resolved(new)
    when = when or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if saved is None:
        return replace(new, history=[{"added": when, "runs": new.labels(), "categories": list(new.categories),
                                      "seeds": list(new.seeds)}])
    saved = resolved(saved)
    by_label = {r.label: r for r in saved.runs} | {r.label: r for r in new.runs}
    runs = [by_label[label] for label in dict.fromkeys([*saved.labels(), *new.labels()])]
    categories = list(dict.fromkeys([*saved.categories, *new.categories]))
    seeds = list(dict.fromkeys([*saved.seeds, *new.seeds]))
    added = {"runs": [x for x in new.labels() if x not in saved.labels()],
             "categories": [c for c in new.categories if c not in saved.categories],
             "seeds": [s for s in new.seeds if s not in saved.seeds]}
    history = list(saved.history) + ([{"added": when, **added}] if any(added.values()) else [])
    merged = replace(new, runs=runs, categories=categories, seeds=seeds, history=history)
    merged.validate()
    return merged


def _saved_study(output: Path) -> Study | None:
    path = output / STUDY_FILE
    return load_study(path) if path.is_file() else None


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
    from .validation import validate_study_cells

    validate_study_cells({f"{c.run}/{c.category}/seed{c.seed}": c.config for c in cells})


# -- the console ---------------------------------------------------------------------------------------------
class CellReporter:
    """One line per cell as it starts and ends, with an ETA for the study (log level INFO of ``reconad.study``,
    which ``reconad study`` shows by default): ``cell 3/18 recontrast/full · grass · seed 1 — done in 3 min 02 s,
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
        from .progress import format_duration
        from .run import METRICS_FILE

        if result.get("status") == "failed":
            text = f"failed after {format_duration(seconds)}: {result.get('error', '')}"
        else:
            self.durations.append(seconds)
            auroc = _read_json(cell.run_dir / METRICS_FILE).get("metrics", {}).get("image_auroc")
            text = f"done in {format_duration(seconds)}" + (f", I-AUROC {100 * auroc:.1f}" if _finite(auroc) else "")
        log.info("%s — %s%s", self.name(cell), text, self.eta())

    def eta(self) -> str:
        from .progress import format_duration

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


# -- the shared work queue -----------------------------------------------------------------------------------
@dataclass
class Claim:
    """A worker's claim of one cell: ``<study>/.claims/<run>__<category>__seed<k>.json`` created with
    ``O_CREAT | O_EXCL`` (only one worker can create it), holding host, pid and a heartbeat that a thread renews;
    a claim whose heartbeat is older than ``stale_seconds`` belongs to a dead worker and is taken over."""

    path: Path
    token: str
    heartbeat_seconds: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def body(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                if _read_claim(self.path).get("token") != self.token:
                    log.warning("claim %s was taken over by another worker", self.path)
                    return
                write_json(self.path, self.body())

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if _read_claim(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def claim_path(output: Path, cell: Cell) -> Path:
    safe_run = cell.run.replace("/", "-")
    return output / CLAIMS_DIR / f"{safe_run}__{cell.category}__seed{cell.seed}.json"


def _read_claim(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or caught between two atomic renames: no claim to honour
        return {}


def _create_claim(path: Path, claim: Claim) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(claim.body(), fh)
    return True


def try_claim(output: Path, cell: Cell, heartbeat_seconds: float, stale_seconds: float) -> Claim | None:
    """Claim ``cell`` for this process, taking over a stale claim; ``None`` when another live worker holds it."""
    path = claim_path(output, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim(path, uuid.uuid4().hex, heartbeat_seconds)
    if _create_claim(path, claim):
        return claim
    held = _read_claim(path)
    if not held or time.time() - float(held.get("heartbeat", 0)) < stale_seconds:
        return None
    # Stale: move it aside atomically (one worker wins the rename), check that what was moved is the stale claim
    # judged above (not a fresh claim another worker made meanwhile; that one is put back), then claim anew
    aside = path.with_name(f"{path.name}.stale-{claim.token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    moved = _read_claim(aside)
    if moved.get("token") != held.get("token"):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return None
    aside.unlink(missing_ok=True)
    log.warning("taking over %s/%s/seed%d from %s pid %s (no heartbeat for %.0f s)", cell.run, cell.category,
                cell.seed, held.get("host"), held.get("pid"), time.time() - float(held.get("heartbeat", 0)))
    return claim if _create_claim(path, claim) else None


def run_worker(cells: list[Cell], output: Path, reporter: CellReporter, fit: Callable | None = None,
               heartbeat_seconds: float = 30.0, stale_seconds: float | None = None,
               poll_seconds: float | None = None) -> None:
    """Take the next unclaimed cell until every cell is done or failed (waiting while live workers hold some).

    Failed cells are not retried by workers (``failed.json``); a plain ``reconad study`` call retries them.
    """
    stale_seconds = stale_seconds or 4 * heartbeat_seconds
    poll_seconds = poll_seconds or heartbeat_seconds
    while True:
        open_cells = [c for c in cells if cell_status(c.run_dir) not in ("done", "failed")]
        if not open_cells:
            return
        ran = False
        for cell in open_cells:
            claim = try_claim(output, cell, heartbeat_seconds, stale_seconds)
            if claim is None:
                continue
            try:
                if cell_status(cell.run_dir) not in ("done", "failed"):  # finished while we looked: skip it
                    claim.start_heartbeat()
                    _run_reported(cell, reporter, fit)
                    ran = True
            finally:
                claim.release()
            break
        if not ran:
            time.sleep(poll_seconds)  # the open cells are held by live workers: wait for them or their heartbeat


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
