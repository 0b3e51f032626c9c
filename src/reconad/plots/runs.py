"""What the figures need from run folders, read once: log series, schedule, curves, test scores, calibration.

Groups of runs are ``run label -> [RunFiles of each seed]``; the functions here turn them into the mappings the
figure functions in :mod:`.figures` take.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .logs import Schedule, Series, eval_series, read_config, read_log, schedule, train_series

CALIBRATION_FILE = "calibration.json"


@dataclass
class RunFiles:
    run_dir: Path
    config: dict[str, Any]
    schedule: Schedule
    train: dict[str, Series]
    evals: dict[str, tuple[np.ndarray, np.ndarray]]
    curves: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def fpr_limit(self) -> float:
        return float((self.config.get("eval") or {}).get("fpr_limit", 0.3))


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """``calibration.json`` (image/pixel thresholds and score quantiles on held-out normals), if the run has one."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def load_run(run_dir: str | Path) -> RunFiles:
    run_dir = Path(run_dir)
    entries, config = read_log(run_dir), read_config(run_dir)
    sched = schedule(config, entries)
    curves_path = run_dir / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    return RunFiles(run_dir, config, sched, train_series(entries, sched.accumulate),
                    eval_series(entries, sched.accumulate), curves, read_calibration(run_dir))


def test_scores(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of ``test_scores.csv``; empty arrays when the run has none."""
    path = Path(run_dir) / "test_scores.csv"
    if not path.is_file():
        return np.zeros(0), np.zeros(0, int)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows])


def common_steps_per_epoch(groups: Mapping[str, Sequence[RunFiles]]) -> float | None:
    """The epoch length in steps when every run counts epochs with the same length (else no epoch axis)."""
    lengths = {round(f.schedule.steps_per_epoch, 6) if f.schedule.steps_per_epoch else None
               for files in groups.values() for f in files}
    return lengths.pop() if len(lengths) == 1 and None not in lengths else None


def training_panels_data(groups: Mapping[str, Sequence[RunFiles]], exclude: Sequence[str] = ("diversity",)
                         ) -> dict[str, dict[str, list[Series]]]:
    """Panel -> run -> per-seed Series, for panels whose family is not in ``exclude``."""
    panels = list(dict.fromkeys(p for files in groups.values() for f in files for p in f.train
                                if p.split("/", 1)[0] not in exclude))
    return {p: {run: [f.train.get(p, {}) for f in files] for run, files in groups.items()
                if any(p in f.train for f in files)} for p in panels}


def diversity_panels_data(groups: Mapping[str, Sequence[RunFiles]]) -> dict[str, dict[str, list[Series]]]:
    return {p: d for p, d in training_panels_data(groups, exclude=()).items() if p.startswith("diversity")}


def eval_data(groups: Mapping[str, Sequence[RunFiles]]) -> dict[str, dict[str, list[Series]]]:
    """Metric -> run -> per-seed ``{"": (steps, %)}``."""
    metrics = list(dict.fromkeys(m for files in groups.values() for f in files for m in f.evals))
    return {m: {run: [{"": f.evals[m]} for f in files if m in f.evals] for run, files in groups.items()
                if any(m in f.evals for f in files)} for m in metrics}


def encoder_diversity(files: RunFiles) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Level -> diversity of the encoder being trained (ReContrast logs ``diversity/trainable/lk``), or of the
    frozen encoder when the run trains none (Config A)."""
    stream = "diversity/trainable" if "diversity/trainable" in files.train else "diversity/frozen"
    return dict(files.train.get(stream, {}))


def fig5_data(groups: Mapping[str, Sequence[RunFiles]]) -> tuple[dict[str, list[Series]], dict[str, dict]]:
    """(I-AUROC run -> per-seed series, level -> run -> per-seed series) for :func:`.figures.recontrast_fig5`."""
    auroc = {run: [{"": f.evals["image_auroc"]} for f in files if "image_auroc" in f.evals]
             for run, files in groups.items()}
    levels: dict[str, dict[str, list[Series]]] = {}
    for run, files in groups.items():
        for f in files:
            for level, xy in encoder_diversity(f).items():
                levels.setdefault(level, {}).setdefault(run, []).append({"": xy})
    with_diversity = {run for runs in levels.values() for run in runs}  # the ladder presets, not other methods
    return {r: s for r, s in auroc.items() if s and r in with_diversity}, dict(sorted(levels.items()))


def normalise(values: np.ndarray, median: float, threshold: float) -> np.ndarray:
    """Calibrated units: ``(x − median) / (threshold − median)``, so 0 = median normal, 1 = threshold."""
    span = threshold - median
    return (np.asarray(values, float) - median) / (span if span != 0 else 1.0)


def histogram_data(run_dir: str | Path) -> dict[str, Any] | None:
    """Normal and anomalous test scores of a run, in calibrated units with the threshold when calibrated."""
    scores, labels = test_scores(run_dir)
    if not scores.size or len(set(labels.tolist())) < 2:
        return None
    cal = read_calibration(run_dir)
    threshold, units = None, "raw model units"
    if cal and cal.get("image_threshold") is not None:
        median = (cal.get("score_quantiles") or {}).get("0.5")
        if median is not None:
            scores = normalise(scores, float(median), float(cal["image_threshold"]))
            threshold, units = 1.0, "calibrated; 0 = median normal, 1 = threshold"
        else:
            threshold = float(cal["image_threshold"])
    return {"normal": scores[labels == 0], "anomalous": scores[labels == 1], "threshold": threshold, "units": units}
