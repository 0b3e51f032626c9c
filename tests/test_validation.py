"""reconad.validation: every invalid setting is a one-line ConfigError naming it, before anything is built, written
or downloaded; the image-size rules agree with the networks themselves; presets map taps by stride."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from reconad.backbones import create_backbone, tap_info
from reconad.config import list_presets, make_config
from reconad.errors import ConfigError
from reconad.registry import get_method_class
from reconad.validation import config_problems, size_rule, validate_run_config, validate_study_cells


def _error(preset: str = "rd4ad", **sections) -> str:
    """The message of the ConfigError that validation raises for ``preset`` with ``sections`` overrides."""
    cfg = make_config(preset, **sections)
    with pytest.raises(ConfigError) as info:
        validate_run_config(cfg)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


INVALID = [
    ({"data": {"batch_size": 0}}, "--data.batch_size"),
    ({"data": {"batch_size": -2}}, "--data.batch_size"),
    ({"data": {"eval_batch_size": 0}}, "--data.eval_batch_size"),
    ({"data": {"image_size": 0}}, "--data.image_size"),
    ({"data": {"image_size": 256, "crop_size": 320}}, "--data.crop_size"),
    ({"data": {"crop_size": 0}}, "--data.crop_size"),
    ({"data": {"holdout_fraction": 1.0}}, "--data.holdout_fraction"),
    ({"data": {"holdout_fraction": -0.1}}, "--data.holdout_fraction"),
    ({"data": {"num_workers": -1}}, "--data.num_workers"),
    ({"optim": {"lr": 0.0}}, "--optim.lr"),
    ({"optim": {"lr": -0.005}}, "--optim.lr"),
    ({"optim": {"lr": float("nan")}}, "--optim.lr"),
    ({"optim": {"weight_decay": -1e-5}}, "--optim.weight_decay"),
    ({"optim": {"milestones": [0.8, 0.5]}}, "--optim.milestones"),
    ({"train": {"iterations": 0}}, "--train.iterations"),
    ({"train": {"iterations": -3}}, "--train.iterations"),
    ({"train": {"steps": 0}}, "--train.steps"),
    ({"train": {"epochs": 0}}, "--train.epochs"),
    ({"train": {"epochs": None, "iterations": None, "steps": None}}, "--train.epochs"),
    ({"train": {"accumulate": 0}}, "--train.accumulate"),
    ({"train": {"log_every": 0}}, "--train.log_every"),
    ({"train": {"checkpoint_every": 0}}, "--train.checkpoint_every"),
    ({"train": {"checkpoint_minutes": 0.0}}, "--train.checkpoint_minutes"),
    ({"train": {"eval_every": 0}}, "--train.eval_every"),
    ({"eval": {"fpr_limit": 0.0}}, "--eval.fpr_limit"),
    ({"eval": {"fpr_limit": 1.5}}, "--eval.fpr_limit"),
    ({"eval": {"overlays": -1}}, "--eval.overlays"),
    ({"data": {"image_size": 70}}, "--data.image_size"),
    ({"data": {"image_size": 8}}, "--data.image_size"),
    ({"data": {"image_size": 256, "crop_size": 230}}, "--data.crop_size"),
    ({"backbone": {"taps": ["layer1", "conv5"]}}, "--backbone.taps"),
    ({"backbone": {"taps": ["stride64"]}}, "--backbone.taps"),
    ({"backbone": {"taps": ["layer2", "layer3"]}}, "--backbone.taps"),
    ({"backbone": {"taps": ["layer3", "layer1", "layer2"]}}, "--backbone.taps"),
    ({"backbone": {"weights": "/nowhere/encoder.safetensors"}}, "--backbone.weights"),
    ({"model": {"width_ratio": -0.5}}, "--model.width_ratio"),
]


@pytest.mark.parametrize(("overrides", "setting"), INVALID, ids=[f"{s}={o}" for o, s in INVALID])
def test_invalid_setting_is_a_one_line_config_error_naming_it(overrides: dict, setting: str) -> None:
    assert setting in _error("rd4ad", **overrides)


def test_every_problem_is_reported_at_once() -> None:
    message = _error("rd4ad", data={"batch_size": 0}, optim={"lr": -1.0}, train={"iterations": -3})
    assert "--data.batch_size" in message and "--optim.lr" in message and "--train.iterations" in message
    assert "0 does not mean 'train by epochs'" in _error("rd4ad", train={"iterations": 0})


def test_wrong_image_size_says_what_to_use() -> None:
    message = _error("rd4ad", data={"image_size": 70})
    assert "multiple of 32" in message and "64 or 96" in message
    assert "--data.image_size 256" not in message  # it suggests, it does not echo a fixed default


def test_unknown_tap_lists_the_backbones_stages_and_strides() -> None:
    message = _error("rd4ad", backbone={"name": "resnet18", "taps": ["layer1", "conv5"]})
    assert "stem, layer1, layer2, layer3, layer4" in message and "strides 4, 4, 8, 16, 32" in message
    assert "stride8" in message


@pytest.mark.parametrize(
    ("method", "overrides", "setting"),
    [
        ("ulsad", {"backbone": {"name": "efficientnet_lite0"}, "model": {"feature_dim": 384}}, "--model.feature_dim"),
        ("ulsad", {"model": {"n_levels": 4}}, "--model.n_levels"),
        ("ulsad", {"model": {"feature_pool": 0}}, "--model.feature_pool"),
        ("ulsad", {"data": {"batch_size": 1}}, "--data.batch_size"),
        ("ulsad", {"data": {"image_size": 8}}, "--data.image_size"),
        ("gnl", {"model": {"match_stages": ["layer4"]}}, "--model.match_stages"),
        ("gnl", {"model": {"reference_count": 0}}, "--model.reference_count"),
        ("ssl_ae", {"model": {"kernel": 4}}, "--model.kernel"),
        ("ssl_ae", {"data": {"image_size": 60}}, "--data.image_size"),
    ],
)
def test_method_specific_settings(method: str, overrides: dict, setting: str) -> None:
    assert setting in _error(method, **overrides)


def test_ulsad_width_message_offers_the_derived_width() -> None:
    message = _error("ulsad", backbone={"name": "efficientnet_lite0"}, model={"feature_dim": 384})
    assert "152 channels" in message and "--model.feature_dim null" in message and "(38)" in message


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_is_valid_without_weights_or_files(
    preset: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_download(url: str, *args: object, **kwargs: object) -> dict:
        raise AssertionError(f"validation downloaded {url}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.chdir(tmp_path)
    cfg = make_config(preset)
    assert config_problems(cfg) == []
    validate_run_config(cfg)
    assert os.listdir(tmp_path) == []  # nothing written


def test_study_cells_are_all_checked_before_any_trains() -> None:
    good = make_config("rd4ad", data={"category": "bottle"})
    bad_size = make_config("rd4ad", data={"category": "carpet", "image_size": 70})
    bad_ulsad = make_config("ulsad", backbone={"name": "efficientnet_lite0"}, model={"feature_dim": 384})
    validate_study_cells([good, good])
    with pytest.raises(ConfigError) as info:
        validate_study_cells([good, bad_size, bad_ulsad])
    message = str(info.value)
    assert "2 of 3 study cells" in message and "\n" not in message
    assert "rd4ad/wide_resnet50_2/carpet" in message and "--data.image_size" in message
    assert "ulsad/efficientnet_lite0" in message and "--model.feature_dim" in message
    assert "wide_resnet50_2/bottle" not in message  # the valid cell is not blamed
    with pytest.raises(ConfigError, match="cell lr0: --optim.lr"):
        validate_study_cells({"ok": good, "lr0": make_config("rd4ad", optim={"lr": 0.0})})


# -- taps by stride in presets -----------------------------------------------------------------------------------
def test_ulsad_preset_taps_follow_the_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconad.run import build_method

    official = make_config("ulsad")
    assert [t.name for t in tap_info(official.backbone.name, official.backbone.taps)] == ["layer2", "layer3"]
    lite = make_config("ulsad", backbone={"name": "efficientnet_lite0", "weights": None})
    validate_run_config(lite)
    method = build_method(lite)
    assert method.backbone.taps == ("blocks.2", "blocks.4")
    assert method.feature_dim == (40 + 112) // 4  # derived from the backbone, not the WRN50-2 value 384


def test_ulsad_official_backbone_is_unchanged_by_stride_taps() -> None:
    from reconad.methods.ulsad import derived_feature_dim

    cfg = make_config("ulsad")
    by_stride = create_backbone(cfg.backbone.name, taps=cfg.backbone.taps, weights=None)
    by_name = create_backbone(cfg.backbone.name, taps=("layer2", "layer3"), weights=None)
    assert by_stride.taps == by_name.taps == ("layer2", "layer3")
    assert list(by_stride.state_dict()) == list(by_name.state_dict())
    assert derived_feature_dim(by_stride, cfg.model) == 384  # the official width


# -- the size rules against the networks ------------------------------------------------------------------------
def _network_takes(method, side: int) -> bool:
    """Whether training and inference run at ``side`` and every reconstruction has its target's shape."""
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    try:
        with torch.no_grad():
            method.train()
            method.loss(method.training_batch(x), 0.99)
            method.eval()
            same = all(t.shape == r.shape for t, r in method.pairs(x))
            return same and tuple(method(x).anomaly_map.shape[-2:]) == (side, side)
    except (RuntimeError, ValueError):  # a size mismatch deep in the network, or its own shape check
        return False


