"""Reports: summaries over the categories that have a metric, figures per category, relative links, and the HTML
page checked in a real headless Chromium (the test fails when the browser cannot start)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reconad import cli
from reconad import report as rp

from .conftest import tiny_run_overrides, write_tiny_mvtec
from .test_plots import recontrast_run

RUNS = (("full", "recontrast/full", 1), ("config_a", "recontrast/config_a", 1), ("rdpp", "rdpp", 2))


def _rdpp_log(run_dir: Path) -> None:
    """RD++'s own terms (no levels, no diversity), batches counted twice per step, no "step" key."""
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    out = []
    for e in entries:
        e = {k: v for k, v in e.items() if not k.startswith(("diversity", "loss/")) and k != "step"}
        if e["kind"] == "train":
            e.update(distill=0.8 / e["batch"], ssot=0.1)
        out.append(e)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in out))


def make_study(out: Path) -> Path:
    """3 runs × 2 categories × 2 seeds from saved files only: ``img`` has no pixel metrics, rdpp no ``img`` cell."""
    study = {"runs": [{"preset": p, "name": n} for n, p, _ in RUNS], "categories": ["stripes", "img"],
             "seeds": [1, 11], "n_resamples": 1000, "name": "ladder"}
    out.mkdir(parents=True)
    (out / "study.yaml").write_text(yaml.safe_dump(study))
    for k, (name, _, accumulate) in enumerate(RUNS):
        for category in ("stripes", "img"):
            if name == "rdpp" and category == "img":
                continue
            for s in (1, 11):
                d = recontrast_run(out / name / category / f"seed{s}", seed=s + 3 * k, accumulate=accumulate)
                metrics = {"image_auroc": 0.8 + 0.05 * k + 0.001 * s}
                if category != "img":
                    metrics.update(pixel_auroc=0.9 + 0.01 * k, aupro=0.6 + 0.05 * k + 0.002 * s)
                (d / "metrics.json").write_text(json.dumps({"metrics": metrics}))
                if name == "rdpp":
                    _rdpp_log(d)
    return out


@pytest.fixture(scope="module")
def study_report(tmp_path_factory) -> Path:
    out = make_study(tmp_path_factory.mktemp("report") / "study")
    rp.write_report(out)
    return out


def test_summary_means_over_the_categories_that_have_the_metric():
    rows = [{"run": "a", "category": c, "seed": s, "status": "done", "image_auroc": v,
             **({"aupro": v - 0.1} if c != "img" else {})}
            for c, base in (("x", 0.9), ("y", 0.8), ("img", 0.7)) for s, v in ((1, base), (2, base + 0.02))]
    cm = rp.category_mean(rows, "a", "aupro", ["x", "y", "img"])
    assert cm.used == ["x", "y"] and cm.missing == ["img"] and cm.n_seeds == 2
    assert cm.mean == pytest.approx(np.mean([0.75, 0.77])) and cm.std == pytest.approx(np.std([0.75, 0.77], ddof=1))
    full = rp.category_mean(rows, "a", "image_auroc", ["x", "y", "img"])
    assert full.missing == [] and full.mean == pytest.approx(np.mean([0.8, 0.82]))
    header, table = rp.summary_table(rows, ["a"], ["image_auroc", "aupro"], ["x", "y", "img"])
    assert header == ["run", "seeds", "I-AUROC", "AUPRO@0.3"]
    assert table == [["a", "2", "81.0 ± 1.4", "76.0 ± 1.4 (2/3)"]]


def test_study_report_tables_say_which_categories_a_mean_covers(study_report):
    md = (study_report / rp.REPORT_MD).read_text()
    assert "| full | 2 | 80.6 ± 0.7 | 90.0 ± 0.0 (1/2) | 61.2 ± 1.4 (1/2) |" in md
    assert "rdpp · I-AUROC: mean over 1 of 2 categories (stripes); no finished cell in img" in md
    assert "full · P-AUROC: mean over 1 of 2 categories (stripes); no such metric in img" in md
    assert "| img | 80.6 ± 0.7 | 85.6 ± 0.7 | no cell |" in md  # I-AUROC per category
    assert "| img | n/a | n/a | no cell |" in md  # P-AUROC: no masks in img
    assert "| mean | 90.0 ± 0.0 (1/2) | 91.0 ± 0.0 (1/2) | 92.0 ± 0.0 (1/2) |" in md
    assert not re.search(r"\| – \|", md)  # no bare dash without explanation
    assert "| full | config_a | image_auroc | 4 |" in md  # paired comparison over matched cells


