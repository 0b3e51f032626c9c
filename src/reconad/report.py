"""Reports of a study (or of run folders): ``report.html`` (self-contained, opens offline) and ``report.md``.

Everything is read from saved files — ``study.yaml`` and each run folder's ``metrics.json``, ``log.jsonl``,
``curves.json``, ``test_scores.csv``, ``calibration.json``, ``examples/`` or ``overlays/`` — so
``reconad report DIR`` never trains. The report leads with the answer to the study's question (the paired
comparisons: verdict, difference with its confidence interval, p-value), then the per-category tables, then the
curves and the examples. Every figure is drawn in the house style (:mod:`reconad.plots.style`) and written to
``report_files/`` as PNG and SVG; ``report.md`` links the PNGs by relative path, ``report.html`` embeds them.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import plots
from . import study as st
from .errors import RunFolderError
from .plots import figures as pf
from .plots import runs as pr
from .plots import style
from .study.definition import finite_number

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
EXAMPLE_DIRS = ("examples", "overlays")  # example panels (reconad.visualize.write_examples), else bare overlays
OVERLAY_NAME = re.compile(r"^(?P<index>\d+)_.*_score(?P<score>[-+0-9.eE]+|nan|inf)\.png$")


@dataclass
class ReportData:
    """What a report shows: result rows (one per cell) and where each cell's run folder is."""

    title: str
    rows: list[dict[str, Any]]
    study: st.Study | None = None
    categories: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[str]:
        return self.study.labels() if self.study else list(dict.fromkeys(r["run"] for r in self.rows))

    def run_dirs(self, run: str, category: str) -> list[Path]:
        return [Path(r["run_dir"]) for r in self.rows if r["run"] == run and r["category"] == category
                and r["status"] == "done"]


# -- gathering ----------------------------------------------------------------------------------------------
def _run_folders(root: Path) -> list[Path]:
    if (root / "config.yaml").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("config.yaml") if len(p.relative_to(root).parts) <= 4)


