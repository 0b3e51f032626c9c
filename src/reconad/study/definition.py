"""The study definition: runs (presets + overrides) × categories × seeds, its file, how it grows, and the
command-line shorthands."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import deep_merge, make_config
from ..errors import UsageError

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
            from ..data import list_categories

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


def resolved(study: Study) -> Study:
    """The study with its category and seed lists spelled out (what ``study.yaml`` records)."""
    from dataclasses import replace

    return replace(study, categories=study.category_list(), seeds=study.seed_list())


def finite_number(v: Any) -> bool:
    """A finite metric value (not None, NaN, inf or a bool): what tables, summaries and reports may average."""
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(float(v))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
