"""The Python API; it mirrors the command line (``reconad fit`` ↔ :func:`fit`, and so on)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import make_config
from .engine import RunResult, load, predict, read_run_config
from .engine import evaluate as _evaluate
from .engine import fit as _fit

__all__ = ["demo", "evaluate", "fit", "load", "make_config", "predict", "resume"]


def fit(preset: str = "rd4ad", *, run_dir: str | Path | None = None, **sections: Any) -> RunResult:
    """Train from a preset with overrides per config section.

    ``reconad.fit("rd4ad", data={"root": "mvtec", "category": "bottle"}, train={"epochs": 5})``
    """
    return _fit(make_config(preset, **sections), run_dir)


def resume(run_dir: str | Path) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with its saved configuration."""
    return _fit(read_run_config(run_dir), run_dir, resume=True)


def evaluate(run_dir: str | Path, device: str = "cpu", **data_overrides: Any) -> dict[str, float]:
    """Metrics of a trained run on its test set; ``data_overrides`` select another root or category."""
    return _evaluate(run_dir, data_overrides, device=device)


def demo(output_dir: str | Path = "runs/demo", categories: Sequence[str] | None = None,
         threads: int | None = None, **sections: Any) -> dict[str, RunResult]:
    """Train RD4AD with the offline EfficientNet-Lite0 backbone on each built-in demo category."""
    from .data.demo import DEMO_CATEGORIES, ensure_demo_data

    unknown = sorted(set(categories or ()) - set(DEMO_CATEGORIES))
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; choose from {', '.join(DEMO_CATEGORIES)}")
    root = ensure_demo_data()
    train = {**sections.pop("train", {}), **({"threads": threads} if threads else {})}
    data = sections.pop("data", {})
    results = {}
    for category in categories or DEMO_CATEGORIES:
        cfg = make_config("demo", data={**data, "root": str(root), "category": category}, train=train, **sections)
        run_dir = Path(output_dir) / category
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo's own folder: always a fresh run
        results[category] = _fit(cfg, run_dir)
    return results
