"""Fast inference switches (reconad.acceleration): what each changes, against the float32 path."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reconad.acceleration import apply_inference_speedups, fold_batchnorm
from reconad.backbones import create_backbone
from reconad.nets.sdc import SDCBlock
from reconad.registry import create_method, get_method_class, list_methods


def randomise_bn_statistics(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def eval_cfg(**switches) -> SimpleNamespace:
    return SimpleNamespace(**{"fold_bn": False, "channels_last": False, "precision": "32-true", "compile": False,
                              "trace": False, "rank_safe": True, **switches})


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_folded_encoder_gives_the_same_features(name):
    torch.manual_seed(0)
    backbone = create_backbone(name, weights=None).eval()
    randomise_bn_statistics(backbone)
    folded = copy.deepcopy(backbone)
    count = fold_batchnorm(folded)
    assert count > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every BN of the encoder folded
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ref, ours in zip(backbone(x), folded(x)):
            # float32 rounding of a reordered computation, relative to the features' scale
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_folded_transposed_conv_gives_the_same_output():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1), nn.BatchNorm2d(5)).eval()
    randomise_bn_statistics(plain)
    folded = copy.deepcopy(plain)
    assert fold_batchnorm(folded) == 1 and isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-6)


def test_grouped_transposed_conv_is_left_alone():
    block = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(block) == 0 and isinstance(block[1], nn.BatchNorm2d)


def calibrated(name: str, size: int = 64):
    """A random-init method with non-trivial BN statistics everywhere and its statistics fitted, in eval mode."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", weights=None, trainable=get_method_class(name).trainable_backbone)
    method = create_method(name, backbone=backbone)
    randomise_bn_statistics(method)
    batch = {"image": torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1)),
             "path": [f"fit{i}" for i in range(4)]}
    method.eval()
    method.prepare([batch])
    method.calibrate([batch])
    return method.eval()


@pytest.mark.parametrize("name", list_methods())
def test_fold_bn_folds_every_network_of_a_method_and_keeps_its_maps(name):
    plain = calibrated(name)
    fast = copy.deepcopy(plain)
    applied = apply_inference_speedups(fast, eval_cfg(fold_bn=True))
    # every BN that follows a conv is gone: the encoders', and the bottleneck's and decoder's ones too; only the SDC
    # block's BN stays, which normalises a concatenation of six branch convs
    # GNL keeps its encoder up to the last matched stage as it is (eval.rank_safe, the test below)
    kept = {id(m) for k in fast.rank_sensitive_modules() for m in k.modules()}
    left = [n for n, m in fast.named_modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in kept]
    assert applied["fold_bn"] > 0
    assert all(isinstance(fast.get_submodule(n.rsplit(".", 1)[0]), SDCBlock) for n in left), left
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # a BN folded into the wrong conv would move maps by far more than float32 rounding (BN statistics are random)
    assert_maps_close(plain, fast, images, 1e-5)


@pytest.mark.parametrize("switches", [{"fold_bn": True}, {"channels_last": True},
                                      {"fold_bn": True, "channels_last": True}])
def test_rank_safe_switches_leave_what_gnl_sorts_bit_identical(switches):
    plain = calibrated("gnl")
    fast, unsafe = copy.deepcopy(plain), copy.deepcopy(plain)
    applied = apply_inference_speedups(fast, eval_cfg(**switches))
    apply_inference_speedups(unsafe, eval_cfg(**switches, rank_safe=False))
    # the encoder up to layer2 (GNL matches layer1 and layer2): stem, layer1, layer2 with their BNs (resnet18: bn1,
    # two per block of layer1, two per block and the downsample's of layer2)
    kept = fast.rank_sensitive_modules()
    assert applied["rank_safe_modules"] == len(kept) == 6
    assert sum(isinstance(m, nn.BatchNorm2d) for k in kept for m in k.modules()) == 1 + 4 + 5
    assert all(p.is_contiguous() for k in kept for p in k.parameters())
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact, ours, folded_all = plain.encode(images), fast.encode(images), unsafe.encode(images)
    # what EFDM sorts (and so layer1 / layer2 after matching) is the float32 path's, bit for bit; with rank_safe
    # off it is only close, which can reorder near-equal values
    for level in (0, 1):
        assert torch.equal(ours[level], exact[level])
    assert not all(torch.equal(a, b) for a, b in zip(folded_all[:2], exact[:2]))
    assert not torch.equal(ours[2], exact[2])  # layer3 and the student are switched as usual
    assert_maps_close(plain, fast, images, 1e-5)


def test_rank_safe_keeps_nothing_without_matching():
    plain = calibrated("gnl")
    plain.cfg = replace(plain.cfg, match=False)
    assert plain.rank_sensitive_modules() == []
    applied = apply_inference_speedups(plain, eval_cfg(fold_bn=True))
    assert "rank_safe_modules" not in applied
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.backbone.modules())


def assert_maps_close(plain, fast, images, relative: float) -> None:
    with torch.inference_mode():
        ref, ours = plain(images), fast(images)
    scale = ref.anomaly_map.abs().max().item()
    assert (ours.anomaly_map - ref.anomaly_map).abs().max().item() <= relative * max(scale, 1.0)
    assert (ours.score - ref.score).abs().max().item() <= relative * max(ref.score.abs().max().item(), 1.0)


def test_fold_refuses_a_module_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


def rd4ad_pair():
    torch.manual_seed(0)
    method = create_method("rd4ad", backbone=create_backbone("resnet18", weights=None)).eval()
    randomise_bn_statistics(method)
    return method, copy.deepcopy(method)


