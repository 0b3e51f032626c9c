"""MVTec LOCO layout: loading, union masks, structural/logical AUROC and sPRO, and an engine run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from reconad.config import DataConfig
from reconad.data import build_datasets
from reconad.data.loco import LocoDataset, write_synthetic_loco
from reconad.data.transforms import DataError
from reconad.engine import EvalOutputs
from reconad.metrics import spro_auc

SIZE = 32  # images are written at 64 px and loaded at 32 px, so masks and saturation areas are rescaled


@pytest.fixture
def loco_root(tmp_path):
    return write_synthetic_loco(tmp_path / "loco", n_train=6, n_validation=2, n_good=3, n_logical=4, n_structural=4)


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), category="parts", layout="loco", image_size=SIZE, **kw)


def outputs_for(test: LocoDataset, maps: np.ndarray, scores: np.ndarray) -> EvalOutputs:
    masks = np.stack([test[i]["mask"][0].numpy() for i in range(len(test))]).astype(np.uint8)
    return EvalOutputs(maps.astype(np.float32), scores, np.asarray(test.labels), masks,
                       [str(r.path) for r in test.records], [r.defect for r in test.records])


def test_layout_splits_labels_and_union_masks(loco_root):
    cfg = cfg_for(loco_root)
    train, holdout, test = build_datasets(cfg)
    assert holdout is None and len(train) == 6 and len(LocoDataset(loco_root, "parts", "validation", cfg)) == 2
    assert [r.defect for r in test.records] == ["good"] * 3 + ["logical_anomalies"] * 4 + ["structural_anomalies"] * 4
    assert test.labels == [0] * 3 + [1] * 8 and test.has_masks
    # structural image 001 has two ground-truth channels: the sample mask is their union
    i = [str(r.path) for r in test.records].index(str(loco_root / "parts/test/structural_anomalies/001.png"))
    channels = sorted((loco_root / "parts/ground_truth/structural_anomalies/001").glob("*.png"))
    assert len(channels) == 2
    expected = np.zeros((SIZE, SIZE), bool)
    for path in channels:
        big = (np.array(Image.open(path)) != 0).astype(np.uint8) * 255
        expected |= np.asarray(Image.fromarray(big).resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255 > 0.5
    np.testing.assert_array_equal(test[i]["mask"][0].numpy().astype(bool), expected)
    assert test[0]["mask"].sum() == 0 and train[0]["image"].shape == (3, SIZE, SIZE)


def test_regions_follow_the_defects_config(loco_root):
    test = LocoDataset(loco_root, "parts", "test", cfg_for(loco_root))
    logical = test.regions(3)  # logical 000: the missing disc, relative saturation 1.0 = the whole region
    assert len(logical) == 1 and logical[0][1] == float(logical[0][0].sum())
    structural = test.regions(8)  # structural 001: two blobs, absolute saturation 20 px at 64 px → 5 px at 32
    assert len(structural) == 2
    assert all(sat == min(20 * (SIZE * SIZE) / (64 * 64), mask.sum()) for mask, sat in structural)
    assert test.regions(0) == []


def test_extra_metrics_equal_direct_computations(loco_root):
    test = LocoDataset(loco_root, "parts", "test", cfg_for(loco_root))
    rng = np.random.default_rng(0)
    maps, scores = rng.random((len(test), SIZE, SIZE)), rng.random(len(test))
    out = outputs_for(test, maps, scores)
    metrics = test.extra_metrics(out)
    defects = np.array(out.defects)
    for kind, name in (("structural_anomalies", "structural"), ("logical_anomalies", "logical")):
        sel = np.flatnonzero((defects == "good") | (defects == kind))
        assert metrics[f"{name}_image_auroc"] == pytest.approx(roc_auc_score(out.labels[sel], scores[sel]))
        direct = spro_auc(maps[sel], [test.regions(i) for i in sel], fpr_limit=0.05)
        assert metrics[f"{name}_spro"] == pytest.approx(direct)
    assert metrics["mean_image_auroc"] == pytest.approx((metrics["structural_image_auroc"]
                                                         + metrics["logical_image_auroc"]) / 2)
    assert metrics["mean_spro"] == pytest.approx((metrics["structural_spro"] + metrics["logical_spro"]) / 2)
    # a perfect map (the union mask) and perfect scores give 1 everywhere
    perfect = test.extra_metrics(outputs_for(test, out.masks.astype(np.float32), out.labels.astype(float)))
    assert all(v == pytest.approx(1.0) for v in perfect.values()) and len(perfect) == 6


def test_missing_ground_truth_and_bad_config_are_reported(loco_root):
    gt = loco_root / "parts/ground_truth/logical_anomalies/002"
    for p in gt.glob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match="No ground-truth folder"):
        LocoDataset(loco_root, "parts", "test", cfg_for(loco_root))
    (loco_root / "parts/defects_config.json").write_text(json.dumps([{"pixel_value": 255}]))
    with pytest.raises(ValueError, match="malformed"):
        LocoDataset(loco_root, "parts", "train", cfg_for(loco_root))


def test_engine_run_reports_loco_metrics(loco_root, tmp_path):
    from reconad.config import make_config
    from reconad.engine import fit

    torch.manual_seed(0)
    cfg = make_config(
        "ulsad_loco",
        data={"root": str(loco_root), "category": "parts", "image_size": SIZE, "batch_size": 3, "eval_batch_size": 8,
              "holdout_fraction": 0.2},
        backbone={"name": "resnet18", "weights": None},
        train={"iterations": 2, "accelerator": "cpu", "log_every": 1},
        eval={"overlays": 0, "plots": False, "examples": 0},
        model={"feature_dim": 16},
    )
    result = fit(cfg, tmp_path / "run")
    for key in ("image_auroc", "pixel_auroc", "structural_image_auroc", "logical_image_auroc", "mean_image_auroc",
                "structural_spro", "logical_spro", "mean_spro"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert saved["mean_spro"] == pytest.approx(result.metrics["mean_spro"])


def test_a_truncated_ground_truth_channel_names_the_file(loco_root):
    _, _, test = build_datasets(cfg_for(loco_root))
    index = next(i for i, gt in enumerate(test.gt_dirs) if gt is not None)
    channel = sorted(test.gt_dirs[index].glob("*.png"))[0]
    channel.write_bytes(channel.read_bytes()[:40])  # a cut-off download
    with pytest.raises(DataError, match=str(channel)):
        test[index]
