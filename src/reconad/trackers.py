"""Optional experiment trackers (TensorBoard, MLflow) fed with the same records as ``log.jsonl``.

``log.jsonl`` stays the ground truth: trackers are a copy for people who follow long studies in the tools they
already use. Each run (each study cell) is one tracker run:

* ``tensorboard`` — event files in ``<run_dir>/tensorboard/`` (``torch.utils.tensorboard``); view them with
  ``tensorboard --logdir <study or run folder>``.
* ``mlflow`` — a run in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``reconad``) of the tracking store
  ``$MLFLOW_TRACKING_URI``, or of a local file store ``<run_dir>/mlruns`` when it is unset (MLflow's file store
  is in maintenance mode: using it sets ``MLFLOW_ALLOW_FILE_STORE=true`` unless already set). The MLflow run id
  is kept in ``<run_dir>/mlflow_run.json`` so a resumed run continues the same MLflow run.

Usage (the engine)::

    trackers = open_trackers(cfg.train.loggers, run_dir, config_to_dict(cfg))
    trackers.log_entry(entry)          # for every record written to log.jsonl
    trackers.close()

Install with ``pip install reconad[track]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

KNOWN = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_FILE = "mlflow_run.json"
_NOT_METRICS = {"batch", "batches", "step", "steps", "epoch", "kind", "epoch_end"}


def logger_names(loggers: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` or a list → checked, de-duplicated names."""
    if not loggers:
        return []
    items = loggers.split(",") if isinstance(loggers, str) else [n for x in loggers for n in str(x).split(",")]
    names = list(dict.fromkeys(n.strip().lower() for n in items if n.strip()))
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ConfigError(f"train.loggers: unknown logger(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    return names


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": [1, 2]}}`` → ``{"train.lr": "[1, 2]"}``-style flat params (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers of a record; a list (the learning rate per parameter group) becomes ``name/<i>``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        values = list(enumerate(value)) if isinstance(value, list | tuple) else [(None, value)]
        for i, v in values:
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[key if i is None else f"{key}/{i}"] = float(v)
    return out


def entry_step(entry: Mapping[str, Any], accumulate: int = 1) -> int:
    """Optimiser steps of a ``log.jsonl`` record (``step``, else ``batch // accumulate``)."""
    for key in ("step", "steps"):
        if isinstance(entry.get(key), int | float):
            return int(entry[key])
    return int(entry.get("batch", entry.get("batches", 0)) or 0) // max(1, accumulate)


def entry_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record under its kind: ``train/loss``, ``train/lr/0``, ``eval/image_auroc``, ...,
    plus ``epoch``."""
    kind = entry.get("kind", "train")
    out = {f"{kind}/{k}": v for k, v in scalars({k: v for k, v in entry.items() if k not in _NOT_METRICS}).items()}
    if isinstance(entry.get("epoch"), int | float):
        out["epoch"] = float(entry["epoch"])
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("train.loggers: tensorboard needs `pip install reconad[track]` (tensorboard)") from err
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))  # markdown code

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _MLflow:
    """One MLflow run through ``MlflowClient`` (no global "active run": cells of a study never mix)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ConfigError("train.loggers: mlflow needs `pip install reconad[track]` (mlflow-skinny)") from err
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or self._local_store(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._resume(run_dir) or self._create(run_dir, config)

    @staticmethod
    def _local_store(run_dir: Path) -> str:
        # MLflow >= 3.7 keeps its file store in maintenance mode behind an opt-in variable; the local default here
        # opts in (a database store needs the full `mlflow` package: set MLFLOW_TRACKING_URI=sqlite:///... then)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (run_dir / MLFLOW_DIR).resolve().as_uri()

    def _resume(self, run_dir: Path) -> str | None:
        path = run_dir / MLFLOW_RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.uri:
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return saved["run_id"]

    def _create(self, run_dir: Path, config: Mapping[str, Any]) -> str:
        from .fileio import write_json

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "reconad")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        data, train = config.get("data") or {}, config.get("train") or {}
        tags = {"reconad.method": config.get("method"), "reconad.category": data.get("category"),
                "reconad.seed": train.get("seed"), "reconad.run_dir": str(run_dir.resolve())}
        run = self.client.create_run(experiment_id, run_name=config.get("name") or run_dir.name,
                                     tags={k: str(v) for k, v in tags.items() if v is not None})
        write_json(run_dir / MLFLOW_RUN_FILE, {"tracking_uri": self.uri, "run_id": run.info.run_id,
                                               "experiment_id": experiment_id})
        return run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        existing = set(self.client.get_run(self.run_id).data.params)  # a resumed run has them: params are immutable
        params = [p for p in params if p.key not in existing]
        for start in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class Trackers:
    """The opened trackers as one: every call goes to each of them (none opened: every call does nothing)."""

    def __init__(self, backends: Iterable[Any] = (), accumulate: int = 1):
        self.backends, self.accumulate = list(backends), accumulate

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = scalars(metrics)
        if values:
            for backend in self.backends:
                backend.log_metrics(values, int(step))

    def log_entry(self, entry: Mapping[str, Any]) -> None:
        """One ``log.jsonl`` record, keys under its kind (``train/…``, ``eval/…``, ``final/…``), at its step."""
        self.log_metrics(entry_metrics(entry), entry_step(entry, self.accumulate))

    def log_config(self, config: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.log_config(config)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trackers(names: str | Sequence[str] | None, run_dir: str | Path,
                  config_dict: Mapping[str, Any] | None = None) -> Trackers:
    """Open the trackers named in ``train.loggers`` for one run folder and log its resolved config.

    Raises:
        ConfigError: an unknown name, or a tracker whose package is not installed.
    """
    run_dir = Path(run_dir)
    config = dict(config_dict or {})
    backends = []
    for name in logger_names(names):
        backends.append(_TensorBoard(run_dir) if name == "tensorboard" else _MLflow(run_dir, config))
    trackers = Trackers(backends, int((config.get("train") or {}).get("accumulate") or 1))
    if config:
        trackers.log_config(config)
    return trackers
