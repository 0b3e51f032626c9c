"""The service on a real trained run and its ONNX export: answers equal the predictor's own output."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reconad.deploy import open_predictor
from reconad.serve import app_for_path

from .serve_fakes import real_run


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_run(tmp_path_factory.mktemp("serve_real"))


def _uploads(paths):
    return [("files", (f"{p.parent.name}_{p.name}", p.read_bytes(), "image/png")) for p in paths]


def _test_images(real):
    return sorted(real["test"].glob("*/*.png"))


def test_run_folder_answers_equal_the_predictor_and_reconad_predict(real):
    paths = _test_images(real)
    reference = open_predictor(real["run"])
    own = reference.predict_batch([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    from_files = reference.predict_batch([str(p) for p in paths])  # what `reconad predict` reads
    with TestClient(app_for_path(real["run"])) as c:
        model = c.get("/model").json()
        assert model["metadata"]["method"] == "rd4ad" and model["metadata"]["backbone"] == "resnet18"
        assert model["calibrated"] and model["image_size"] == 32 and model["normalised_threshold"] == 1.0
        assert model["threshold"] == reference.calibration.image_threshold
        assert "conformal FAR 0.05" in model["metadata"]["threshold_source"]
        assert model["map"]["units"] == "normalised"
        body = c.post("/predict?maps=true", files=_uploads(paths)).json()
        assert c.get("/results").status_code == 200
        run_view = c.get("/api/results").json()["runs"][0]
        assert "image_auroc" in run_view["metrics"] and run_view["overlays"]
    assert body["calibrated"] is True and len(body["results"]) == len(paths)
    for answer, mine, theirs in zip(body["results"], own, from_files):
        assert answer["score"] == mine.score
        assert answer["normalised_score"] == mine.normalised_score
        assert answer["label"] == mine.label and answer["threshold"] == mine.threshold
        assert answer["mask_fraction"] == pytest.approx(float(mine.mask.mean()))
        assert answer["score"] == pytest.approx(theirs.score, rel=1e-5, abs=1e-6)
        assert answer["label"] == theirs.label or abs(theirs.score - theirs.threshold) < 1e-5


def test_uncalibrated_run_leaves_decisions_out(real):
    with TestClient(app_for_path(real["uncalibrated"])) as c:
        assert c.get("/model").json()["calibrated"] is False
        answer = c.post("/predict", files=_uploads(_test_images(real)[:1])).json()["results"][0]
    assert answer["label"] is None and answer["threshold"] is None and answer["normalised_score"] is None
    assert answer["score"] == open_predictor(real["uncalibrated"]).predict(_test_images(real)[0]).score


def test_onnx_export_is_served_with_its_parity_record(real, tmp_path):
    from reconad.deploy import export_run

    export_run(real["run"], tmp_path / "export")
    paths = _test_images(real)
    detector = open_predictor(tmp_path / "export")
    own = detector.predict_batch([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    with TestClient(app_for_path(tmp_path / "export")) as c:
        model = c.get("/model").json()
        body = c.post("/predict", files=_uploads(paths)).json()
        assert c.get("/results").status_code == 404  # an export folder has no results to browse
    assert model["calibrated"] and model["metadata"]["format"] == "onnx"
    assert any("parity" in k for k in model["metadata"]), sorted(model["metadata"])
    assert [r["score"] for r in body["results"]] == [r.score for r in own]
    assert [r["label"] for r in body["results"]] == [r.label for r in own]
