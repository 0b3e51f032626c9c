"""Reports of a study (or of run folders): ``report.html`` (self-contained, opens offline) and ``report.md``.

Everything is read from saved files — ``study.yaml`` and each run folder's ``metrics.json``, ``log.jsonl``,
``curves.json``, ``test_scores.csv`` and ``overlays/`` — so ``reconad report DIR`` never trains. The HTML
embeds its figures and overlays as base64 PNG; the same figures are written to ``report_files/`` for the
Markdown report.
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

import yaml

from . import plots
from . import study as st

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
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
        raise FileNotFoundError(f"{path} holds no study (study.yaml) and no run folder (config.yaml)")
    rows = [_folder_row(f, path) for f in folders]
    return ReportData(path.name, rows, None, list(dict.fromkeys(r["category"] for r in rows)))


# -- numbers as text ----------------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def pct(mean: Any, std: Any = None) -> str:
    """``98.5 ± 0.3`` (values ×100); ``–`` when missing."""
    if not _finite(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if _finite(std) else f"{100 * mean:.1f}"


def _signed(v: float) -> str:
    return f"{100 * v:+.2f}" if _finite(v) else "–"


def _p(v: Any) -> str:
    if not _finite(v):
        return "–"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


# -- tables: (header, rows of cells) --------------------------------------------------------------------------
Table = tuple[list[str], list[list[str]]]


def summary_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Table:
    """Per run: the mean over categories (and groups), mean ± std over seeds."""
    rows = [[r["run"], r["category"], str(r["n_seeds"]), *(pct(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics)]
            for r in summary if str(r["category"]).startswith("mean")]
    return ["run", "over", "seeds", *metrics], rows


def per_category_table(summary: Sequence[Mapping[str, Any]], metric: str, runs: Sequence[str]) -> Table:
    """One metric: a row per category (then the means), a column per run, mean ± std over seeds."""
    by = {(r["run"], r["category"]): r for r in summary}
    scopes = list(dict.fromkeys(r["category"] for r in summary))
    scopes = [c for c in scopes if not c.startswith("mean")] + [c for c in scopes if c.startswith("mean")]
    rows = [[c, *(pct(by[(run, c)][f"{metric}_mean"], by[(run, c)][f"{metric}_std"]) if (run, c) in by else "–"
                  for run in runs)] for c in scopes]
    return ["category", *runs], rows


def paper_layout_markdown(summary: Sequence[Mapping[str, Any]], run: str, metrics: Sequence[str],
                          categories: Sequence[str]) -> str:
    """The papers' layout for one run (category rows, metric columns, mean over seeds), via ``reconad.metrics``."""
    from .metrics import results_table, to_markdown

    per_category = {r["category"]: {m: r[f"{m}_mean"] for m in metrics} for r in summary
                    if r["run"] == run and r["category"] in categories}
    if not per_category:
        return ""
    return to_markdown(results_table(per_category, st.category_groups(list(per_category))), columns=list(metrics))


def paired_table_rows(paired: Sequence[st.PairedResult]) -> Table:
    header = ["A", "B", "metric", "n", "mean A", "mean B", "B − A (pp)", "95% CI (pp)", "Wilcoxon p", "verdict",
              "note"]
    rows = [[p.a, p.b, p.metric, str(p.n), pct(p.mean_a), pct(p.mean_b), _signed(p.diff),
             f"[{_signed(p.ci_low)}, {_signed(p.ci_high)}]", _p(p.p_value), p.verdict, p.note] for p in paired]
    return header, rows


def failures_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    bad = [r for r in rows if r["status"] != "done"]
    return ["run", "category", "seed", "status", "error"], [
        [str(r["run"]), str(r["category"]), str(r["seed"]), r["status"], r.get("error", "")] for r in bad]


def _numeric(text: str) -> bool:
    return bool(re.match(r"^[-+–\[]?[0-9.]", text)) or text == "–"


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
    file: str


def _seed_logs(data: ReportData) -> dict[str, dict[str, list[list[dict[str, Any]]]]]:
    return {c: {run: [plots.read_log(d) for d in data.run_dirs(run, c)] for run in data.runs
                if data.run_dirs(run, c)} for c in data.categories}


