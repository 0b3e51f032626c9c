"""Paired comparisons between runs over the same (category, seed) cells: bootstrap CI, Wilcoxon p, verdict."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from .definition import Study, finite_number
from .results import _done, metric_columns

log = logging.getLogger(__name__)


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
    if finite_number(p) and p < alpha and low > 0:
        return f"{b} better"
    if finite_number(p) and p < alpha and high < 0:
        return f"{a} better"
    return "no clear difference"


def paired_comparison(rows: Sequence[dict[str, Any]], a: str, b: str, metric: str, *, n_resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Compare runs ``b`` and ``a`` on ``metric`` over the (category, seed) cells both finished."""
    done = {(r["run"], r["category"], r["seed"]): r.get(metric) for r in _done(rows)}
    keys = sorted({(c, s) for run, c, s in done if run == a} & {(c, s) for run, c, s in done if run == b})
    keys = [k for k in keys if finite_number(done[(a, *k)]) and finite_number(done[(b, *k)])]
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