def _folder_row(run_dir: Path, root: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    saved = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    category = (cfg.get("data") or {}).get("category") or run_dir.name
    # several runs of one method side by side: tell them apart by their folder (without the category level)
    rel = run_dir.relative_to(root).parts if run_dir != root else (run_dir.name,)
    run = "/".join(p for p in rel if p != category) or cfg.get("method", "run")
    row = {"run": run, "preset": cfg.get("method", ""), "category": category,
           "seed": (cfg.get("train") or {}).get("seed"), "status": "done" if saved else st.cell_status(run_dir),
           "error": "", "run_dir": str(run_dir)}
    if saved:
        row["batches"] = saved.get("batches")
        row.update(saved.get("metrics", {}))
    return row


def gather(path: str | Path) -> ReportData:
    """Rows of a study folder (``study.yaml``), one run folder, or a folder of run folders."""
    path = Path(path)
    if (path / st.STUDY_FILE).is_file():
        study = st.study_from_dict(yaml.safe_load((path / st.STUDY_FILE).read_text()))
        return ReportData(study.name or path.name, st.collect(path, study), study, study.category_list())
    folders = _run_folders(path)
    if not folders:
        raise RunFolderError(f"{path} holds no study ({st.STUDY_FILE}) and no run folder (config.yaml); "
                             "give `reconad report` a study or run folder")
    rows = [_folder_row(f, path) for f in folders]
    return ReportData(path.name, rows, None, list(dict.fromkeys(r["category"] for r in rows)))


# -- numbers as text ----------------------------------------------------------------------------------------
def pct(mean: Any, std: Any = None) -> str:
    """``98.5 ± 0.3`` (values ×100); ``–`` when missing (tables say why in their note)."""
    if not finite_number(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if finite_number(std) else f"{100 * mean:.1f}"


def _signed(v: float) -> str:
    return f"{100 * v:+.2f}" if finite_number(v) else "–"


def _p(v: Any) -> str:
    if not finite_number(v):
        return "–"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


# -- means over the categories that have a metric -----------------------------------------------------------
@dataclass
class CategoryMean:
    """A run's mean of one metric over the categories that have it, mean ± sample std over seeds."""

    mean: float
    std: float
    n_seeds: int
    used: list[str]
    missing: list[str]


def category_mean(rows: Sequence[Mapping[str, Any]], run: str, metric: str, categories: Sequence[str]
                  ) -> CategoryMean:
    """Mean over the categories where ``run`` has ``metric`` (image-level categories have no pixel metrics).

    Like :func:`reconad.study.summarize` the categories are averaged per seed first, over the seeds finished in
    every used category, so ± is the seed-to-seed std of the reported mean.
    """
    done = [r for r in rows if r["run"] == run and r.get("status") == "done" and r["category"] in categories]
    used = [c for c in categories if any(r["category"] == c and finite_number(r.get(metric)) for r in done)]
    missing = [c for c in categories if c not in used]
    by_seed: dict[Any, dict[str, float]] = {}
    for r in done:
        if r["category"] in used and finite_number(r.get(metric)):
            by_seed.setdefault(r["seed"], {})[r["category"]] = float(r[metric])
    per_seed = [float(np.mean([v[c] for c in used])) for v in by_seed.values() if used and set(v) >= set(used)]
    mean = float(np.mean(per_seed)) if per_seed else math.nan
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
    return CategoryMean(mean, std, len(per_seed), used, missing)


def _coverage(cm: CategoryMean, n: int) -> str:
    return "" if not cm.missing else f" ({len(cm.used)}/{n})"


def _means_text(cm: CategoryMean, n: int) -> str:
    if not cm.used:
        return "n/a"
    if not finite_number(cm.mean):
        return "no seed in all"
    return pct(cm.mean, cm.std) + _coverage(cm, n)


def _coverage_notes(rows, runs, metrics, categories) -> list[str]:
    notes = []
    for m in metrics:
        for run in runs:
            cm = category_mean(rows, run, m, categories)
            if cm.used and cm.missing:
                cells = {r["category"] for r in rows if r["run"] == run and r.get("status") == "done"}
                no_cell = [c for c in cm.missing if c not in cells]
                no_metric = [c for c in cm.missing if c in cells]
                why = "; ".join(x for x in (f"no such metric in {', '.join(no_metric)}" if no_metric else "",
                                            f"no finished cell in {', '.join(no_cell)}" if no_cell else "") if x)
                notes.append(f"{run} · {style.metric_name(m)}: mean over {len(cm.used)} of {len(categories)} "
                             f"categories ({', '.join(cm.used)}); {why}")
            elif cm.used and not finite_number(cm.mean):
                notes.append(f"{run} · {style.metric_name(m)}: no seed finished in every category "
                             f"({', '.join(cm.used)}), so no mean")
    return notes


# -- tables: (header, rows of cells) --------------------------------------------------------------------------
Table = tuple[list[str], list[list[str]]]


def summary_table(rows: Sequence[Mapping[str, Any]], runs: Sequence[str], metrics: Sequence[str],
                  categories: Sequence[str]) -> Table:
    """Per run: the mean over the categories that have each metric, mean ± std over seeds (``(k/n)``: the mean
    covers k of the n categories)."""
    out = []
    for run in runs:
        means = [category_mean(rows, run, m, categories) for m in metrics]
        seeds = max((cm.n_seeds for cm in means), default=0)
        out.append([run, str(seeds), *(_means_text(cm, len(categories)) for cm in means)])
    return ["run", "seeds", *(style.metric_name(m) for m in metrics)], out


def per_category_table(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], metric: str,
                       runs: Sequence[str], categories: Sequence[str]) -> Table:
    """One metric: a row per category, a column per run (mean ± std over seeds; ``no cell`` where the run has
    no finished cell, ``n/a`` where the category has no such metric), then the means over categories."""
    by = {(r["run"], r["category"]): r for r in summary}

    def cell(run: str, category: str) -> str:
        if (run, category) not in by:
            return "no cell"
        r = by[(run, category)]
        return pct(r[f"{metric}_mean"], r[f"{metric}_std"]) if finite_number(r[f"{metric}_mean"]) else "n/a"

    table = [[c, *(cell(run, c) for run in runs)] for c in categories]
    groups = {"mean": list(categories), **{f"mean ({g})": m for g, m in st.category_groups(categories).items()}}
    for label, members in groups.items():
        table.append([label, *(_means_text(category_mean(rows, run, metric, members), len(members))
                               for run in runs)])
    return ["category", *runs], table


def paper_layout_table(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], run: str,
                       metrics: Sequence[str], categories: Sequence[str]) -> Table:
    """The papers' layout for one run: category rows (then the means over categories and groups), metric
    columns, mean over seeds (%); ``n/a`` where a category has no such metric."""
    by = {r["category"]: r for r in summary if r["run"] == run}
    table = [[c, *(pct(by[c][f"{m}_mean"]) if finite_number(by[c][f"{m}_mean"]) else "n/a" for m in metrics)]
             for c in categories if c in by]
    if not table:
        return [], []
    present = [c for c in categories if c in by]
    groups = {"mean": present, **{f"mean ({g})": m for g, m in st.category_groups(present).items()}}
    for label, members in groups.items():
        means = [category_mean(rows, run, m, members) for m in metrics]
        table.append([label, *((pct(cm.mean) + _coverage(cm, len(members))) if finite_number(cm.mean) else "n/a"
                               for cm in means)])
    return ["category", *(style.metric_name(m) for m in metrics)], table


