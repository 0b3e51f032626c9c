"""ULSAD (official_code.md §4): aggregation, fitted statistics, losses, maps, official checkpoints, no leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reconad.backbones import create_backbone
from reconad.maps import gaussian_blur, gaussian_kernel1d
from reconad.methods.ulsad import ULSAD, attention_loss, official_test_calibration
from reconad.nets.ulsad import ConvAutoEncoder, FeatAE, aggregate_features
from reconad.official import load_official, to_official
from reconad.registry import create_method

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "ulsad.json"  # copy of spec/official_keys


def small_ulsad(seed: int = 0, feature_dim: int = 32) -> ULSAD:
    """resnet18 (random) layer2 + layer3 = 128 + 256 channels, pooled to ``feature_dim``."""
    torch.manual_seed(seed)
    backbone = create_backbone("resnet18", taps=("layer2", "layer3"), weights=None)
    return create_method("ulsad", backbone=backbone, feature_dim=feature_dim)


def loader(images: torch.Tensor, prefix: str, batch: int = 2) -> list[dict]:
    """Batches as the engine's loaders give them (images plus their paths)."""
    chunks = [(i, images[i:i + batch]) for i in range(0, len(images), batch)]
    return [{"image": x, "path": [f"{prefix}/{j:03d}.png" for j in range(i, i + len(x))]} for i, x in chunks]


# -- aggregation and standardisation (§4.2) ------------------------------------------------------------------
def test_aggregation_is_upsample_concat_and_channel_runs_of_four():
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 16, 3, 3, generator=g)
    out = aggregate_features([fine, coarse], 6)
    up = F.interpolate(coarse, size=(6, 6), mode="bilinear", align_corners=False)
    direct = torch.cat([fine, up], 1).reshape(2, 6, 4, 6, 6).mean(2)  # runs of 4 consecutive channels
    torch.testing.assert_close(out, direct)
    corners = torch.cat([fine, F.interpolate(coarse, size=(6, 6), mode="bilinear", align_corners=True)], 1)
    assert not torch.allclose(out, corners.reshape(2, 6, 4, 6, 6).mean(2))  # the upsampling mode matters


def test_standardisation_statistics_equal_numpy_population_mean_std():
    model = small_ulsad()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.prepare(loader(images, "train"))
    with torch.no_grad():
        feats = model.aggregated(model.normalize(images)).double().numpy()  # (N, C, h, w)
    per_channel = feats.transpose(1, 0, 2, 3).reshape(feats.shape[1], -1)
    np.testing.assert_allclose(model.feat_mean_.flatten().numpy(), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.feat_std_.flatten().numpy(), per_channel.std(1, ddof=0), rtol=1e-4)
    assert model.fitted_on["features"] == [f"train/{j:03d}.png" for j in range(5)]
    assert set(model.fitted_buffers()) == {"feat_mean_", "feat_std_", "qa_local_", "qb_local_", "qa_global_",
                                           "qb_global_"}
    with torch.no_grad():
        t = model.features(model.normalize(images)).double()
    torch.testing.assert_close(t.mean(dim=(0, 2, 3)), torch.zeros(32, dtype=torch.double), atol=1e-5, rtol=0)


def test_image_normalisation_adds_eps_to_std_as_official():
    model = small_ulsad()
    x = torch.rand(1, 3, 8, 8)
    mean = torch.tensor(model.backbone.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.input_std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / (std + 1e-11))


# -- networks (§4.3, §4.4) -----------------------------------------------------------------------------------
def test_network_sizes_and_shapes_match_the_official_tables():
    with torch.device("meta"):  # parameter counts without the cost of initialising 65 M weights
        frn, ae = FeatAE(384), ConvAutoEncoder(384)
    assert round(sum(p.numel() for p in frn.parameters()) / 1e6, 2) == 65.49
    assert round(sum(p.numel() for p in ae.parameters()) / 1e6, 2) == 1.03
    assert all(not m.affine and m.eps == 1e-4 for m in ae.modules() if isinstance(m, torch.nn.BatchNorm2d))
    small = FeatAE(8).eval()
    r = small(torch.randn(2, 8, 16, 16))
    assert r.shape == (2, 16, 16, 16) and (r >= 0).all()  # the final ReLU is kept
    bound = torch.nn.init.calculate_gain("leaky_relu") * (6 / ((8 + 16) * 9)) ** 0.5  # xavier bound of conv1
    assert small.conv1.weight.abs().max() <= bound
    with torch.no_grad():
        assert ConvAutoEncoder(8).eval()(torch.randn(1, 3, 256, 256)).shape == (1, 8, 32, 32)