def training_figures(data: ReportData, colors: Mapping[str, str]) -> list[Figure]:
    """One figure per logged quantity (loss terms, lr, diversity, …) and per evaluation metric over batches."""
    logs = _seed_logs(data)
    train = {c: {run: [plots.train_quantities(e) for e in seeds] for run, seeds in runs.items()}
             for c, runs in logs.items()}
    evals = {c: {run: [plots.eval_quantities(e) for e in seeds] for run, seeds in runs.items()}
             for c, runs in logs.items()}
    figures = []
    families = dict.fromkeys(f for runs in train.values() for seeds in runs.values() for s in seeds for f in s)
    for family in families:
        panel = {c: {run: [s.get(family, {}) for s in seeds] for run, seeds in runs.items()}
                 for c, runs in train.items()}
        fig = plots.plot_quantity_grid(family, panel, colors, f"training: {family}")
        figures.append(Figure(f"training: {family}", plots.save_figure(fig), f"train_{plots._safe(family)}.png"))
    metrics = dict.fromkeys(m for runs in evals.values() for seeds in runs.values() for s in seeds for m in s)
    for metric in metrics:
        panel = {c: {run: [{"": s[metric]} if metric in s else {} for s in seeds] for run, seeds in runs.items()}
                 for c, runs in evals.items()}
        fig = plots.plot_quantity_grid(metric, panel, colors, f"evaluation over training: {metric}")
        figures.append(Figure(f"evaluation: {metric}", plots.save_figure(fig), f"eval_{plots._safe(metric)}.png"))
    return figures


def _fpr_limit(run_dir: Path) -> float:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return float(((cfg or {}).get("eval") or {}).get("fpr_limit", 0.3))


def curve_figures(data: ReportData, colors: Mapping[str, str]) -> list[Figure]:
    """ROC and PRO curves of every cell, read from ``curves.json``."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    limit = 0.3
    for c in data.categories:
        for run in data.runs:
            for d in data.run_dirs(run, c):
                if (d / "curves.json").is_file():
                    curves.setdefault(c, {}).setdefault(run, []).append(json.loads((d / "curves.json").read_text()))
                    limit = _fpr_limit(d)
    figures = []
    for kind, title in (("image_roc", "ROC curves (image level)"), ("pro", "PRO curves (pixel level)")):
        if any(kind in cv for runs in curves.values() for seeds in runs.values() for cv in seeds):
            fig = plots.plot_curves_grid(kind, curves, colors, limit)
            figures.append(Figure(title, plots.save_figure(fig), f"{kind}.png"))
    return figures


# -- overlays -------------------------------------------------------------------------------------------------
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
    """Best, median and worst anomalous test images (by score, among the saved overlays) and the normal image
    with the highest score (the worst false alarm). Overlay file names carry the index and the score."""
    labels, found = _test_labels(run_dir), []
    for p in sorted((run_dir / "overlays").glob("*.png")):
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


def overlay_section(data: ReportData, colors: Mapping[str, str]) -> tuple[str, str]:
    """HTML and Markdown of the overlay grid: per category a row per run (first finished seed)."""
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
            cards = "".join(
                f"<figure><img alt='{html.escape(f'{run} {c} {o.role}')}' src='{_data_uri(o.path.read_bytes())}'>"
                f"<figcaption>{html.escape(o.role)}<br>{html.escape(o.defect)} · score {o.score:.4f}</figcaption>"
                "</figure>" for o in picks)
            html_parts.append(f"<div class='overlay-row'><div class='run-name' style='border-color:{colors[run]}'>"
                              f"{html.escape(run)}<br><small>{html.escape(run_dir.name)}</small></div>{cards}</div>")
            md_parts.append(f"- **{run}** ({run_dir}): " + ", ".join(
                f"[{o.role} ({o.defect}, {o.score:.4f})]({o.path})" for o in picks))
        html_parts.append("</div>")
        md_parts.append("")
    return "".join(html_parts), "\n".join(md_parts)


# -- the report -----------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #e5e5e5;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.86rem}
th,td{border-bottom:1px solid #e3e3e3;padding:.25rem .6rem;text-align:right;white-space:nowrap}
th{background:#f5f5f5}td:first-child,th:first-child,td.t{text-align:left}
table.paired td:last-child,table.failures td:last-child{white-space:normal;text-align:left;max-width:28rem}
img.figure{max-width:100%;border:1px solid #eee;margin:.4rem 0 1rem}
.overlay-row{display:flex;gap:.6rem;align-items:flex-start;margin:.4rem 0}
.run-name{width:9rem;font-weight:600;border-left:6px solid;padding-left:.4rem}
figure{margin:0;text-align:center;font-size:.75rem;color:#444}figure img{width:150px;image-rendering:pixelated}
.legend span{display:inline-block;margin-right:1rem}.legend i{display:inline-block;width:1rem;height:.6rem;
margin-right:.3rem}
"""
# Reports every image that failed to decode on the console (the screenshot test reads the console) and marks the
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


