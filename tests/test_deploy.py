"""reconad.deploy: conformal calibration, predictions with decisions, verified export and the torch-free runtime."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconad.deploy import (
    Calibration,
    CalibrationError,
    Detector,
    ExportError,
    ExportParityError,
    calibrate_from_scores,
    calibrate_run,
    conformal_threshold,
    export_run,
    load_calibration,
    open_predictor,
    predict_folder,
    verify_export,
    write_calibration,
)
from reconad.deploy.calibration import labelled_operating_point
from reconad.deploy.runtime import make_result, preprocess
from reconad.errors import ReconadError

from .conftest import tiny_run_overrides, write_tiny_mvtec

METHODS = ["rd4ad", "recontrast", "rdpp", "gnl", "ulsad", "ssl_ae"]
METHOD_SETTINGS = {
    "ulsad": ({"feature_dim": 16}, {"taps": ["layer2", "layer3"]}),
    "ssl_ae": ({"box_size": 3, "box_passes": 1, "corruption": {"reference_size": 128}}, {}),
}


# -- data and runs shared by the module -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("deploy")
    root = write_tiny_mvtec(base / "data", n_train=8, n_good=2, n_bad=2)
    normals = write_tiny_mvtec(base / "normals", n_train=19, n_good=0, n_bad=0, seed=7) / "stripes" / "train" / "good"
    cat = root / "stripes"
    return {"base": base, "root": root, "normals": normals, "test": cat / "test", "bad": cat / "test" / "blob",
            "masks": cat / "ground_truth", "bad_masks": cat / "ground_truth" / "blob"}


_RUNS: dict[str, Path] = {}


def trained_run(name: str, data: dict[str, Path]) -> Path:
    """A run folder of ``name`` fitted for 2 iterations on 32 px images (random resnet18), made once per module."""
    if name not in _RUNS:
        from reconad.config import make_config
        from reconad.engine import fit

        sections = tiny_run_overrides(data["root"], iterations=2)
        sections["eval"] = {"overlays": 0, "plots": False, "examples": 0}
        model, backbone = METHOD_SETTINGS.get(name, ({}, {}))
        sections["backbone"].update(backbone)
        cfg = make_config(name, model=model, **sections) if model else make_config(name, **sections)
        _RUNS[name] = Path(fit(cfg, data["base"] / f"run-{name}").run_dir)
    return _RUNS[name]


_EXPORTED: dict[str, dict] = {}
GNL_OVERRIDES = {"match_stable_sort": True}


def calibrated_export(name: str, data: dict[str, Path]) -> tuple[Path, Path, dict]:
    """(run, ONNX export folder, export metadata) of a calibrated run, exported once per module."""
    run = trained_run(name, data)
    if name not in _EXPORTED:
        if load_calibration(run) is None:
            calibrate_run(run, data["normals"], far=0.05, pixel_far=0.01)
        overrides = GNL_OVERRIDES if name == "gnl" else None
        _EXPORTED[name] = export_run(run, data["base"] / f"export-{name}", model_overrides=overrides)
    return run, data["base"] / f"export-{name}", _EXPORTED[name]


@pytest.fixture(scope="module")
def rd4ad_export(data) -> tuple[Path, Path]:
    return calibrated_export("rd4ad", data)[:2]


# -- the conformal threshold ------------------------------------------------------------------------------------
def test_conformal_threshold_is_the_order_statistic():
    scores = np.arange(1.0, 20.0)[::-1]  # 19 scores, unsorted
    assert conformal_threshold(scores, 0.05) == 19.0  # k = ceil(20 * 0.95) = 19
    assert conformal_threshold(np.arange(10.0), 0.1) == 9.0  # k = ceil(11 * 0.9) = 10
    assert conformal_threshold(np.arange(100.0), 0.1) == 90.0  # k = ceil(101 * 0.9) = 91 → value 90
    assert conformal_threshold(np.arange(99.0), 0.01) == 98.0  # 99 normals are the minimum for 1 %


def test_too_few_normals_says_how_many_are_needed():
    with pytest.raises(CalibrationError, match="needs at least 99 normal images, but only 50"):
        calibrate_from_scores(np.random.default_rng(0).normal(size=50), far=0.01)
    with pytest.raises(CalibrationError, match="no normal images"):
        calibrate_from_scores([], far=0.1)


def test_far_guarantee_holds_on_fresh_normal_draws():
    """Empirical false-alarm rate over many calibration sets and fresh normals: ≤ far on average, and close to it
    (the guarantee is tight: 1 − k/(n+1))."""
    rng = np.random.default_rng(0)
    n, far, trials, fresh = 40, 0.1, 4000, 100
    calib = rng.gamma(2.0, size=(trials, n))
    k = math.ceil((n + 1) * (1 - far))
    thresholds = np.array([conformal_threshold(row, far) for row in calib])
    np.testing.assert_array_equal(thresholds, np.sort(calib, axis=1)[:, k - 1])
    rates = (rng.gamma(2.0, size=(trials, fresh)) > thresholds[:, None]).mean(1)
    expected = 1 - k / (n + 1)  # 1 - 37/41 = 0.0976
    assert rates.mean() <= far
    assert abs(rates.mean() - expected) < 0.005


def test_normalisation_labels_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    scores, pixels = rng.normal(5, 1, 200), rng.gamma(2, size=(200, 8, 8))
    cal = calibrate_from_scores(scores, pixels, far=0.05, pixel_far=0.01, source="synthetic")
    assert cal.normalise_score(np.median(scores)) == pytest.approx(0.0)
    assert cal.normalise_score(cal.image_threshold) == pytest.approx(1.0)
    np.testing.assert_allclose(cal.normalise_map(np.array([[np.median(pixels), cal.pixel_threshold]])), [[0.0, 1.0]],
                               atol=1e-6)
    assert cal.pixel_threshold == conformal_threshold(pixels, 0.01)
    assert cal.label(cal.image_threshold) == "normal" and cal.label(np.nextafter(cal.image_threshold, 99)) == \
        "anomalous"
    assert cal.label(5.0, threshold=4.0) == "anomalous"
    assert cal.at_far(0.2).image_threshold == conformal_threshold(scores, 0.2)
    write_calibration(tmp_path, cal)
    assert load_calibration(tmp_path) == cal
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    assert load_calibration(tmp_path / "nothing") is None


def test_labelled_operating_point_matches_a_hand_count():
    cal = calibrate_from_scores(np.arange(20.0), far=0.05)  # threshold 19: nothing normal is above it
    point = labelled_operating_point(cal, [18.5, 19.5, 25.0, 30.0])
    assert point["uses_labelled_data"]
    assert point["precision_at_far_threshold"] == 1.0 and point["recall_at_far_threshold"] == 0.75
    # best F1: flag 18.5 and above → TP 4, FP 1 (the normal 19): F1 = 8/9
    assert point["f1_optimal_f1"] == pytest.approx(8 / 9)
    assert 18.0 < point["f1_optimal_threshold"] < 18.5


def test_results_never_invent_decisions():
    amap = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    bare = make_result(amap, 0.7, None)
    assert (bare.label, bare.threshold, bare.normalised_score, bare.normalised_map, bare.mask) == (None,) * 5
    given = make_result(amap, 0.7, None, threshold=0.5)
    assert given.label == "anomalous" and given.normalised_score is None and given.mask is None


# -- preprocessing ----------------------------------------------------------------------------------------------
def _odd_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "rgb_odd.png": Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
        "gray.png": Image.fromarray(rng.integers(0, 256, (41, 29), dtype=np.uint8), "L"),
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (45, 31), dtype=np.uint16)),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA"),
        "palette.png": Image.fromarray(rng.integers(0, 256, (33, 35, 3), dtype=np.uint8)).convert("P"),
        "big.jpg": Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)),
    }
    paths = []
    for name, img in arrays.items():
        img.save(folder / name)
        paths.append(folder / name)
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    return paths


@pytest.mark.parametrize("resize, size, crop", [("pil", 32, None), ("pil", 40, 32), ("cv2", 32, None),
                                                ("cv2", 64, 48)])
def test_runtime_preprocessing_equals_the_training_pipeline(tmp_path, resize, size, crop):
    from reconad.data import load_image, resize_image

    for path in _odd_images(tmp_path):
        expected = resize_image(load_image(path), size, resize, crop).numpy()
        got = preprocess(path, size, resize, crop)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=0 if resize == "pil" else 1e-6, err_msg=path.name)
    sixteen = np.asarray(Image.open(tmp_path / "gray16.png"))
    np.testing.assert_array_equal(preprocess(sixteen, size, resize, crop), preprocess(tmp_path / "gray16.png", size,
                                                                                         resize, crop))


# -- every method end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_calibrate_predict_export_detector(name, data, caplog):
    run = trained_run(name, data)
    cal = calibrate_run(run, data["normals"], far=0.05, pixel_far=0.01)
    assert cal.n_images == 19 and cal.image_threshold == max(cal.normal_scores)  # k = ceil(20·0.95) = 19 = n
    assert load_calibration(run) == cal
    out = data["base"] / f"pred-{name}"
    with caplog.at_level(logging.INFO, logger="reconad.deploy.predict"):
        summary = predict_folder(run, data["test"], out, masks=data["masks"], figures=name == "rd4ad")
    assert summary.n_images == 4 and summary.threshold == cal.image_threshold
    assert f"{summary.n_flagged} flagged" in caplog.text
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,normalised_score,label,threshold,flagged_pixels" and len(rows) == 5
    assert len(list((out / "maps").rglob("*.tiff"))) == 4 and len(list((out / "masks").rglob("*.png"))) == 4
    first = summary.rows[0]
    assert first["label"] == cal.label(first["score"])
    assert first["normalised_score"] == pytest.approx(float(cal.normalise_score(first["score"])))

    if name == "gnl":  # the official unstable sort cannot be exported: refused up front, naming the switch
        with pytest.raises(ExportError, match="EFDM.*unstable sort.*match_stable_sort=true"):
            export_run(run, data["base"] / "refused")
        assert not (data["base"] / "refused").exists()
    _, export_dir, meta = calibrated_export(name, data)
    assert meta["parity"]["passed"] and meta["parity"]["max_abs_diff_map"] <= 1e-4
    assert meta["parity"]["batch_sizes"] == [4, 1] and meta["method"] == name

    detector = Detector(export_dir)
    reference = open_predictor(run)
    if name == "gnl":
        reference.method.cfg.match_stable_sort = True
    images = sorted(data["bad"].glob("*.png"))
    for got, want in zip(detector.predict_batch(images), reference.predict_batch(images)):
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-4, rtol=0)
        assert got.score == pytest.approx(want.score, abs=1e-4 * max(1, abs(want.score)))
        assert got.label == want.label and got.threshold == cal.image_threshold
        assert got.mask.dtype == bool and got.mask.shape == (32, 32) == got.anomaly_map.shape
    assert detector.metadata["threshold_source"].startswith("conformal FAR 0.05 on 19")


@pytest.mark.parametrize("name", METHODS)
def test_openvino_runs_the_export_with_the_maps_of_onnxruntime(name, data, caplog):
    run, export_dir, _ = calibrated_export(name, data)
    images = sorted(data["test"].rglob("*.png"))
    onnx = Detector(export_dir, threads=1).predict_batch(images)
    with caplog.at_level("WARNING", logger="reconad.deploy.runtime"):
        openvino = open_predictor(export_dir, device="openvino")
    assert openvino.engine == "openvino"
    # only GNL's graph sorts: its users are pointed at ONNX Runtime, the others hear nothing
    assert ("OpenVINO's stable TopK" in caplog.text) == (name == "gnl"), caplog.text
    for got, want in zip(openvino.predict_batch(images), onnx, strict=True):
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-5 * max(1.0, want.anomaly_map.max()),
                                   rtol=0)
        assert got.score == pytest.approx(want.score, abs=1e-5 * max(1.0, abs(want.score)))
        assert got.label == want.label and got.threshold == want.threshold
    with pytest.raises(ReconadError, match="runs ONNX export folders.*reconad export"):
        open_predictor(run, device="openvino")


def test_a_device_this_machine_lacks_is_refused_by_name(data, rd4ad_export, monkeypatch):
    import onnxruntime
    import torch

    run, export_dir = rd4ad_export
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    with pytest.raises(ReconadError, match="--device cuda: torch .* finds no usable NVIDIA GPU.*--device cpu"):
        open_predictor(run, device="cuda")
    with pytest.raises(ReconadError, match="--device cuad: not a device name"):
        open_predictor(run, device="cuad")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ReconadError, match="--device cuda:1: this machine has 1 CUDA device"):
        open_predictor(run, device="cuda:1")
    # an export folder: onnxruntime would quietly run on the CPU without its CUDA provider
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ExportError, match="cannot run CUDAExecutionProvider here \\(available: CPUExecutionProvider"):
        open_predictor(export_dir, device="cuda")


def test_a_runtime_engine_that_cannot_run_says_so(rd4ad_export):
    _, export_dir = rd4ad_export
    with pytest.raises(ExportError, match="unknown runtime engine 'tensorrt'; choose one of onnxruntime, openvino"):
        Detector(export_dir, engine="tensorrt")
    with pytest.raises(ExportError, match="providers are onnxruntime's"):
        Detector(export_dir, engine="openvino", providers=["CPUExecutionProvider"])
    with pytest.raises(ExportError, match="OpenVINO cannot run .* on device 'NOSUCH' \\(devices here: .*CPU.*NOSUCH"):
        open_predictor(export_dir, device="openvino:NOSUCH")


def test_torchscript_export_passes_parity(data):
    run = trained_run("recontrast", data)
    meta = export_run(run, data["base"] / "ts-recontrast", format="torchscript")
    assert meta["parity"]["passed"] and (data["base"] / "ts-recontrast" / "model.torchscript.pt").is_file()
    with pytest.raises(ExportError, match="Detector runs ONNX"):
        Detector(data["base"] / "ts-recontrast")


# -- parity checks that can fail --------------------------------------------------------------------------------
def test_an_altered_graph_is_caught_at_export(data, monkeypatch):
    from reconad.deploy import export as export_module

    run = trained_run("rd4ad", data)
    original = export_module.ExportModule.forward
    monkeypatch.setattr(export_module.ExportModule, "forward", lambda self, images: (original(self, images)[0] + 1e-3,
                                                                                   original(self, images)[1]))
    with pytest.raises(ExportParityError, match=r"max \|Δ map\| 0.001"):
        export_run(run, data["base"] / "altered", format="torchscript")  # the check is the same for ONNX
    assert not (data["base"] / "altered").exists()
    with pytest.raises(ReconadError, match="several input files share a file name"):
        predict_folder(run, sorted(data["test"].rglob("000.png")), data["base"] / "clash")
    assert not list(data["base"].glob(".altered.*"))


def test_an_altered_onnx_file_is_caught_by_verify(rd4ad_export, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    run, export_dir = rd4ad_export
    assert verify_export(export_dir)["passed"]
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    model = onnx.load(str(copy / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest decoder/backbone weight
    arr = numpy_helper.to_array(weight).copy()
    arr.flat[:: 7] += 0.05
    weight.CopyFrom(numpy_helper.from_array(arr, weight.name))
    onnx.save(model, str(copy / "model.onnx"))
    with pytest.raises(ExportParityError, match="disagrees with eager"):
        verify_export(copy, run)


# -- thresholds are data ----------------------------------------------------------------------------------------
def test_threshold_changes_without_re_export(rd4ad_export, data, tmp_path):
    run, export_dir = rd4ad_export
    digest = hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()
    images = sorted(data["test"].rglob("*.png"))
    before = Detector(export_dir).predict_batch(images)
    looser = load_calibration(export_dir).at_far(0.5)  # from the stored normal scores: no model run
    write_calibration(export_dir, looser)
    try:
        after = Detector(export_dir).predict_batch(images)
    finally:
        write_calibration(export_dir, load_calibration(run))
    assert looser.image_threshold < before[0].threshold
    assert all(a.threshold == looser.image_threshold for a in after)
    assert [a.score for a in after] == [b.score for b in before]
    assert sum(a.label == "anomalous" for a in after) >= sum(b.label == "anomalous" for b in before)
    assert hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest() == digest
    # at predict time: an explicit threshold and a new FAR, neither touching the run
    high = predict_folder(export_dir, data["test"], tmp_path / "high", threshold=1e9, figures=False)
    assert high.n_flagged == 0 and high.threshold_source == "given (--threshold)"
    far = predict_folder(run, data["test"], tmp_path / "far", far=0.5, figures=False)
    assert far.threshold == looser.image_threshold


# -- predict's folder rules -------------------------------------------------------------------------------------
def test_predict_without_calibration_and_name_collisions(data, tmp_path, caplog):
    import shutil

    run = trained_run("rdpp", data)
    bare = tmp_path / "bare-run"
    shutil.copytree(run, bare)
    (bare / "calibration.json").unlink(missing_ok=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = Image.open(sorted(data["bad"].glob("*.png"))[0])
    img.save(inputs / "a.png")
    img.save(inputs / "a.jpg")
    with caplog.at_level(logging.WARNING):
        summary = predict_folder(bare, inputs, tmp_path / "out", figures=True)
    assert "no threshold exists" in caplog.text and "reconad calibrate" in caplog.text
    assert summary.threshold is None and summary.n_flagged is None and "no threshold exists" in summary.line()
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == ["a.jpg.tiff", "a.png.tiff"]
    assert not (tmp_path / "out" / "masks").exists()
    assert (tmp_path / "out" / "scores.csv").read_text().splitlines()[1].endswith(",,,,")
    with pytest.raises(ReconadError, match="already holds files"):
        predict_folder(bare, inputs, tmp_path / "out")
    again = predict_folder(bare, inputs, tmp_path / "out", overwrite=True, figures=False)
    assert len(again) == 2
    with pytest.raises(CalibrationError, match="no held-out normal images"):
        calibrate_run(bare)
    from reconad.run import read_run_config, write_config

    cfg = read_run_config(bare)
    cfg.data.holdout_fraction = 0.25  # 2 of the 8 training images, as fit would have held them out
    write_config(bare, cfg)
    with pytest.raises(CalibrationError, match="needs at least 99 normal images, but only 2"):
        calibrate_run(bare, far=0.01)
    held = calibrate_run(bare, far=0.34)
    assert held.source == "holdout" and held.n_images == 2 and held.image_threshold == max(held.normal_scores)


def test_labelled_data_is_reported_but_never_sets_the_threshold(data):
    run = trained_run("rd4ad", data)
    plain = calibrate_run(run, data["normals"], far=0.05, pixel_far=0.01)
    labelled = calibrate_run(run, data["normals"], far=0.05, pixel_far=0.01, anomalous_dir=data["bad"],
                             mask_dir=data["bad_masks"])
    assert labelled.image_threshold == plain.image_threshold and plain.labelled is None
    info = labelled.labelled
    assert info["uses_labelled_data"] and info["n_anomalous"] == 2
    bad_scores = [r.score for r in open_predictor(run).predict_batch(sorted(data["bad"].glob("*.png")))]
    assert info["recall_at_far_threshold"] == np.mean([s > plain.image_threshold for s in bad_scores])
    assert 0.0 <= info["pixel_recall_at_threshold"] <= 1.0 and "pixel_precision_at_threshold" in info
    assert load_calibration(run) == labelled


# -- the runtime without torch ----------------------------------------------------------------------------------
def test_runtime_runs_with_torch_blocked(rd4ad_export, data):
    _, export_dir = rd4ad_export
    image = sorted(data["bad"].glob("*.png"))[0]
    expected = Detector(export_dir).predict(image)
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from reconad.deploy.runtime import Detector\n"
        "import reconad.deploy as d; d.Calibration; d.load_calibration\n"
        f"r = Detector({str(export_dir)!r}).predict({str(image)!r})\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps([r.score, r.label, r.normalised_score]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    score, label, normalised = json.loads(done.stdout.strip().splitlines()[-1])
    assert (score, label, normalised) == (expected.score, expected.label, expected.normalised_score)


def test_export_refuses_a_non_empty_folder_and_a_missing_dataset(data, tmp_path):
    run = trained_run("rd4ad", data)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ExportError, match="already holds files"):
        export_run(run, tmp_path / "busy")
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(run, tmp_path / "fmt", format="tflite")



def test_command_line_calibrate_predict_export(data, tmp_path, capsys):
    from reconad.cli import main

    run = trained_run("rd4ad", data)
    assert main(["calibrate", str(run), "--normal", str(data["normals"]), "--far", "0.05", "--pixel_far", "0.01"]) == 0
    assert "19 normal images" in capsys.readouterr().out
    threshold = load_calibration(run).image_threshold
    assert main(["predict", str(run), str(data["bad"]), "--output", str(tmp_path / "p"), "--no_figures"]) == 0
    assert f"at threshold {threshold:.6g}" in capsys.readouterr().out
    assert not (tmp_path / "p" / "figures").exists()
    assert main(["predict", str(run), str(data["bad"]), "--output", str(tmp_path / "p")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript", "--output", str(tmp_path / "ts")]) == 0
    assert "max |Δ map|" in capsys.readouterr().out
    assert main(["export", str(trained_run("gnl", data)), "--output", str(tmp_path / "g")]) == 2
    assert "--override match_stable_sort=true" in capsys.readouterr().err
    assert main(["export", str(run), "--override", "match_stable_sort"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_fit_calibrates_at_the_end_on_held_out_normals_or_a_normal_folder(tmp_path):
    import json

    from reconad.api import fit_config
    from reconad.config import make_config
    from reconad.deploy.calibration import load_calibration

    from .conftest import tiny_run_overrides, write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "data", n_train=12)
    sections = tiny_run_overrides(root, iterations=2)
    sections["data"]["holdout_fraction"] = 0.25  # 3 held-out normals: far 0.25 needs ⌈(3+1)·0.75⌉ = 3rd score
    sections["eval"] = {"overlays": 0, "plots": False, "examples": 0, "far": 0.25, "pixel_far": 0.01}
    run = fit_config(make_config("rd4ad", **sections), tmp_path / "held").run_dir
    held = load_calibration(run)
    assert held.source == "holdout" and held.n_images == 3 and held.image_threshold == max(held.normal_scores)
    assert json.loads((run / "metrics.json").read_text())["threshold"]["image_threshold"] == held.image_threshold
    assert held.image_threshold == calibrate_run(run, far=0.25, pixel_far=0.01).image_threshold  # same as the CLI's

    sections["data"]["holdout_fraction"] = 0.0
    sections["eval"]["normal_dir"] = str(root / "stripes" / "train" / "good")
    run = fit_config(make_config("rd4ad", **sections), tmp_path / "folder").run_dir
    assert load_calibration(run).source.startswith("folder:") and load_calibration(run).n_images == 12

    sections["eval"]["far"] = 0.01  # too few normals: the run still finishes, without a threshold, and says why
    result = fit_config(make_config("rd4ad", **sections), tmp_path / "few")
    assert result.metrics and load_calibration(result.run_dir) is None
    assert "needs at least 99" in json.loads((result.run_dir / "metrics.json").read_text())["threshold"]["skipped"]


def traced_copy(run: Path, folder: Path) -> Path:
    """A copy of ``run`` whose config asks for ``eval.trace``."""
    import shutil

    import yaml

    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["eval"]["trace"] = True
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_a_run_fitted_with_eval_trace_predicts_through_its_traces_bit_for_bit(data, tmp_path):
    """The predictor takes ``eval.trace`` from the run (its only eval.* switch: it changes no bit), per batch shape."""
    from reconad.acceleration import TracedForward

    run = trained_run("rd4ad", data)
    traced_run = traced_copy(run, tmp_path / "traced")
    images = sorted(data["test"].rglob("*.png"))  # 4 test images: batches of 3 and 1
    eager, traced = open_predictor(run, batch_size=3), open_predictor(traced_run, batch_size=3)
    assert not isinstance(eager.method.forward, TracedForward)
    for _ in range(2):
        for a, b in zip(eager.predict_batch(images), traced.predict_batch(images), strict=True):
            assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
    assert isinstance(traced.method.forward, TracedForward)
    assert sorted(key[0][0] for key in traced.method.forward.traces) == [1, 3]
    assert all(traced.method.forward.traces.values())


def test_serving_a_traced_run_traces_every_batch_size_before_the_first_request(data, tmp_path):
    from reconad.serve import app_for_path

    traced_run = traced_copy(trained_run("rd4ad", data), tmp_path / "traced")
    app = app_for_path(traced_run, max_batch=3)
    traces = app.state.predictor.method.forward.traces
    assert sorted(key[0][0] for key in traces) == [1, 2, 3] and all(traces.values())
    # requests of those sizes add no trace and get the eager predictions, bit for bit
    images = sorted(data["test"].rglob("*.png"))[:3]
    eager = open_predictor(trained_run("rd4ad", data))
    for a, b in zip(eager.predict_batch(images), app.state.predictor.predict_batch(images), strict=True):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
    assert len(traces) == 3
    assert not eager.traced  # an eager run has nothing to warm up