def paired_table_rows(paired: Sequence[st.PairedResult]) -> Table:
    header = ["A", "B", "metric", "n", "mean A", "mean B", "B − A (pp)", "95% CI (pp)", "Wilcoxon p", "verdict",
              "note"]
    rows = [[p.a, p.b, p.metric, str(p.n), pct(p.mean_a), pct(p.mean_b), _signed(p.diff),
             f"[{_signed(p.ci_low)}, {_signed(p.ci_high)}]", _p(p.p_value), p.verdict, p.note] for p in paired]
    return header, rows


def verdict_sentences(paired: Sequence[st.PairedResult], confidence: float = 0.95) -> list[str]:
    """One sentence per comparison: the answer first, then the effect and its uncertainty."""
    out = []
    for p in paired:
        if not p.n:
            out.append(f"{p.b} vs {p.a}, {style.metric_name(p.metric)}: {p.verdict} ({p.note}).")
            continue
        out.append(f"{p.b} vs {p.a}, {style.metric_name(p.metric)}: {p.verdict} — B − A = {_signed(p.diff)} pp, "
                   f"{100 * confidence:.0f}% CI [{_signed(p.ci_low)}, {_signed(p.ci_high)}], Wilcoxon p = "
                   f"{_p(p.p_value)}, n = {p.n} (category, seed) pairs.")
    return out


def failures_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    bad = [r for r in rows if r["status"] != "done"]
    return ["run", "category", "seed", "status", "error"], [
        [str(r["run"]), str(r["category"]), str(r["seed"]), r["status"], r.get("error", "")] for r in bad]


def _numeric(text: str) -> bool:
    return bool(re.match(r"^[-+–\[]?[0-9.]", text)) or text in ("–", "n/a", "no cell")


def markdown_table(table: Table) -> str:
    header, rows = table
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    align = ["---:" if i and rows and all(_numeric(r[i]) for r in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(f"{a}|" for a in align)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc])