def test_fold_and_channels_last_keep_float32_maps():
    plain, fast = rd4ad_pair()
    applied = apply_inference_speedups(fast, eval_cfg(fold_bn=True, channels_last=True))
    assert applied["fold_bn"] > 0 and applied["channels_last"]
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref, ours = plain(images), fast(images)
    assert ours.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(ours.anomaly_map, ref.anomaly_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.score, ref.score, rtol=0, atol=1e-5)


def test_bf16_autocast_changes_maps_a_little_and_returns_float32():
    plain, fast = rd4ad_pair()
    assert apply_inference_speedups(fast, eval_cfg(precision="bf16-mixed")) == {"precision": "bf16-mixed"}
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref, ours = plain(images), fast(images)
    assert ours.anomaly_map.dtype == torch.float32 and ours.score.dtype == torch.float32
    delta = (ours.anomaly_map - ref.anomaly_map).abs().max().item()
    assert 0 < delta < 0.1 * ref.anomaly_map.abs().max().item()  # bf16 really ran, and stayed close


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="eval.precision"):
        apply_inference_speedups(rd4ad_pair()[1], eval_cfg(precision="int8"))


def _assert_identical(ref, ours) -> None:
    assert type(ours) is type(ref)
    for name, a, b in zip(ref._fields, ref, ours, strict=True):
        assert b.dtype == a.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("name", list_methods())
def test_trace_gives_every_method_its_eager_outputs_bit_for_bit(name):
    plain = calibrated(name)
    fast = copy.deepcopy(plain)
    assert apply_inference_speedups(fast, eval_cfg(trace=True)) == {"trace": True}
    g = torch.Generator().manual_seed(3)
    full, partial = torch.rand(3, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.inference_mode():
        # several calls per shape: TorchScript's executor profiles the first runs and optimises after them
        for images in (full, partial, full, partial, full, partial, full * 0.5):
            _assert_identical(plain(images), fast(images))
    assert len(fast.forward.traces) == 2 and all(fast.forward.traces.values())  # one trace per batch shape


def test_trace_keeps_the_maps_of_the_switches_it_is_combined_with():
    plain, fast = rd4ad_pair()
    folded = copy.deepcopy(plain)
    apply_inference_speedups(folded, eval_cfg(fold_bn=True, channels_last=True))
    applied = apply_inference_speedups(fast, eval_cfg(fold_bn=True, channels_last=True, trace=True))
    assert applied["trace"] and applied["channels_last"] and applied["fold_bn"] > 0
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        for _ in range(3):
            _assert_identical(folded(images), fast(images))
    key = next(iter(fast.forward.traces))
    assert key[-1] is True  # traced with the NHWC input the channels_last hook makes


def test_trace_sees_weights_changed_after_tracing():
    """Parameters are the trace's live attributes, not constants copied when it was recorded."""
    plain, fast = rd4ad_pair()
    apply_inference_speedups(fast, eval_cfg(trace=True))
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        fast(images), fast(images)
        for module in (plain, fast):
            module.decoder.layer1[0].conv1.weight.mul_(0.5)
        _assert_identical(plain(images), fast(images))


def test_a_trace_that_differs_is_not_used(monkeypatch, caplog):
    plain, fast = rd4ad_pair()
    apply_inference_speedups(fast, eval_cfg(trace=True))
    wrong = SimpleNamespace(calls=0)

    def bad_trace(module, images, **_):
        def run(x):
            wrong.calls += 1
            return tuple(t + 1 for t in module(x))
        return run

    monkeypatch.setattr(torch.jit, "trace", bad_trace)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="reconad.acceleration"):
        first, second = fast(images), fast(images)
    assert "does not reproduce the eager outputs" in caplog.text
    assert wrong.calls == 1  # only the check ran the bad trace; both calls returned eager outputs
    with torch.inference_mode():
        ref = plain(images)
    _assert_identical(ref, first)
    _assert_identical(ref, second)


@pytest.mark.parametrize("switches", [{"precision": "bf16-mixed"}, {"compile": True}])
def test_trace_refuses_what_it_cannot_replay(switches):
    with pytest.raises(ValueError, match="eval.trace .* cannot be combined"):
        apply_inference_speedups(rd4ad_pair()[1], eval_cfg(trace=True, **switches))


def test_a_fit_with_eval_trace_evaluates_to_the_same_scores(tiny_mvtec, tmp_path, monkeypatch):
    """End to end: the final evaluation runs through the traces (a full and a partial batch) and gives the scores
    and metrics of the eager run, bit for bit; metrics.json records the switch."""
    from reconad.config import make_config
    from reconad.engine import fit

    from .conftest import tiny_run_overrides

    def run(trace: bool, name: str):
        sections = tiny_run_overrides(tiny_mvtec)
        sections["data"]["eval_batch_size"] = 4  # 6 test images: a batch of 4 and one of 2
        sections["eval"].update(plots=False, overlays=0, trace=trace)
        return fit(make_config("rd4ad", **sections), tmp_path / name)

    eager = run(False, "eager")
    traced_shapes = []
    real_trace = torch.jit.trace

    def spy(module, images, **kwargs):
        traced_shapes.append(tuple(images.shape))
        return real_trace(module, images, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", spy)
    traced = run(True, "traced")
    assert traced_shapes == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert traced.metrics == eager.metrics
    assert (traced.run_dir / "test_scores.csv").read_text() == (eager.run_dir / "test_scores.csv").read_text()
    summary = json.loads((traced.run_dir / "metrics.json").read_text())
    assert summary["inference"] == {"trace": True}