# -- losses (§4.5) ----------------------------------------------------------------------------------------------
def test_attention_loss_matches_a_direct_softmax_computation():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 4, 2, 3, generator=g)
    a = torch.randn(2, 4, 2, 3, generator=g, requires_grad=True)
    loss = attention_loss(t, a, 0.5)
    tn, an = t.flatten(2).transpose(1, 2).double().numpy(), a.detach().flatten(2).transpose(1, 2).double().numpy()

    def attend(q, k):  # softmax(q kᵀ / √C) k, row-wise, in numpy
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ k

    x, y = attend(tn, tn), attend(an, tn)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    expected = (((x - y) ** 2).mean(-1) + 0.5 * (1 - cos)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_loss_terms_and_gradients():
    model = small_ulsad().train()
    terms = model.loss({"image": torch.rand(2, 3, 64, 64)}, 0.0)
    assert set(terms) == {"loss", "local", "attention", "global_local"}
    assert terms["loss"].item() == pytest.approx((terms["local"] + terms["attention"] + terms["global_local"]).item())
    terms["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.frn.conv1.weight.grad is not None and model.global_ae.enconv1.weight.grad is not None


# -- maps (§4.7) ----------------------------------------------------------------------------------------------
def test_blur_is_kornia_style_torch_reflect():
    maps = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    k1 = gaussian_kernel1d(4.0, 4.0, dtype=torch.float32)
    kernel2d = (k1[:, None] * k1[None, :])[None, None]  # kornia's 33 × 33 kernel
    direct = F.conv2d(F.pad(maps, (16, 16, 16, 16), mode="reflect"), kernel2d)
    torch.testing.assert_close(gaussian_blur(maps, 4.0, padding="reflect"), direct, rtol=1e-5, atol=1e-6)
    scipy_style = gaussian_blur(maps, 4.0)
    assert not torch.allclose(gaussian_blur(maps, 4.0, padding="reflect"), scipy_style, atol=1e-4)  # scipy ≠ torch
    const = torch.full((1, 1, 20, 20), 3.0)  # reflect padding keeps constants (radius 16 > 19 would need wrapping)
    torch.testing.assert_close(gaussian_blur(const, 4.0, padding="reflect"), const)


def test_calibrated_maps_are_quantile_normalised_before_the_blur():
    model = small_ulsad().eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.prepare(loader(images, "train"))
    with torch.no_grad():
        raw_local, raw_global = model.branch_maps(images)
    model.calibrate(loader(images[:2], "holdout"))
    qa, qb = torch.quantile(raw_local[:2].flatten(), torch.tensor([0.9, 0.995]))
    assert model.qa_local_.item() == pytest.approx(qa.item(), rel=1e-5)
    assert model.qb_local_.item() == pytest.approx(qb.item(), rel=1e-5)
    with torch.no_grad():
        local, glob = model.branch_maps(images)
        pred = model(images)
    torch.testing.assert_close(local, 0.1 * (raw_local - qa) / (qb - qa), rtol=1e-4, atol=1e-5)
    qa_g, qb_g = model.qa_global_, model.qb_global_
    torch.testing.assert_close(glob, 0.1 * (raw_global - qa_g) / (qb_g - qa_g), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.anomaly_map, 0.5 * local + 0.5 * glob)
    torch.testing.assert_close(pred.score, pred.anomaly_map.flatten(1).amax(1))


# -- no leakage: quantiles come from held-out training normals only ------------------------------------------
def test_quantiles_never_see_test_images(tmp_path, monkeypatch):
    import reconad.engine as engine
    import reconad.engine.loop as loop
    from reconad.config import make_config
    from reconad.data import build_datasets

    from .conftest import tiny_run_overrides, write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "data", n_train=8)
    built = []
    original = loop.build_method
    monkeypatch.setattr(loop, "build_method", lambda cfg, **kw: built.append(original(cfg, **kw)) or built[-1])
    sections = tiny_run_overrides(root, iterations=2)
    sections["data"].update(holdout_fraction=0.25, batch_size=2)
    sections["backbone"]["taps"] = ["layer2", "layer3"]
    sections["eval"]["plots"] = False
    cfg = make_config("ulsad", model={"feature_dim": 16}, **sections)
    result = engine.fit(cfg, tmp_path / "run")
    method = built[0]
    train, holdout, test = build_datasets(cfg.data)
    paths = lambda ds: {str(r.path) for r in ds.records}  # noqa: E731
    assert set(method.fitted_on["quantiles"]) == paths(holdout)  # exactly the held-out train normals
    assert not set(method.fitted_on["quantiles"]) & (paths(test) | paths(train))
    assert set(method.fitted_on["features"]) == paths(train)  # mean/std: the training images only
    assert all("/train/good/" in p for p in method.fitted_on["quantiles"] + method.fitted_on["features"])
    assert method.calibrated and "image_auroc" in result.metrics
    from reconad.engine import load

    reloaded = load(tmp_path / "run")  # the quantiles and feature statistics are saved in the checkpoint
    torch.testing.assert_close(reloaded.qb_global_, method.qb_global_)
    torch.testing.assert_close(reloaded.feat_std_, method.feat_std_)

    official_test_calibration(method, test, batch_size=4)  # the labelled parity option does use test images
    assert set(method.fitted_on["quantiles"]) == {str(r.path) for r in test.records if r.label == 0}


# -- official checkpoints ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrn_ulsad():
    torch.manual_seed(0)
    backbone = create_backbone("wide_resnet50_2", taps=("layer2", "layer3"), weights=None)
    model = create_method("ulsad", backbone=backbone).eval()
    for m in model.modules():  # non-trivial statistics, so a wrong mapping cannot go unnoticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.feat_mean_.uniform_(-0.5, 0.5)
    model.feat_std_.uniform_(0.5, 2.0)
    for name, value in (("qa_local_", 0.1), ("qb_local_", 0.9), ("qa_global_", 0.2), ("qb_global_", 1.7)):
        getattr(model, name).fill_(value)
    return model


def official_layout_state(model) -> dict[str, torch.Tensor]:
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    state = to_official("ulsad", model.state_dict())
    for key, shape in spec.items():
        if key not in state:  # only the blur kernel, rebuilt from σ here
            state[key] = torch.zeros(shape)
    return state


def test_official_key_set_is_exactly_the_spec(wrn_ulsad):
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    state = official_layout_state(wrn_ulsad)
    assert {k: list(v.shape) for k, v in state.items()} == spec
    assert set(spec) - set(to_official("ulsad", wrn_ulsad.state_dict())) == {"model.blur.kernel"}


def test_load_official_gives_identical_outputs(wrn_ulsad):
    loaded = load_official("ulsad", official_layout_state(wrn_ulsad))
    assert loaded.calibrated and loaded.qb_global_.item() == pytest.approx(1.7)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), wrn_ulsad(images), rtol=0, atol=0)