RULE_CASES = [
    ("rd4ad", "resnet18", None, range(20, 71)),
    ("rd4ad", "efficientnet_lite0", None, [28, 29, 32, 33, 60, 61, 64, 65]),
    ("rd4ad", "resnet18", ["stride8", "stride16", "stride32"], [48, 56, 57, 64, 65, 72]),
    ("gnl", "resnet18", None, [28, 29, 32, 33, 64, 65, 70]),
    ("rdpp", "resnet18", None, [28, 29, 32, 33, 64, 65, 70]),
    ("recontrast", "resnet18", None, [28, 29, 32, 33, 64, 65, 70]),
    ("ulsad", "resnet18", None, [8, 16, 24, 25, 32, 33, 40, 56, 57, 64, 65]),
    ("ulsad", "efficientnet_lite0", ["stride8", "stride16"], [8, 24, 25, 32, 33]),
    ("ssl_ae", "resnet18", None, [8, 12, 16, 20, 24, 30, 32, 36, 40]),
]


@pytest.mark.parametrize(("method_name", "backbone", "taps", "sides"), RULE_CASES,
                         ids=[f"{m}-{b}-{t}" for m, b, t, _ in RULE_CASES])
def test_size_rule_accepts_exactly_the_sides_the_network_takes(method_name, backbone, taps, sides) -> None:
    torch.manual_seed(0)
    cls = get_method_class(method_name)
    method = cls(cls.Config(), create_backbone(backbone, taps=taps, weights=None, trainable=cls.trainable_backbone))
    rule = size_rule(cls, cls.Config(), tap_info(backbone, taps))
    takes = {side: _network_takes(method, side) for side in sides}
    assert {s: rule.accepts(s) for s in sides} == takes
    assert any(takes.values()) and not all(takes.values())  # the range shows both outcomes


def test_backbone_weights_null_is_allowed_and_taps_by_stride_validate() -> None:
    validate_run_config(make_config("rd4ad", backbone={"name": "resnet18", "weights": None,
                                                       "taps": ["stride4", "stride8", "stride16"]}))


def test_validation_reads_no_weights_file(tmp_path: Path) -> None:
    # a weights file is only checked to exist: its content (here not even a tensor file) is read when building
    file = tmp_path / "encoder.pth"
    file.write_bytes(b"not read by validation")
    validate_run_config(make_config("rd4ad", backbone={"weights": str(file)}))


def test_offline_machine_can_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def no_network(url: str, *args: object, **kwargs: object) -> dict:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    validate_run_config(make_config("ulsad"))
    assert not (tmp_path / "empty_home").exists()
