"""What the results page shows of a study or run folder, read from saved files only (nothing is trained).

A study folder's tables come from its ``results.csv`` / ``summary.csv`` / ``paired.csv``; a run folder or a
folder of run folders without them gets a table built from each run's ``metrics.json``. Figures are the PNGs
under each ``plots/`` and the overlays under ``overlays/`` (and ``test_overlays/``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..errors import RunFolderError
from ..run import CONFIG_FILE, METRICS_FILE

TABLE_FILES = ("summary.csv", "paired.csv", "results.csv")
FIGURE_DIRS = ("plots",)
OVERLAY_DIRS = ("overlays", "test_overlays")
SERVED_SUFFIXES = {".png", ".csv", ".json", ".svg"}
MAX_OVERLAYS = 12
MAX_DEPTH = 4


def is_results_folder(path: Path) -> bool:
    """A study (``study.yaml``), or a folder that holds run folders without being one itself."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return False
    return (path / "study.yaml").is_file() or any(t for t in TABLE_FILES if (path / t).is_file()) \
        or bool(run_folders(path))


def run_folders(root: Path) -> list[Path]:
    if (root / CONFIG_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG_FILE) if len(p.relative_to(root).parts) <= MAX_DEPTH)


def _cell(value: str) -> Any:
    """CSV text → number where it is one (so the page can format and sort it), else the text."""
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else None


def read_csv_table(path: Path) -> dict[str, Any]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = [[_cell(v) for v in row] for row in reader]
    return {"name": path.stem, "source": path.name, "columns": header, "rows": rows}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError as err:
        raise RunFolderError(f"{path} is not valid YAML ({err})") from err
    return data if isinstance(data, dict) else {}


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err})") from err
    metrics = saved.get("metrics", saved) if isinstance(saved, dict) else {}
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _files(root: Path, folder: Path, dirs: tuple[str, ...], limit: int | None = None) -> list[str]:
    found = [p for d in dirs for p in sorted((folder / d).glob("*.png"))]
    return [p.relative_to(root).as_posix() for p in found[:limit]]


def describe_run(root: Path, run_dir: Path) -> dict[str, Any]:
    cfg = _read_yaml(run_dir / CONFIG_FILE)
    rel = run_dir.relative_to(root).as_posix() if run_dir != root else "."
    return {
        "name": rel if rel != "." else run_dir.name, "path": rel,
        "method": cfg.get("method", ""), "category": (cfg.get("data") or {}).get("category", ""),
        "backbone": (cfg.get("backbone") or {}).get("name", ""), "seed": (cfg.get("train") or {}).get("seed"),
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in _read_metrics(run_dir).items()},
        "figures": _files(root, run_dir, FIGURE_DIRS), "overlays": _files(root, run_dir, OVERLAY_DIRS, MAX_OVERLAYS),
    }


def metrics_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    columns = ["run", "method", "category", "seed", *names]
    rows = [[r["name"], r["method"], r["category"], r["seed"], *(r["metrics"].get(k) for k in names)] for r in runs]
    return {"name": "metrics", "source": METRICS_FILE, "columns": columns, "rows": rows}


def gather_results(path: str | Path) -> dict[str, Any]:
    """Tables, study-level figures and per-run figures/overlays of ``path`` (paths relative to it)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise RunFolderError(f"{path} is not a folder; give a study folder, a run folder or a folder of runs")
    runs = [describe_run(root, d) for d in run_folders(root)]
    tables = [read_csv_table(root / t) for t in TABLE_FILES if (root / t).is_file()]
    if not tables and runs:
        tables = [metrics_table(runs)]
    if not tables and not runs:
        raise RunFolderError(f"{path} holds no results ({', '.join(TABLE_FILES)}) and no run folder "
                             f"({CONFIG_FILE}); point reconad serve at a study or run folder")
    return {"title": root.name, "tables": tables, "figures": _files(root, root, FIGURE_DIRS), "runs": runs}


def served_file(root: str | Path, relative: str) -> Path | None:
    """The file ``relative`` under ``root`` when it may be served (inside root, a figure or table), else None."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target.suffix.lower() not in SERVED_SUFFIXES or not target.is_file():
        return None
    return target
