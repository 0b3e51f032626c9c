"""The main job, shortened: `demo` trains RD4AD with the real offline EfficientNet-Lite0 weights end to end."""

import json

import pytest

from reconad import api


def test_demo_end_to_end_with_packaged_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RECONAD_CACHE", str(tmp_path / "cache"))
    results = api.demo(tmp_path / "runs", categories=["cup"], data={"image_size": 64},
                       train={"epochs": 1, "threads": 1}, eval={"overlays": 2})
    run = results["cup"].run_dir
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"image_auroc", "pixel_auroc", "aupro", "aupro_per_image"}
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert (tmp_path / "cache" / "demo-v1" / "cup" / "train" / "good").is_dir()


def test_demo_rejects_unknown_category(tmp_path):
    with pytest.raises(ValueError, match="unknown demo categories"):
        api.demo(tmp_path, categories=["bottle"])
