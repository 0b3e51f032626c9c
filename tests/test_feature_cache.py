"""The feature cache (train.feature_cache): the same training with fewer MACs, exact resume, budget, no image reads."""

from __future__ import annotations

import json

import pytest
import torch

from reconad.config import make_config
from reconad.data.dataset import ImageDataset
from reconad.engine import fit
from reconad.errors import ConfigError
from reconad.fileio import load_weights

from .conftest import tiny_run_overrides


def _config(method: str, root, **train):
    # 8 images at batch 4, 5 batches by default: crosses two epoch ends
    sections = tiny_run_overrides(root, **{"iterations": 5, **train})
    sections["eval"]["plots"] = False
    model = {}
    if method == "ulsad":
        sections["backbone"]["taps"] = ["layer2", "layer3"]
        model = {"feature_dim": 16}
    if method == "rdpp":
        model = {"noise_seed": 3}
    return make_config(method, model=model, **sections)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_weights(run / "checkpoints" / "model.safetensors")


def _train_losses(result) -> list[float]:
    return [e["loss"] for e in result.history if e["kind"] == "train"]


@pytest.mark.parametrize("method", ["rd4ad", "recontrast/full", "recontrast/config_b", "rdpp", "gnl", "ulsad"])
def test_cached_training_equals_recomputed_training(method, tiny_mvtec, tmp_path):
    recomputed = fit(_config(method, tiny_mvtec, feature_cache="off"), tmp_path / "off")
    cached = fit(_config(method, tiny_mvtec, feature_cache="on"), tmp_path / "on")
    summary = json.loads((cached.run_dir / "metrics.json").read_text())
    assert summary["feature_cache"]["bytes"] > 0
    assert "feature_cache" not in json.loads((recomputed.run_dir / "metrics.json").read_text())
    assert _train_losses(cached) == _train_losses(recomputed)
    a, b = _weights(recomputed.run_dir), _weights(cached.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert cached.metrics == recomputed.metrics


def test_cache_keys_name_what_each_method_keeps(tiny_mvtec, tmp_path):
    keys = {}
    for method in ("rd4ad", "recontrast/full", "recontrast/config_b", "gnl", "ulsad"):
        run = fit(_config(method, tiny_mvtec, iterations=1), tmp_path / method.replace("/", "_"))
        keys[method] = json.loads((run.run_dir / "metrics.json").read_text())["feature_cache"]["keys"]
    assert keys == {"rd4ad": ["cached_teacher"], "recontrast/full": ["cached_frozen"],
                    # Config B: the encoder is frozen too, and there is no twin
                    "recontrast/config_b": ["cached_encoder"], "gnl": ["cached_clean", "cached_gray"],
                    "ulsad": ["cached_features"]}


def test_rd4ad_with_the_cache_reads_each_training_image_once(tiny_mvtec, tmp_path, monkeypatch):
    reads = []
    original = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    fit(_config("rd4ad", tiny_mvtec, iterations=6, feature_cache="on"), tmp_path / "on")
    train_reads = [i for i in reads[:8]]
    assert sorted(train_reads) == list(range(8))  # the cache pass, in index order
    test_reads = len(reads) - 8
    reads.clear()
    fit(_config("rd4ad", tiny_mvtec, iterations=6, feature_cache="off"), tmp_path / "off")
    assert len(reads) - test_reads == 6 * 4  # without the cache: every batch decodes its images


def test_resume_with_the_cache_continues_exactly(tiny_mvtec, tmp_path):
    cfg = _config("gnl", tiny_mvtec, iterations=5, feature_cache="on")
    full = fit(cfg, tmp_path / "full")
    fit(cfg, tmp_path / "resumed", stop_after=3)
    resumed = fit(cfg, tmp_path / "resumed", resume=True)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _train_losses(resumed) == _train_losses(full)


def test_the_budget_decides_auto_and_refuses_on(tiny_mvtec, tmp_path):
    small = fit(_config("rd4ad", tiny_mvtec, iterations=1, feature_cache_gib=1e-9), tmp_path / "auto")
    assert "feature_cache" not in json.loads((small.run_dir / "metrics.json").read_text())
    with pytest.raises(ConfigError, match=r"--train\.feature_cache_gib 1e-09"):
        fit(_config("rd4ad", tiny_mvtec, iterations=1, feature_cache="on", feature_cache_gib=1e-9), tmp_path / "on")


def test_methods_without_frozen_networks_cache_nothing(tiny_mvtec, tmp_path):
    cfg = _config("ssl_ae", tiny_mvtec, iterations=1, feature_cache="on")
    run = fit(cfg, tmp_path / "run")
    assert "feature_cache" not in json.loads((run.run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("value,expected", [(True, "on"), (False, "off"), ("auto", "auto")])
def test_yaml_booleans_are_on_and_off(value, expected):
    from reconad.engine.cache import cache_mode

    assert cache_mode(value) == expected


def test_a_non_positive_budget_is_named(tiny_mvtec):
    from reconad.validation import validate_run_config

    with pytest.raises(ConfigError, match=r"--train\.feature_cache_gib must be a number > 0"):
        validate_run_config(_config("rd4ad", tiny_mvtec, feature_cache_gib=0))
