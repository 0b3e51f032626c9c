"""ReContrast: the ablation ladder as presets on one implementation, hard mining, frozen twin, official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reconad.backbones import create_backbone
from reconad.config import OptimConfig, make_config
from reconad.losses import global_cosine, hard_mining_mask, mask_gradient
from reconad.maps import anomaly_map, cosine_distance_map
from reconad.methods.recontrast import ReContrast, feature_diversity
from reconad.registry import create_method

from .conftest import tiny_run_overrides

SIZE = 64
LADDER = {  # preset → (train_encoder, loss, stop_gradient, contrast_pairs, hard_mining), paper Table 5 and §3.4
    "config_a": (False, "regional", None, False, False),
    "config_b": (False, "global", None, False, False),
    "config_b_plus": (False, "global", None, False, True),
    "config_c": (True, "global", False, False, False),
    "config_d": (True, "global", True, False, False),
    "config_e_minus": (True, "global", False, True, False),
    "config_e": (True, "global", True, True, False),
    "full": (True, "global", True, True, True),
}
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "recontrast.json"  # copy of spec/official_keys


def build(seed: int = 0, backbone: str = "resnet18", **cfg) -> ReContrast:
    torch.manual_seed(seed)
    return create_method("recontrast", backbone=create_backbone(backbone, weights=None, trainable=True), **cfg)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def adamw(method: ReContrast) -> torch.optim.Optimizer:
    optim = OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-5)
    return torch.optim.AdamW(method.param_groups(optim), betas=optim.betas, weight_decay=optim.weight_decay)


# -- the ladder ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(LADDER))
def test_every_ladder_preset_builds_trains_and_predicts(preset):
    cfg = make_config(f"recontrast/{preset}", data={"category": "bottle"})
    m = cfg.model
    train_encoder, loss, stop_gradient, pairs, hard_mining = LADDER[preset]
    assert (m.train_encoder, m.loss, m.contrast_pairs, m.hard_mining) == (train_encoder, loss, pairs, hard_mining)
    if stop_gradient is not None:
        assert m.stop_gradient == stop_gradient
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.iterations, cfg.data.mask_threshold) == ("adamw", 2e-3, 2000, 0.0)
    torch.manual_seed(0)
    method = ReContrast(m, create_backbone("resnet18", weights=None, trainable=True)).train()
    assert method.backbone.trainable == train_encoder and (method.frozen_backbone is not None) == pairs
    optimizer = adamw(method)
    terms = method.loss({"image": images()}, progress=0.0)
    assert terms["loss"].requires_grad and all(torch.isfinite(v) for v in terms.values())
    assert ("hm_discard_rate" in terms) == hard_mining
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    terms["loss"].backward()
    optimizer.step()
    changed = {n.split(".")[0] for n, p in method.named_parameters() if not torch.equal(before[n], p)}
    assert changed == ({"backbone", "bottleneck", "decoder"} if train_encoder else {"bottleneck", "decoder"})
    pred = method.predict(images(3))
    assert pred.anomaly_map.shape == (3, 1, SIZE, SIZE) and torch.isfinite(pred.score).all()


def test_per_category_encoder_bn_lists():
    assert not make_config("recontrast/full", data={"category": "screw"}).model.encoder_bn_train
    assert make_config("recontrast/full", data={"category": "bottle"}).model.encoder_bn_train
    assert not make_config("recontrast/visa", data={"category": "pcb1"}).model.encoder_bn_train
    assert not make_config("recontrast/oct").model.encoder_bn_train
    isic = make_config("recontrast/isic")
    assert (isic.data.crop_size, isic.model.maps.score, isic.train.iterations) == (224, "mean", 2000)


def test_config_b_is_rd4ad_with_the_same_loss():
    torch.manual_seed(0)
    rd = create_method("rd4ad", backbone=create_backbone("resnet18", weights=None))
    cfg = make_config("recontrast/config_b").model
    rc = ReContrast(cfg, create_backbone("resnet18", weights=None, trainable=True))
    rc.load_state_dict(rd.state_dict(), strict=True)  # same modules, same names
    batch = {"image": images(4)}
    rd.train(), rc.train()
    torch.testing.assert_close(rc.loss(batch, 0.3)["loss"], rd.loss(batch, 0.3)["loss"], rtol=0, atol=0)
    torch.testing.assert_close(rc.predict(batch["image"]), rd.predict(batch["image"]), rtol=0, atol=0)
    assert [len(g["params"]) for g in rc.param_groups(OptimConfig())] == \
        [len(g["params"]) for g in rd.param_groups(OptimConfig())]


def test_contrast_pairs_without_a_trained_encoder_is_rejected():
    with pytest.raises(ValueError, match="contrast_pairs needs train_encoder"):
        build(train_encoder=False, contrast_pairs=True)


# -- the six cross pairs and the map ---------------------------------------------------------------------------------
def test_cross_pairs_match_the_official_forward():
    method = build(1).eval()
    x = images(3)
    with torch.no_grad():
        pairs = method.pairs(x)
        # official: both heads on the whole 2B batch, head 0 kept on the trained half, head 1 on the frozen half
        norm = method.backbone.normalize(x)
        trn, frz = method.backbone(norm), method.frozen_backbone(norm)
        out = method.decoder(method.bottleneck([torch.cat([t, f]) for t, f in zip(trn, frz)]))
        de = [o[:3] for o in out[:3]] + [o[3:] for o in out[3:]]
        en = frz + trn
    assert len(pairs) == 6
    for (target, recon), e, d in zip(pairs, en, de):
        torch.testing.assert_close(target, e, rtol=0, atol=0)
        torch.testing.assert_close(recon, d, rtol=1e-5, atol=1e-6)
    expected = anomaly_map(list(zip(en, de)), (SIZE, SIZE), method.cfg.maps)
    torch.testing.assert_close(method.predict(x).anomaly_map, expected, rtol=1e-4, atol=1e-5)


# -- hard mining -----------------------------------------------------------------------------------------------------
def test_gradient_mask_zeroes_easy_pixels_and_keeps_hard_ones_exactly():
    g = torch.Generator().manual_seed(0)
    target, base = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    recon = base.clone().requires_grad_(True)
    keep = hard_mining_mask(target, recon, alpha=0.0)
    dist = cosine_distance_map(target, base)
    assert torch.equal(keep, dist >= dist.mean() + 0.0 * dist.std())  # unbiased std, per batch
    assert 0 < keep.sum() < keep.numel()
    masked = global_cosine(target, mask_gradient(recon, keep))
    (grad_masked,) = torch.autograd.grad(masked, recon)
    plain = base.clone().requires_grad_(True)
    loss_plain = global_cosine(target, plain)
    (grad_plain,) = torch.autograd.grad(loss_plain, plain)
    torch.testing.assert_close(masked, loss_plain, rtol=0, atol=0)  # the printed loss covers every pixel
    keep_c = keep.expand_as(recon)
    assert torch.equal(grad_masked[~keep_c], torch.zeros_like(grad_masked[~keep_c]))
    assert torch.equal(grad_masked[keep_c], grad_plain[keep_c])


def test_alpha_minus_infinity_equals_plain_global_cosine():
    x = {"image": images(2)}
    grads = []
    for cfg in ({"hard_mining": True, "alpha_start": float("-inf"), "alpha_end": float("-inf")},
                {"hard_mining": False}):
        method = build(2, **cfg).train()
        terms = method.loss(x, progress=0.5)
        terms["loss"].backward()
        grads.append((terms["loss"].detach(), [p.grad.clone() for p in method.parameters() if p.grad is not None]))
        if cfg["hard_mining"]:
            assert terms["hm_discard_rate"] == 0
    (loss_hm, g_hm), (loss_plain, g_plain) = grads
    torch.testing.assert_close(loss_hm, loss_plain, rtol=0, atol=0)
    assert len(g_hm) == len(g_plain)
    for a, b in zip(g_hm, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_alpha_ramp_and_discard_rate_follow_the_official_schedule():
    method = build()
    assert [method.alpha(p) for p in (0.0, 0.05, 0.1, 0.7)] == [-3.0, -1.0, 1.0, 1.0]
    terms = build().train().loss({"image": images(2)}, progress=1.0)
    # α = 1 discards roughly the pixels below mean + 1 std (84 % for a Gaussian, paper Table A4)
    assert terms["alpha"] == 1.0 and 0.5 < terms["hm_discard_rate"] < 1.0


def test_stop_gradient_changes_only_the_encoder_gradient():
    x = {"image": images(2)}
    grads = {}
    for sg in (True, False):
        method = build(3, stop_gradient=sg, hard_mining=False).train()
        method.loss(x, progress=0.5)["loss"].backward()
        grads[sg] = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    for name, g in grads[True].items():
        if name.startswith(("decoder.", "bottleneck.")):
            torch.testing.assert_close(g, grads[False][name])
    enc = [n for n in grads[True] if n.startswith("backbone.")]
    assert enc and any(not torch.allclose(grads[True][n], grads[False][n]) for n in enc)


# -- encoders --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_train", [True, False])
def test_frozen_twin_never_changes_and_encoder_bn_follows_its_mode(bn_train):
    method = build(4, encoder_bn_train=bn_train).train()
    assert not method.frozen_backbone.training and not method.frozen_backbone.trainable
    twin = {n: t.clone() for n, t in method.frozen_backbone.state_dict().items()}
    encoder_stats = bn_stats(method.backbone)
    encoder_params = {n: p.detach().clone() for n, p in method.backbone.named_parameters()}
    optimizer = adamw(method)
    for step in range(2):
        optimizer.zero_grad()
        method.loss({"image": images(2, seed=step)}, progress=step / 2)["loss"].backward()
        optimizer.step()
    assert all(torch.equal(twin[n], t) for n, t in method.frozen_backbone.state_dict().items())
    assert all(p.grad is None for p in method.frozen_backbone.parameters())
    stats_changed = any(not torch.equal(encoder_stats[n], b) for n, b in bn_stats(method.backbone).items())
    assert stats_changed == bn_train
    assert any(not torch.equal(encoder_params[n], p) for n, p in method.backbone.named_parameters())


def test_param_groups_encoder_lr_and_no_twin_parameters():
    method = build()
    groups = method.param_groups(OptimConfig(lr=2e-3))
    assert [(g["name"], g["lr"]) for g in groups] == [("student", 2e-3), ("encoder", 1e-5)]
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in method.frozen_backbone.parameters())
    assert ids == {id(p) for n, p in method.named_parameters() if not n.startswith("frozen_backbone.")}


def test_feature_diversity_definition():
    f = torch.randn(2, 5, 4, 4)
    unit = f / f.norm(dim=1, keepdim=True)
    expected = unit.flatten(2).std(dim=2).mean()
    torch.testing.assert_close(feature_diversity(f), expected)
    same_direction = torch.rand(1, 5, 1, 1) * torch.rand(2, 1, 4, 4).add(0.5)  # one direction everywhere
    assert feature_diversity(same_direction) < 1e-6
    terms = build().train().loss({"image": images(2)}, progress=0.0)
    assert {f"diversity/{e}/l{k}" for e in ("trainable", "frozen") for k in (1, 2, 3)} <= set(terms)


# -- official checkpoints --------------------------------------------------------------------------------------------
def test_official_layout_round_trip_on_wide_resnet():
    from reconad.official import load_official, to_official

    model = build(5, backbone="wide_resnet50_2").eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong mapping cannot go unnoticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    state = to_official("recontrast", model.state_dict())
    for key, shape in spec.items():
        if key not in state:  # the dead OCBE conv4/bn4
            state[key] = torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float)
    assert {k: list(v.shape) for k, v in state.items()} == spec
    loaded = load_official("recontrast", state)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# -- end to end ------------------------------------------------------------------------------------------------------
def test_fit_logs_loss_terms_alpha_discard_rate_and_diversity(tiny_mvtec, tmp_path):
    from reconad.engine import fit

    cfg = make_config("recontrast/full", **tiny_run_overrides(tiny_mvtec, iterations=3))
    result = fit(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert len(train) == 3
    keys = {"loss", "loss/frozen", "loss/trainable", "loss/frozen/l1", "alpha", "hm_discard_rate",
            "diversity/trainable/l2", "diversity/frozen/l2"}
    assert keys <= set(train[0])
    assert [r["alpha"] for r in train] == [-3.0, 1.0, 1.0]  # 3 iterations: progress 0, 1/3, 2/3
    assert 0 <= result.metrics["image_auroc"] <= 1


# -- multi-class setting: one model over several categories ----------------------------------------------------------
def test_multi_category_data_and_multiclass_preset(tmp_path):
    from reconad.data.folder import DataError, build_datasets
    from reconad.engine import fit

    from .conftest import write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path / "data", "stripes", n_train=5, seed=0)
    write_tiny_mvtec(root, "waves", n_train=3, n_good=2, n_bad=1, seed=1)
    cfg = make_config("recontrast/multiclass", data={"root": str(root), "categories": ["stripes", "waves"],
                                                     "image_size": 32})
    assert (cfg.model.decoder_act, cfg.optim.amsgrad, cfg.optim.eps, cfg.model.maps.score) == \
        ("gelu", True, 1e-10, "topk")
    train, _, test = build_datasets(cfg.data)
    single = [build_datasets(make_config("recontrast/full", data={"root": str(root), "category": c}).data)
              for c in ("stripes", "waves")]
    assert [r.path for r in train.records] == [r.path for s in single for r in s[0].records]
    assert [r.path for r in test.records] == [r.path for s in single for r in s[2].records]
    assert len(train) == 8 and len(test) == 9 and test.has_masks
    with pytest.raises(DataError, match="either data.category"):
        build_datasets(make_config("recontrast/multiclass", data={"root": str(root), "category": "waves"}).data)
    overrides = tiny_run_overrides(root, iterations=2)
    overrides["data"] = {**overrides["data"], "category": None, "categories": ["stripes", "waves"]}
    result = fit(make_config("recontrast/multiclass", **overrides), tmp_path / "run")
    assert 0 <= result.metrics["image_auroc"] <= 1
