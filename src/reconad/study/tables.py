"""The study's tables: results.csv / results.json, summary.csv, paired.csv."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, write_json
from .definition import Study
from .results import summarize
from .stats import paired_table

log = logging.getLogger(__name__)


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
