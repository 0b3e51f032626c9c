"""Plots and reports: training-curve figures, overlay picks, self-contained HTML, headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconad import cli, plots
from reconad import report as rp

from .conftest import tiny_run_overrides, write_tiny_mvtec


def _write_log(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for batch in (2, 4, 6):
        entries.append({"batch": batch, "epoch": 0, "kind": "train", "lr": [2e-3, 1e-5], "loss": 3.0 / batch,
                        "loss/frozen/l1": 1.0 / batch, "alpha": min(1.0, batch / 4 - 1),
                        "hm_discard_rate": 0.1 * batch, "diversity/trainable/l1": 0.2, "diversity/frozen/l1": 0.18})
    entries += [{"batch": 4, "epoch": 0, "kind": "eval", "image_auroc": 0.7, "pixel_auroc": 0.8},
                {"batches": 6, "kind": "final", "image_auroc": 0.9, "pixel_auroc": 0.85}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_log_quantities_are_grouped_by_family_and_level(tmp_path):
    _write_log(tmp_path)
    entries = plots.read_log(tmp_path)
    train = plots.train_quantities(entries)
    assert set(train) == {"lr", "loss", "alpha", "hm_discard_rate", "diversity"}
    assert set(train["loss"]) == {"", "frozen/l1"} and set(train["lr"]) == {"group 0", "group 1"}
    assert set(train["diversity"]) == {"trainable/l1", "frozen/l1"}
    x, y = train["loss"][""]
    assert x.tolist() == [2, 4, 6] and y.tolist() == [1.5, 0.75, 0.5]
    assert train["lr"]["group 1"][1].tolist() == [1e-5] * 3
    evals = plots.eval_quantities(entries)
    assert evals["image_auroc"][0].tolist() == [4, 6] and evals["image_auroc"][1].tolist() == pytest.approx([70, 90])
    assert plots.ylabel("image_auroc") == "image_auroc (%)" and "dimensionless" in plots.ylabel("loss")


def test_plot_run_writes_one_figure_per_quantity(tmp_path):
    _write_log(tmp_path)
    written = plots.plot_run(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["eval_metrics.png", "train_alpha.png", "train_diversity.png", "train_hm_discard_rate.png",
                     "train_loss.png", "train_lr.png"]
    for path in written:
        image = np.asarray(Image.open(path).convert("L"))
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 5  # drawn, not blank
    assert plots.plot_run(tmp_path / "empty") == []


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
    """One tiny real run (the engine draws its curves), reported on its own."""
    from reconad.config import make_config
    from reconad.engine import fit

    base = tmp_path_factory.mktemp("report")
    root = write_tiny_mvtec(base / "data")
    overrides = tiny_run_overrides(root, iterations=2)
    overrides["eval"] = {"overlays": 6}
    run = fit(make_config("rd4ad", **overrides), base / "runs" / "rd4ad").run_dir
    rp.write_report(run)
    return run


def test_single_run_report_is_self_contained(trained_run):
    assert {p.name for p in (trained_run / "plots").glob("*.png")} == {"train_loss.png", "train_lr.png",
                                                                      "eval_metrics.png"}  # drawn by the engine
    page = (trained_run / rp.REPORT_HTML).read_text()
    assert not re.search(r"(src|href)=['\"](?!data:)", page) and "http" not in page
    assert "<h2>Summary</h2>" in page and "<h2>Example anomaly maps" in page
    assert page.count("data:image/png;base64,") >= 2 + 1 + 2 + 3  # loss, lr, eval figures, ROC+PRO, overlays
    md = (trained_run / rp.REPORT_MD).read_text()
    assert "| rd4ad | mean | 1 |" in md and "![ROC curves (image level)](report_files/image_roc.png)" in md
    assert (trained_run / rp.FILES_DIR / "image_roc.png").is_file()
    # a folder of run folders works too, and `reconad report` regenerates without training
    assert cli.main(["report", str(trained_run.parent)]) == 0
    assert "| rd4ad | mean | 1 |" in (trained_run.parent / rp.REPORT_MD).read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(page: Path, *action: str) -> tuple[str, list[str]]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", "--window-size=1280,2400", *action, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_report_opens_in_headless_chromium(trained_run, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium binary (Debian: apt-get install chromium; scripts/test installs it when it can)")
    page = trained_run / rp.REPORT_HTML
    dom, console = _browse(page, "--dump-dom")
    assert console == [], console
    n_images = len(re.findall(r"<img ", page.read_text()))
    assert n_images >= 8 and f'data-images-loaded="{n_images}"' in dom  # every embedded image decoded
    assert dom.count("<table") >= 4 and "Paired comparisons" not in dom  # one run: nothing to pair
    shot = tmp_path / "report.png"
    _, console = _browse(page, f"--screenshot={shot}")
    assert console == [], console
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # tables and figures, not a blank page
    # the check itself sees a broken image
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    _, console = _browse(broken, "--dump-dom")
    assert any("image failed" in line for line in console)
