"""train.channels_last: NHWC training is the same training up to float32 rounding, saves NCHW-readable weights, and
resumes exactly."""

from __future__ import annotations

import pytest
import torch

from reconad.config import make_config
from reconad.engine import fit
from reconad.engine.training import to_device
from reconad.fileio import load_weights

from .conftest import tiny_run_overrides


def _config(method: str, root, **train):
    sections = tiny_run_overrides(root, **{"iterations": 4, "feature_cache": "off", **train})
    sections["eval"]["plots"] = False
    return make_config(method, **sections)


def _train_losses(result) -> list[float]:
    return [e["loss"] for e in result.history if e["kind"] == "train"]


def test_to_device_makes_only_4d_float_tensors_nhwc():
    batch = {"image": torch.rand(2, 3, 5, 5), "label": torch.ones(2, dtype=torch.long), "mask": torch.rand(2, 5, 5),
             "path": ["a", "b"]}
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    assert not moved["image"].is_contiguous()  # really NHWC strides, not a 1-channel special case
    assert torch.equal(moved["image"], batch["image"])
    assert moved["label"] is batch["label"] and moved["mask"] is batch["mask"] and moved["path"] == ["a", "b"]
    assert to_device(batch, torch.device("cpu"))["image"].is_contiguous()


@pytest.mark.parametrize("method", ["rd4ad", "recontrast/full"])
def test_channels_last_training_follows_the_float32_training(method, tiny_mvtec, tmp_path):
    nchw = fit(_config(method, tiny_mvtec), tmp_path / "nchw")
    nhwc = fit(_config(method, tiny_mvtec, channels_last=True), tmp_path / "nhwc")
    a, b = _train_losses(nchw), _train_losses(nhwc)
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # the first loss: the same sums in another order
    assert b == pytest.approx(a, rel=2e-2)  # later ones drift as Adam amplifies last-bit differences
    weights = load_weights(nhwc.run_dir / "checkpoints" / "model.safetensors")
    reference = load_weights(nchw.run_dir / "checkpoints" / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(weights[k].shape == reference[k].shape for k in weights)
    assert nhwc.metrics.keys() == nchw.metrics.keys()


def test_channels_last_training_resumes_exactly(tiny_mvtec, tmp_path):
    cfg = _config("rd4ad", tiny_mvtec, iterations=5, channels_last=True, feature_cache="on")
    full = fit(cfg, tmp_path / "full")
    fit(cfg, tmp_path / "resumed", stop_after=3)
    resumed = fit(cfg, tmp_path / "resumed", resume=True)
    a = load_weights(full.run_dir / "checkpoints" / "model.safetensors")
    b = load_weights(resumed.run_dir / "checkpoints" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _train_losses(resumed) == _train_losses(full)
