"""The results page's data: study tables, per-run metrics, figures and overlays, served only from inside the folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from reconad.errors import RunFolderError
from reconad.serve import app_for_path, create_app
from reconad.serve.results import gather_results, is_results_folder


def _png(path, value: int = 128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def make_run(folder, method="rd4ad", category="stripes", auroc=0.75, seed=1):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "data": {"category": category},
                                                        "backbone": {"name": "resnet18"}, "train": {"seed": seed}}))
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"image_auroc": auroc, "pixel_pro": 0.5}}))
    _png(folder / "plots" / "roc.png")
    for i in range(3):
        _png(folder / "overlays" / f"{i:04d}_blob_{i:03d}_score0.{i}.png", 40 * i)
    return folder


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    make_run(root / "rd4ad" / "stripes" / "seed1", auroc=0.8)
    make_run(root / "gnl" / "stripes" / "seed1", method="gnl", auroc=0.6)
    (root / "study.yaml").write_text("name: s\n")
    (root / "summary.csv").write_text("run,category,image_auroc_mean\nrd4ad,stripes,0.8\ngnl,stripes,0.6\n")
    (root / "paired.csv").write_text("a,b,metric,mean_diff,p_value,verdict\nrd4ad,gnl,image_auroc,0.2,0.03,a better\n")
    (root / "results.csv").write_text("run,category,seed,image_auroc\nrd4ad,stripes,1,0.8\ngnl,stripes,1,0.6\n")
    (root / "secret.txt").write_text("not served")
    _png(root / "plots" / "summary.png")
    return root


def test_study_tables_runs_figures_and_overlays(study):
    data = gather_results(study)
    assert [t["name"] for t in data["tables"]] == ["summary", "paired", "results"]
    summary = data["tables"][0]
    assert summary["columns"] == ["run", "category", "image_auroc_mean"]
    assert summary["rows"] == [["rd4ad", "stripes", 0.8], ["gnl", "stripes", 0.6]]
    assert data["figures"] == ["plots/summary.png"]
    runs = {r["path"]: r for r in data["runs"]}
    assert set(runs) == {"rd4ad/stripes/seed1", "gnl/stripes/seed1"}
    run = runs["gnl/stripes/seed1"]
    assert run["method"] == "gnl" and run["metrics"] == {"image_auroc": 0.6, "pixel_pro": 0.5}
    assert run["figures"] == ["gnl/stripes/seed1/plots/roc.png"] and len(run["overlays"]) == 3


def test_folder_of_runs_without_tables_gets_a_metrics_table(tmp_path):
    make_run(tmp_path / "runs" / "a", auroc=0.9)
    make_run(tmp_path / "runs" / "b", auroc=0.4, seed=2)
    data = gather_results(tmp_path / "runs")
    (table,) = data["tables"]
    assert table["columns"] == ["run", "method", "category", "seed", "image_auroc", "pixel_pro"]
    assert table["rows"] == [["a", "rd4ad", "stripes", 1, 0.9, 0.5], ["b", "rd4ad", "stripes", 2, 0.4, 0.5]]


def test_empty_folder_is_a_run_folder_error(tmp_path):
    with pytest.raises(RunFolderError, match="no results"):
        gather_results(tmp_path)


def test_results_app_serves_page_data_and_files_but_nothing_outside(study):
    assert is_results_folder(study) and not is_results_folder(study / "gnl" / "stripes" / "seed1")
    app = app_for_path(study)
    with TestClient(app) as c:
        assert c.get("/", follow_redirects=False).headers["location"] == "/results"
        page = c.get("/results")
        assert page.status_code == 200 and "/static/results.js" in page.text
        data = c.get("/api/results").json()
        assert data == json.loads(json.dumps(gather_results(study)))
        png = c.get("/files/gnl/stripes/seed1/plots/roc.png")
        assert png.status_code == 200 and png.content == (study / "gnl/stripes/seed1/plots/roc.png").read_bytes()
        assert c.get("/files/summary.csv").text.startswith("run,category")
        assert c.get("/files/secret.txt").status_code == 404
        assert c.get("/files/../../etc/passwd").status_code == 404
        assert c.get("/files/%2e%2e/%2e%2e/etc/passwd").status_code == 404
        assert c.get("/model").status_code == 404 and c.post("/predict").status_code in (404, 405)
        assert c.get("/health").json() == {"status": "ok", "model": False, "results": True}


def test_create_app_needs_something_to_serve():
    with pytest.raises(ValueError):
        create_app(None)
