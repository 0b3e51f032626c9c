"""Reading a run folder's ``log.jsonl`` into plottable series, on the optimiser-step axis.

Train entries are ``{"batch", "step", "epoch", "kind": "train", "lr": [...], loss terms ...}``; older logs have no
``step``, which is then ``batch // train.accumulate`` (RD++ steps every 2 batches: plotted against batches it
would look twice as long). Keys are grouped into panels by their name: ``loss/frozen/l2`` is level ``l2`` of
panel ``loss/frozen``, ``loss/frozen`` is that panel's total, ``diversity/trainable/l1`` level ``l1`` of panel
``diversity/trainable``; the learning-rate list is panel ``lr`` with one line per parameter group.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SKIP = {"batch", "batches", "step", "steps", "epoch", "kind", "epoch_end", "dropped"}
LEVEL = re.compile(r"^(?:l|layer|level)\d+$")
Series = dict[str, tuple[np.ndarray, np.ndarray]]  # level -> (x, y)


@dataclass(frozen=True)
class Schedule:
    """How a run counts training: batches per optimiser step, and the epoch length in steps (epoch recipes)."""

    accumulate: int = 1
    epochs: int | None = None
    steps_per_epoch: float | None = None


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Entries of ``log.jsonl`` (an incomplete last line, cut by a kill, is dropped)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def schedule(config: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> Schedule:
    """The run's schedule from its config; an epoch recipe (``train.epochs``, no iterations/steps) also gets
    the epoch length, from the last logged step of a finished run (the last train entry is the last batch)."""
    train = config.get("train") or {}
    accumulate = max(1, int(train.get("accumulate") or 1))
    epochs = train.get("epochs") if train.get("iterations") is None and train.get("steps") is None else None
    if not epochs:
        return Schedule(accumulate)
    last = [e for e in entries if e.get("kind") == "train"]
    if not last or int(last[-1].get("epoch", -1)) != int(epochs) - 1:
        return Schedule(accumulate, int(epochs))  # unfinished: the epoch length is not known from the log
    return Schedule(accumulate, int(epochs), step_of(last[-1], accumulate) / int(epochs))


def step_of(entry: Mapping[str, Any], accumulate: int = 1) -> float:
    """Optimiser steps done at a log entry."""
    for key in ("step", "steps"):
        if isinstance(entry.get(key), int | float):
            return float(entry[key])
    batch = entry.get("batch", entry.get("batches"))
    return float(batch) // max(1, accumulate) if isinstance(batch, int | float) else math.nan


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def panel_and_level(key: str) -> tuple[str, str]:
    """``loss/frozen/l2`` → (``loss/frozen``, ``l2``); ``loss/frozen`` → (``loss/frozen``, ``""``: total)."""
    head, _, last = key.rpartition("/")
    return (head, last) if head and LEVEL.match(last) else (key, "")


def _arrays(points: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, Series]:
    return {p: {lv: (np.array([x for x, _ in pts]), np.array([y for _, y in pts])) for lv, pts in levels.items()}
            for p, levels in points.items()}


def train_series(entries: Sequence[Mapping[str, Any]], accumulate: int = 1) -> dict[str, Series]:
    """Panel -> level -> (optimiser steps, values) of every logged training quantity."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for e in entries:
        if e.get("kind") != "train":
            continue
        x = step_of(e, accumulate)
        for key, value in e.items():
            if key in SKIP:
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if _number(v):
                        points.setdefault(key, {}).setdefault(f"group {i}", []).append((x, float(v)))
            elif _number(value):
                panel, level = panel_and_level(key)
                points.setdefault(panel, {}).setdefault(level, []).append((x, float(value)))
    return _arrays(points)


def eval_series(entries: Sequence[Mapping[str, Any]], accumulate: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metric -> (optimiser steps, value in %) of the periodic ``eval`` entries and the ``final`` one."""
    points: dict[str, dict[float, float]] = {}
    for e in entries:
        if e.get("kind") not in ("eval", "final"):
            continue
        x = step_of(e, accumulate)
        for key, value in e.items():
            if key not in SKIP and _number(value):
                points.setdefault(key, {})[x] = 100.0 * float(value)  # a final entry at the last eval's step wins
    return {k: (np.array(sorted(p)), np.array([p[x] for x in sorted(p)])) for k, p in points.items()}


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and min/max over seeds at the x values all seeds share (seeds log at the same steps)."""
    common = curves[0][0]
    for x, _ in curves[1:]:
        common = np.intersect1d(common, x)
    ys = np.stack([y[np.searchsorted(x, common)] for x, y in curves])
    return common, ys.mean(0), np.stack([ys.min(0), ys.max(0)])