def test_study_report_links_figures_by_relative_paths_that_survive_a_move(study_report, tmp_path):
    md = (study_report / rp.REPORT_MD).read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert links and not any(Path(link).is_absolute() or "://" in link for link in links)
    moved = tmp_path / "moved"
    shutil.copytree(study_report, moved)
    for link in links:
        assert (moved / link).is_file(), link
    names = {p.name for p in (study_report / rp.FILES_DIR).iterdir()}
    for stem in ("train_stripes", "eval_stripes", "fig5_stripes", "image_roc_stripes", "pro_stripes", "train_img",
                 "fig5_img", "image_roc_img", "scores_full", "scores_rdpp"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names, stem
    assert "pro_img.png" in names  # the synthetic img cells carry a PRO curve file; a real one has none


def test_study_figures_per_category_leave_out_runs_without_a_cell(study_report):
    from reconad.plots import runs as pr

    data = rp.gather(study_report)
    groups = rp._groups(data, "img")
    assert list(groups) == ["full", "config_a"]  # no rdpp cell: no line, no panel, said in the caption
    assert rp._absent(data, groups) == "No finished cell in this category: rdpp."
    panels = pr.training_panels_data(rp._groups(data, "stripes"))
    assert set(panels["distill"]) == {"rdpp"} and set(panels["loss/frozen"]) == {"full", "config_a"}
    steps = panels["loss"]["rdpp"][0][""][0]
    assert steps.max() == panels["loss"]["full"][0][""][0].max() == 12  # RD++ (accumulate 2): steps, not batches
    auroc, diversity = pr.fig5_data(rp._groups(data, "stripes"))
    assert set(auroc) == {"full", "config_a"} and set(diversity["l1"]) == {"full", "config_a"}  # ladder only


def test_study_html_leads_with_the_verdict_then_tables_then_curves(study_report):
    page = (study_report / rp.REPORT_HTML).read_text()
    order = [page.index(f"<h2>{t}") for t in ("Paired comparisons", "Summary", "Per category", "Curves",
                                               "Score distributions")]
    assert order == sorted(order)
    assert "table class=\"paired verdict\"" in page and "95% CI" in page and "Wilcoxon p" in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page) and "http://" not in page and "https://" not in page


# -- examples -------------------------------------------------------------------------------------------------
def _overlays(run_dir: Path) -> None:
    rows = [("a.png", "good", 0, 0.2), ("b.png", "crack", 1, 0.9), ("c.png", "crack", 1, 0.5),
            ("d.png", "good", 0, 0.6), ("e.png", "hole_big", 1, 0.3), ("f.png", "hole_big", 1, 0.7)]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "test_scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "defect", "label", "score"])
        writer.writerows(rows)
    (run_dir / "overlays").mkdir()
    for i, (path, defect, _, score) in enumerate(rows):
        if i != 2:  # overlays exist for a subset of the test images only
            name = f"{i:04d}_{defect}_{Path(path).stem}_score{score:.4f}.png"
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(run_dir / "overlays" / name)