def test_feature_dim_derived_from_the_taps_by_the_official_ratio():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", taps=("layer2", "layer3"), weights=None)  # 128 + 256 channels
    derived = create_method("ulsad", backbone=backbone)  # feature_dim None: (128 + 256) // 4
    assert derived.feature_dim == 96 and derived.frn.conv1.in_channels == 96
    assert derived.global_ae.deconv8.out_channels == 96
    assert derived.features(derived.normalize(torch.rand(1, 3, 64, 64))).shape[1] == 96
    assert create_method("ulsad", backbone=backbone, feature_dim=20).feature_dim == 20  # an int wins
    assert create_method("ulsad", backbone=backbone, feature_pool=8).feature_dim == 48
    wrn_like = type("B", (), {"feature_info": [type("T", (), {"channels": c})() for c in (512, 1024)]})()
    from reconad.methods.ulsad import ULSADConfig, derived_feature_dim
    assert derived_feature_dim(wrn_like, ULSADConfig()) == 384  # the official width on the official taps
    with pytest.raises(ValueError, match="feature_dim"):
        derived_feature_dim(wrn_like, ULSADConfig(feature_dim=0))


@pytest.mark.parametrize("out_channels", [6, 5])
def test_aggregation_equals_official_adaptive_channel_pooling(out_channels):
    g = torch.Generator().manual_seed(3)
    fine, coarse = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 16, 3, 3, generator=g)
    x = torch.cat([fine, F.interpolate(coarse, size=(6, 6), mode="bilinear", align_corners=False)], 1)
    # the official code: channels as a 1-D signal per pixel through adaptive_avg_pool1d (24 → 6 divides, → 5 not)
    official = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, 24), out_channels)
    official = official.reshape(2, 6, 6, out_channels).permute(0, 3, 1, 2)
    torch.testing.assert_close(aggregate_features([fine, coarse], out_channels), official, rtol=0, atol=1e-6)