def _sections(data: ReportData, colors: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(title, html, markdown) per report section."""
    summary = st.summarize(data.rows, data.categories)
    metrics = st.metric_columns(data.rows)
    paired = st.paired_table(data.rows, data.study)
    out = []
    if metrics:
        table = summary_table(summary, metrics)
        note = ("Mean over categories; ± is the sample std over seeds (categories averaged per seed first). "
                "Values in %.")
        out.append(("Summary", f"<p>{note}</p>" + html_table(table), f"{note}\n\n{markdown_table(table)}"))
        h, md = [], []
        for m in metrics:
            table = per_category_table(summary, m, data.runs)
            h.append(f"<h3>{html.escape(m)}</h3>" + html_table(table))
            md.append(f"### {m}\n\n{markdown_table(table)}\n")
        for run in data.runs:
            text = paper_layout_markdown(summary, run, metrics, data.categories)
            if text:
                h.append(f"<h3>{html.escape(run)} — papers' layout (mean over seeds)</h3>"
                         + html_table(_parse_markdown(text)))
                md.append(f"### {run} — papers' layout (mean over seeds)\n\n{text}\n")
        out.append(("Per category (mean ± std over seeds, %)", "".join(h), "\n".join(md)))
    if paired:
        table = paired_table_rows(paired)
        note = ("Differences B − A in percentage points over the (category, seed) cells both runs finished; "
                "percentile bootstrap CI of the mean difference; two-sided Wilcoxon signed-rank p. The verdict "
                "needs p < 0.05 and a CI excluding 0.")
        out.append(("Paired comparisons", f"<p>{note}</p>" + html_table(table, "paired"),
                    f"{note}\n\n{markdown_table(table)}"))
    failures = failures_table(data.rows)
    if failures[1]:
        out.append(("Cells not finished", html_table(failures, "failures"), markdown_table(failures)))
    return out


def _parse_markdown(text: str) -> Table:
    lines = [ln.strip().strip("|").split("|") for ln in text.splitlines() if ln.strip()]
    return [c.strip() for c in lines[0]], [[c.strip() for c in ln] for ln in lines[2:]]


def _figure_sections(figures: Sequence[Figure], files: Path) -> tuple[str, str]:
    h, md = [], []
    for f in figures:
        (files / f.file).write_bytes(f.png)
        h.append(f"<h3>{html.escape(f.title)}</h3><img class='figure' alt='{html.escape(f.title)}' "
                 f"src='{_data_uri(f.png)}'>")
        md.append(f"![{f.title}]({FILES_DIR}/{f.file})")
    return "".join(h), "\n\n".join(md)


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
    colors = plots.run_colors(data.runs)
    files = path / FILES_DIR
    files.mkdir(exist_ok=True)
    sections = _sections(data, colors)
    for name, make in (("Training curves", training_figures), ("ROC and PRO curves", curve_figures)):
        if progress:
            progress(name)
        figures = make(data, colors)
        if figures:
            sections.append((name, *_figure_sections(figures, files)))
    overlay_html, overlay_md = overlay_section(data, colors)
    if overlay_html:
        sections.append(("Example anomaly maps (best, median, worst; first finished seed)", overlay_html, overlay_md))
    _write(path, data, colors, sections)
    return path / REPORT_HTML


def _write(path: Path, data: ReportData, colors: Mapping[str, str], sections: list[tuple[str, str, str]]) -> None:
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
            f"<p class='legend'>{legend}</p>{study_yaml}{body}<script>{SCRIPT}</script></body></html>")
    atomic_write_text(path / REPORT_HTML, page)
    md = [f"# {data.title}\n", f"{meta}\n"] + [f"## {t}\n\n{m}\n" for t, _, m in sections]
    atomic_write_text(path / REPORT_MD, "\n".join(md))