def test_overlay_picks_best_median_worst_anomalies_and_worst_normal(tmp_path):
    _overlays(tmp_path)
    picks = {o.role: (o.path.name, o.score, o.label) for o in rp.pick_overlays(tmp_path)}
    assert picks == {"best detected anomaly": ("0001_crack_b_score0.9000.png", 0.9, 1),
                     "median anomaly": ("0005_hole_big_f_score0.7000.png", 0.7, 1),
                     "worst detected anomaly": ("0004_hole_big_e_score0.3000.png", 0.3, 1),
                     "highest-scored normal": ("0003_good_d_score0.6000.png", 0.6, 0)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny real run (the engine draws its figures), with example panels, reported on its own."""
    import torch

    from reconad.config import make_config
    from reconad.data import build_datasets
    from reconad.engine import fit, predict_dataset
    from reconad.run import load
    from reconad.visualize import write_examples

    base = tmp_path_factory.mktemp("report")
    root = write_tiny_mvtec(base / "data")
    overrides = tiny_run_overrides(root, iterations=2)
    overrides["eval"] = {"overlays": 6}
    cfg = make_config("rd4ad", **overrides)
    run = fit(cfg, base / "runs" / "rd4ad").run_dir
    _, _, test_set = build_datasets(cfg.data)
    out = predict_dataset(load(run), test_set, 4, torch.device("cpu"))
    write_examples(out, test_set, run / "examples", 4)  # what the engine is to call instead of write_overlays
    rp.write_report(run)
    return run


def test_single_run_report_is_self_contained(trained_run):
    assert {p.name for p in (trained_run / "plots").glob("*.png")} >= {"training.png", "evaluation.png",
                                                                        "image_roc.png", "pro.png"}
    page = (trained_run / rp.REPORT_HTML).read_text()
    assert not re.search(r"(src|href)=['\"](?!data:)", page) and "http" not in page
    assert "<h2>Summary</h2>" in page and "<h2>Example anomaly maps" in page and "Paired comparisons" not in page
    assert page.count("figure class='panel'") >= 2  # example panels, not bare overlays
    md = (trained_run / rp.REPORT_MD).read_text()
    assert re.search(r"\| rd4ad \| 1 \| [0-9.]+ \|", md)
    assert "![ROC curves (image level) — stripes](report_files/image_roc_stripes.png)" in md
    assert "(examples/0" in md  # examples linked relative to the report
    # a folder of run folders works too, and `reconad report` regenerates without training
    assert cli.main(["report", str(trained_run.parent)]) == 0
    assert re.search(r"\| rd4ad \| 1 \| [0-9.]+ \|", (trained_run.parent / rp.REPORT_MD).read_text())


# -- the page in a real browser -------------------------------------------------------------------------------
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.fail("no Chromium binary: install it (Debian: apt-get install chromium) — the report's browser "
                    "check must run, not skip")
    return found


def _browse(page: Path, *action: str) -> tuple[str, list[str]]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", "--window-size=1280,2400", *action, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"Chromium could not start or load the page (exit {done.returncode}): {done.stderr[-800:]}")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def _check_loads(page: Path, tmp_path: Path, shot_name: str) -> str:
    dom, console = _browse(page, "--dump-dom")
    assert console == [], console
    n_images = len(re.findall(r"<img ", page.read_text()))
    assert n_images >= 8 and f'data-images-loaded="{n_images}"' in dom  # every embedded image decoded
    shot = tmp_path / shot_name
    _, console = _browse(page, f"--screenshot={shot}")
    assert console == [], console
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # tables and figures, not a blank page
    return dom


def test_study_report_opens_in_headless_chromium(study_report, tmp_path):
    dom = _check_loads(study_report / rp.REPORT_HTML, tmp_path, "study.png")
    verdict = dom[dom.index("<h2>Paired comparisons"):dom.index("<h2>Summary")]
    assert 'class="paired verdict"' in verdict and verdict.count("<tr>") == 1 + 3 * 3  # 3 pairs × 3 metrics
    assert dom.count("<img class=\"figure\"") == len(list((study_report / rp.FILES_DIR).glob("*.png")))


def test_single_run_report_opens_in_headless_chromium_and_the_check_sees_a_broken_image(trained_run, tmp_path):
    page = trained_run / rp.REPORT_HTML
    dom = _check_loads(page, tmp_path, "run.png")
    assert dom.count("<table") >= 2 and "Paired comparisons" not in dom  # one run: nothing to pair
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    _, console = _browse(broken, "--dump-dom")
    assert any("image failed" in line for line in console)