def html_table(table: Table, css_class: str = "") -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{'' if _numeric(c) else ' class=t'}>{html.escape(c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- figures --------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    title: str
    png: bytes
    file: str  # file name of the PNG in report_files/ (an SVG of the same stem beside it)
    caption: str = ""


def _figure(fig, title: str, stem: str, files: Path, caption: str = "") -> Figure:
    return Figure(title, plots.save(fig, files / stem), f"{stem}.png", caption)


def _groups(data: ReportData, category: str) -> dict[str, list[pr.RunFiles]]:
    """Run -> loaded seeds of one category; runs without a finished cell there are left out (no empty panel)."""
    return {run: [pr.load_run(d) for d in data.run_dirs(run, category)] for run in data.runs
            if data.run_dirs(run, category)}


def _absent(data: ReportData, groups: Mapping[str, Any]) -> str:
    missing = [r for r in data.runs if r not in groups]
    return f"No finished cell in this category: {', '.join(missing)}." if missing else ""


def _fpr_limit(groups: Mapping[str, Sequence[pr.RunFiles]]) -> float:
    limits = {f.fpr_limit for files in groups.values() for f in files}
    return limits.pop() if len(limits) == 1 else 0.3


def category_figures(data: ReportData, category: str, colors: Mapping[str, str], files: Path) -> list[Figure]:
    """Training curves, evaluation over training, ReContrast Fig. 5 and ROC / PRO curves of one category."""
    groups = _groups(data, category)
    if not groups:
        return []
    out, absent, name = [], _absent(data, groups), style.safe_name(category)
    spe = pr.common_steps_per_epoch(groups)
    colors = {r: colors[r] for r in groups}
    axis = "x: optimiser steps" + (" (top: epochs)" if spe else "") + ". "
    train = pr.training_panels_data(groups)
    if train:
        several = len(groups) > 1
        fig = pf.training_panels(train, colors, f"training — {category}", spe, totals_only=several)
        note = "Per-level terms are in each run's plots/ folder. " if several else ""
        out.append(_figure(fig, f"training — {category}", f"train_{name}", files, axis + note + absent))
    evals = pr.eval_data(groups)
    if evals:
        fig = pf.evaluation_figure(evals, colors, f"evaluation over training — {category}", _fpr_limit(groups), spe)
        out.append(_figure(fig, f"evaluation over training — {category}", f"eval_{name}", files, axis + absent))
    auroc, diversity = pr.fig5_data(groups)
    if diversity:
        fig = pf.recontrast_fig5(auroc, diversity, colors, f"ReContrast Fig. 5 — {category}", spe)
        out.append(_figure(fig, f"ReContrast Fig. 5 — {category}", f"fig5_{name}", files, axis + absent))
    for kind, title in (("image_roc", "ROC curves (image level)"), ("pro", "PRO curves (pixel level)")):
        curves = {category: {run: [f.curves for f in fs if f.curves.get(kind)] for run, fs in groups.items()}}
        if any(curves[category].values()):
            fig = pf.curve_panels(kind, curves, colors, _fpr_limit(groups))
            out.append(_figure(fig, f"{title} — {category}", f"{kind}_{name}", files, absent))
    return out


def histogram_figures(data: ReportData, colors: Mapping[str, str], files: Path) -> list[Figure]:
    """Per run: test scores of normal vs anomalous images per category (first finished seed), threshold marked
    when the run is calibrated."""
    out = []
    for run in data.runs:
        panels = {}
        for category in data.categories:
            dirs = data.run_dirs(run, category)
            hist = pr.histogram_data(dirs[0]) if dirs else None
            if hist:
                panels[category] = hist
        if panels:
            fig = pf.score_histograms(panels, colors[run], f"test image scores — {run} (first finished seed)")
            out.append(_figure(fig, f"score histogram — {run}", f"scores_{style.safe_name(run)}", files))
    return out


# -- examples -------------------------------------------------------------------------------------------------
@dataclass
class Overlay:
    role: str
    path: Path
    score: float
    label: int | None
    defect: str


def _test_labels(run_dir: Path) -> dict[int, tuple[int, str]]:
    path = run_dir / "test_scores.csv"
    if not path.is_file():
        return {}
    with path.open() as fh:
        return {i: (int(r["label"]), r["defect"]) for i, r in enumerate(csv.DictReader(fh))}


def pick_overlays(run_dir: Path) -> list[Overlay]:
    """Best, median and worst anomalous test images (by score, among the saved examples) and the normal image
    with the highest score (the worst false alarm). File names carry the index and the score. Example panels
    (``examples/``) are preferred to bare overlays (``overlays/``)."""
    labels, found = _test_labels(run_dir), []
    folder = next((run_dir / d for d in EXAMPLE_DIRS if any((run_dir / d).glob("*.png"))), run_dir / "overlays")
    for p in sorted(folder.glob("*.png")):
        m = OVERLAY_NAME.match(p.name)
        if m:
            label, defect = labels.get(int(m["index"]), (None, p.name.split("_")[1]))
            found.append((float(m["score"]), p, label if label is not None else int(defect != "good"), defect))
    anomalous = sorted((f for f in found if f[2] == 1), key=lambda f: -f[0])
    normal = sorted((f for f in found if f[2] == 0), key=lambda f: -f[0])
    picks: list[Overlay] = []
    if anomalous:
        roles = (("best detected anomaly", anomalous[0]), ("median anomaly", anomalous[len(anomalous) // 2]),
                 ("worst detected anomaly", anomalous[-1]))
        seen = set()
        for role, f in roles:
            if f[1] not in seen:
                seen.add(f[1])
                picks.append(Overlay(role, f[1], f[0], f[2], f[3]))
    if normal:
        picks.append(Overlay("highest-scored normal", normal[0][1], normal[0][0], 0, normal[0][3]))
    return picks


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _relative(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def overlay_section(data: ReportData, colors: Mapping[str, str], root: Path) -> tuple[str, str]:
    """HTML and Markdown of the examples: per category a row per run (first finished seed)."""
    html_parts, md_parts = [], []
    for c in data.categories:
        rows = []
        for run in data.runs:
            dirs = [d for d in data.run_dirs(run, c) if pick_overlays(d)]
            if dirs:
                rows.append((run, dirs[0], pick_overlays(dirs[0])))
        if not rows:
            continue
        html_parts.append(f"<h3>{html.escape(c)}</h3><div class='overlays'>")
        md_parts.append(f"### {c}\n")
        for run, run_dir, picks in rows:
            panel = picks[0].path.parent.name == "examples"
            cards = "".join(
                f"<figure class='{'panel' if panel else 'tile'}'><img alt='{html.escape(f'{run} {c} {o.role}')}' "
                f"src='{_data_uri(o.path.read_bytes())}'><figcaption>{html.escape(o.role)}<br>"
                f"{html.escape(o.defect)} · score {o.score:.4f}</figcaption></figure>" for o in picks)
            html_parts.append(f"<div class='overlay-row'><div class='run-name' style='border-color:{colors[run]}'>"
                              f"{html.escape(run)}<br><small>{html.escape(run_dir.name)}</small></div>{cards}</div>")
            md_parts.append(f"- **{run}** ({_relative(run_dir, root)}): " + ", ".join(
                f"[{o.role} ({o.defect}, {o.score:.4f})]({_relative(o.path, root)})" for o in picks))
        html_parts.append("</div>")
        md_parts.append("")
    return "".join(html_parts), "\n".join(md_parts)


# -- the report -----------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #e5e5e5;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}.note{color:#555;font-size:.85rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.86rem}
th,td{border-bottom:1px solid #e3e3e3;padding:.25rem .6rem;text-align:right;white-space:nowrap}
th{background:#f5f5f5}td:first-child,th:first-child,td.t{text-align:left}
table.paired td:last-child,table.failures td:last-child{white-space:normal;text-align:left;max-width:28rem}
ul.verdicts li{margin:.2rem 0}
img.figure{max-width:100%;border:1px solid #eee;margin:.4rem 0 .2rem}
.overlay-row{display:flex;flex-wrap:wrap;gap:.6rem;align-items:flex-start;margin:.4rem 0}
.run-name{width:9rem;font-weight:600;border-left:6px solid;padding-left:.4rem}
figure{margin:0;text-align:center;font-size:.75rem;color:#444}
figure.tile img{width:150px;image-rendering:pixelated}figure.panel img{width:520px}
.legend span{display:inline-block;margin-right:1rem}.legend i{display:inline-block;width:1rem;height:.6rem;
margin-right:.3rem}
"""
# Reports every image that failed to decode on the console (the browser test reads the console) and marks the
# page with the number of images that loaded.
SCRIPT = """
window.addEventListener('load', function () {
  var ok = 0;
  document.querySelectorAll('img').forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; } else { console.error('image failed: ' + img.alt); }
  });
  document.body.setAttribute('data-images-loaded', String(ok));
});
"""
Section = tuple[str, str, str]  # (title, html, markdown)


def _note(text: str) -> tuple[str, str]:
    return f"<p class='note'>{html.escape(text)}</p>", text


def verdict_section(data: ReportData) -> Section | None:
    paired = st.paired_table(data.rows, data.study)
    if not paired:
        return None
    confidence = data.study.confidence if data.study else 0.95
    sentences = verdict_sentences(paired, confidence)
    table = paired_table_rows(paired)
    note = ("Differences B − A in percentage points over the (category, seed) cells both runs finished; "
            f"percentile bootstrap {100 * confidence:.0f}% CI of the mean difference; two-sided Wilcoxon "
            "signed-rank p. The verdict needs p < 0.05 and a CI excluding 0.")
    h = ("<ul class='verdicts'>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>"
         + _note(note)[0] + html_table(table, "paired verdict"))
    md = "\n".join(f"- {s}" for s in sentences) + f"\n\n{note}\n\n{markdown_table(table)}"
    return "Paired comparisons", h, md


def table_sections(data: ReportData) -> list[Section]:
    summary = st.summarize(data.rows, data.categories)
    metrics = st.metric_columns(data.rows)
    if not metrics:
        return []
    out = []
    table = summary_table(data.rows, data.runs, metrics, data.categories)
    notes = ["Mean over the categories that have the metric, averaged per seed; ± is the sample std over seeds. "
             "Values in %. (k/n): the mean covers k of the n categories.",
             *_coverage_notes(data.rows, data.runs, metrics, data.categories)]
    defs = "; ".join(f"{style.metric_name(m)} = {style.metric_definition(m)}" for m in metrics)
    notes.append(f"Metrics: {defs}.")
    out.append(("Summary", "".join(_note(n)[0] for n in notes) + html_table(table),
                "\n".join(f"- {n}" for n in notes) + f"\n\n{markdown_table(table)}"))
    h, md = [_note("mean ± std over seeds, %; 'n/a': the category has no such metric (e.g. no masks); "
                   "'no cell': the run has no finished cell there.")[0]], []
    for m in metrics:
        table = per_category_table(summary, data.rows, m, data.runs, data.categories)
        h.append(f"<h3>{html.escape(style.metric_label(m))}</h3>" + html_table(table))
        md.append(f"### {style.metric_label(m)}\n\n{markdown_table(table)}\n")
    for run in data.runs:
        table = paper_layout_table(summary, data.rows, run, metrics, data.categories)
        if table[1]:
            h.append(f"<h3>{html.escape(run)} — papers' layout (mean over seeds, %)</h3>" + html_table(table))
            md.append(f"### {run} — papers' layout (mean over seeds, %)\n\n{markdown_table(table)}\n")
    out.append(("Per category (mean ± std over seeds, %)", "".join(h), "\n".join(md)))
    return out


def _figure_section(title: str, figures: Sequence[Figure]) -> Section:
    h, md = [], []
    for f in figures:
        caption = f"<p class='note'>{html.escape(f.caption)}</p>" if f.caption else ""
        h.append(f"<h3>{html.escape(f.title)}</h3><img class='figure' alt='{html.escape(f.title)}' "
                 f"src='{_data_uri(f.png)}'>{caption}")
        md.append(f"![{f.title}]({FILES_DIR}/{f.file})" + (f"\n\n{f.caption}" if f.caption else ""))
    return title, "".join(h), "\n\n".join(md)


def write_report(path: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` (and, for a study, refresh its tables) into ``path``.

    Args:
        path: A study folder, a run folder, or a folder of run folders.
        progress: Optional callback told what is being drawn.

    Returns:
        The path of ``report.html``.
    """
    path = Path(path)
    data = gather(path)
    if data.study is not None:
        st.write_tables(path, data.rows, data.study)
    colors = style.run_colors(data.runs)
    files = path / FILES_DIR
    files.mkdir(exist_ok=True)
    sections: list[Section] = [s for s in [verdict_section(data)] if s] + table_sections(data)
    failures = failures_table(data.rows)
    if failures[1]:
        sections.append(("Cells not finished", html_table(failures, "failures"), markdown_table(failures)))
    curves = []
    for category in data.categories:
        if progress:
            progress(f"figures: {category}")
        curves += category_figures(data, category, colors, files)
    if curves:
        sections.append(_figure_section("Curves", curves))
    histograms = histogram_figures(data, colors, files)
    if histograms:
        sections.append(_figure_section("Score distributions", histograms))
    overlay_html, overlay_md = overlay_section(data, colors, path)
    if overlay_html:
        sections.append(("Example anomaly maps (best, median, worst; first finished seed)", overlay_html, overlay_md))
    _write(path, data, colors, sections)
    return path / REPORT_HTML


def _write(path: Path, data: ReportData, colors: Mapping[str, str], sections: list[Section]) -> None:
    from .fileio import atomic_write_text

    done = sum(r["status"] == "done" for r in data.rows)
    meta = (f"{len(data.runs)} run(s) × {len(data.categories)} categor{'y' if len(data.categories) == 1 else 'ies'}"
            f" · {done}/{len(data.rows)} cells finished · generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    legend = "".join(f"<span><i style='background:{c}'></i>{html.escape(r)}</span>" for r in data.runs
                     for c in [colors[r]])
    body = "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, h, _ in sections)
    study_yaml = (f"<details><summary>study definition</summary><pre>{html.escape(yaml.safe_dump(asdict(data.study)))}"
                  "</pre></details>") if data.study else ""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(data.title)}</h1><p class='meta'>{meta}</p>"
            f"<p class='legend'>{legend}</p>{body}{study_yaml}<script>{SCRIPT}</script></body></html>")
    atomic_write_text(path / REPORT_HTML, page)
    md = [f"# {data.title}\n", f"{meta}\n"] + [f"## {t}\n\n{m}\n" for t, _, m in sections]
    atomic_write_text(path / REPORT_MD, "\n".join(md))
