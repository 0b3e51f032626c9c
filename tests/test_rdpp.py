"""RD++ (official_code.md §3): noise patches, projector, every loss term, accumulation, selection, official keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reconad.backbones import create_backbone
from reconad.config import make_config
from reconad.data.noise import SimplexNoisePatch, octave_noise3
from reconad.engine import fit
from reconad.methods.rdpp import contrast_loss, reconstruction_loss, ssot_loss
from reconad.nets.rd import MultiProjectionLayer, count_parameters
from reconad.official import load_official, to_official
from reconad.registry import create_method

from .conftest import tiny_run_overrides

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "rdpp.json"  # copy of spec/official_keys


def rdpp(seed: int = 0, **config):
    torch.manual_seed(seed)
    return create_method("rdpp", backbone=create_backbone("resnet18", weights=None), **config)


# -- simplex noise ----------------------------------------------------------------------------------------------
def test_octave_noise_is_opensimplex_summed_over_octaves():
    from opensimplex import OpenSimplex

    field = octave_noise3((3, 5, 7), seed=1234)
    gen = OpenSimplex(1234)
    for z, y, x in [(0, 0, 0), (2, 4, 6), (1, 3, 2)]:
        # coordinates (channel z, row y, col x) / frequency; frequency 32 halving, amplitude ×0.6 per octave
        direct = sum(0.6**o * gen.noise3(x / (32 / 2**o), y / (32 / 2**o), z / (32 / 2**o)) for o in range(6))
        assert field[z, y, x] == pytest.approx(direct, abs=1e-12)
    assert np.abs(field).max() <= sum(0.6**o for o in range(6))


def test_patch_size_placement_and_scale_follow_the_official_draws():
    noise = SimplexNoisePatch(seed=7)
    image = torch.rand(3, 64, 48)
    sizes = []
    for s in range(150):
        np.random.seed(s)
        noisy = noise(image)
        np.random.seed(s)  # the official order of draws: h, w, then y0 ~ randint(1, H - h), x0 ~ randint(1, W - w)
        h, w = np.random.randint(10, 32), np.random.randint(10, 32)
        y0, x0 = np.random.randint(1, 64 - h), np.random.randint(1, 48 - w)
        diff = (noisy - image).double()
        expected = torch.zeros_like(diff)
        # a crop of ONE fixed 3×31×31 field, times λ = 0.2, added without clipping
        expected[:, y0:y0 + h, x0:x0 + w] = 0.2 * torch.from_numpy(noise.field()[:, :h, :w])
        torch.testing.assert_close(diff, expected, atol=1e-6, rtol=0)
        sizes += [h, w]
    assert min(sizes) == 10 and max(sizes) == 31
    assert noise.field().shape == (3, 31, 31)
    np.testing.assert_array_equal(noise.field(), octave_noise3((3, 31, 31), 7))


def test_fresh_noise_switch_and_small_images():
    fresh = SimplexNoisePatch(seed=7, fixed_field=False)
    image = torch.zeros(3, 64, 64)
    crops = []
    for s in (1, 2):
        np.random.seed(s)
        y0, x0, h, w = fresh.box(64, 64)
        np.random.seed(s)
        crops.append(fresh(image)[:, y0:y0 + 10, x0:x0 + 10])
    assert not torch.allclose(crops[0], crops[1])  # not crops of one field
    small = SimplexNoisePatch(seed=7)
    for s in range(50):
        np.random.seed(s)
        y0, x0, h, w = small.box(16, 16)
        assert 10 <= h <= 14 and 10 <= w <= 14 and y0 >= 1 and y0 + h <= 15 and x0 >= 1 and x0 + w <= 15


# -- projector --------------------------------------------------------------------------------------------------
def test_projector_keeps_shapes_and_has_official_structure():
    proj = MultiProjectionLayer([16, 32, 64])
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 64, 2, 2)]
    assert [p.shape for p in proj(feats)] == [f.shape for f in feats]
    convs = [k for k in proj.state_dict() if k.startswith("proj_a.")]
    assert convs == [f"proj_a.proj.{i}.{p}" for i in (0, 3, 6, 9) for p in ("weight", "bias")]
    assert [proj.proj_a.proj[i].out_channels for i in (0, 3, 6, 9)] == [8, 4, 8, 16]
    # spec §3.1: 15.49 M parameters with WRN50-2 taps
    assert round(count_parameters(MultiProjectionLayer([256, 512, 1024])) / 1e6, 2) == 15.49


# -- loss terms against direct computations ----------------------------------------------------------------------
def _levels(seed: int, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g, dtype=torch.float64) for c, s in ((4, 4), (6, 2), (8, 1))]


def test_reconstruction_and_contrast_terms_match_direct_formulas():
    pn, p, fn = _levels(0), _levels(1), _levels(2)
    direct_recon = 0.0
    for a, b in zip(pn, p):
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # per pixel, along channels
        direct_recon += (1 - cos).mean()
    torch.testing.assert_close(reconstruction_loss(pn, p), direct_recon)
    p[0] = -fn[0]  # one level with cos = −1 (no loss), one with cos = +1 (loss 1 − 0.5)
    p[1] = 2 * fn[1]
    direct_contrast = 0.0
    for a, b in zip(fn, p):
        cos = (a.flatten(1) * b.flatten(1)).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
        direct_contrast += torch.clamp(cos - 0.5, min=0).mean()  # max(0, cos_flat − margin), target −1
    value = contrast_loss(fn, p, margin=0.5)
    torch.testing.assert_close(value, direct_contrast)
    assert contrast_loss(fn[:1], p[:1]) == 0 and contrast_loss(fn[1:2], p[1:2]).item() == pytest.approx(0.5)


def test_ssot_is_numerically_zero_with_zero_gradient():
    proj = [t.float().requires_grad_() for t in _levels(3, b=4)]
    value = ssot_loss(proj, torch.tensor([2, 0, 3, 1]))
    value.backward()
    assert abs(value.item()) < 1e-6
    assert max(t.grad.abs().max().item() for t in proj) < 1e-6
    # against an independent batch the divergence is positive: the term itself is computed, not skipped
    from reconad.methods.rdpp import _sinkhorn

    a, b = torch.softmax(torch.randn(4, 32), -1), torch.softmax(3 * torch.randn(4, 32), -1)
    assert _sinkhorn()(a, b).item() > 1e-4


def test_total_loss_is_the_official_combination():
    method = rdpp(ssot=True).train()
    images, noisy = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    torch.manual_seed(11)
    terms = method.loss({"image": images, "noisy": noisy}, 0.0)
    with torch.no_grad():  # direct: separate passes, decoder fed the projected clean features
        feats, feats_noisy = method.encode(images), method.encode(noisy)
        proj, proj_noisy = method.proj(feats), method.proj(feats_noisy)
        recon = method.decoder(method.bottleneck(proj))
        distill = sum((1 - F.cosine_similarity(f.flatten(1), d.flatten(1))).mean() for f, d in zip(feats, recon))
        torch.manual_seed(11)
        ssot = ssot_loss(proj, torch.randperm(2))
        r, c = reconstruction_loss(proj_noisy, proj), contrast_loss(feats_noisy, proj)
    expected = distill + 0.2 * (ssot + 0.01 * r + 0.1 * c) / 1.11
    for key, value in {"distill": distill, "recon": r, "contrast": c, "ssot": ssot, "loss": expected}.items():
        torch.testing.assert_close(terms[key].detach(), value, atol=1e-5, rtol=1e-5)
    # the map compares the UNPROJECTED encoder features with the decoder
    method.eval()
    with torch.no_grad():
        for (target, rec), f, d in zip(method.pairs(images), method.encode(images),
                                       method.decoder(method.bottleneck(method.proj(method.encode(images))))):
            assert torch.equal(target, f) and torch.allclose(rec, d)


def test_param_groups_and_train_views():
    method = rdpp()
    groups = method.param_groups(make_config("rdpp").optim)
    assert [(g["name"], g["lr"]) for g in groups] == [("proj", 1e-3), ("student", 5e-3)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.proj.parameters()}
    image = torch.rand(3, 64, 64)
    np.random.seed(0)
    noisy = method.train_views(image)["noisy"]
    changed = (noisy != image).any(0)
    assert 100 <= changed.sum() <= 31 * 31 and noisy.shape == image.shape


def test_drop_odd_batches_keeps_only_the_second_gradient_of_each_pair():
    batches = [{"image": torch.rand(2, 3, 64, 64), "noisy": torch.rand(2, 3, 64, 64)} for _ in range(2)]
    paper = rdpp(ssot=False, drop_odd_batches=True).train()
    current = rdpp(ssot=False).train()
    first = paper.loss(batches[0], 0.0)
    first["loss"].backward()
    assert first["dropped"] == 1 and first["loss"].item() > 0
    assert all(p.grad is None or not p.grad.any() for p in paper.parameters())
    second = paper.loss(batches[1], 0.0)
    second["loss"].backward()
    assert second["dropped"] == 0 and int(paper.batches_seen) == 2
    current.loss(batches[1], 0.0)["loss"].backward()  # the gradient of the 2nd batch alone
    for (name, a), b in zip(paper.named_parameters(), current.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


# -- engine: accumulation, logged SSOT, test-set selection ------------------------------------------------------
def test_optimizer_steps_every_second_batch_and_ssot_is_logged(tiny_mvtec, tmp_path):
    from reconad.run import load_checkpoint

    cfg = make_config("rdpp", **tiny_run_overrides(tiny_mvtec, iterations=3, accumulate=2))
    result = fit(cfg, tmp_path / "run")
    _, state = load_checkpoint(result.run_dir)
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {1}  # 3 batches with accumulation 2: one optimizer step (after batch 2), none after batch 3
    train = [e for e in result.history if e["kind"] == "train"]
    assert len(train) == 3 and all(abs(e["ssot"]) < 1e-6 for e in train)
    assert all({"distill", "recon", "contrast", "proj"} <= e.keys() for e in train)


def test_best_test_selection_is_labelled_and_keeps_final_metrics(tiny_mvtec, tmp_path):
    sections = tiny_run_overrides(tiny_mvtec, iterations=None, epochs=2)
    sections["eval"]["selection"] = "best_test"
    result = fit(make_config("rdpp", **sections), tmp_path / "run")
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    evals = [e for e in result.history if e["kind"] == "eval"]
    assert [(e["batch"], e["epoch"], e["epoch_end"]) for e in evals] == [(2, 0, True)]  # + the final model
    candidates = evals + [{"batch": 4, "epoch": 1, **saved["metrics"]}]
    scores = [np.mean([e["pixel_auroc"], e["image_auroc"], e["aupro_per_image"]]) for e in candidates]
    best = candidates[int(np.argmax(scores))]
    assert saved["metrics"] == result.metrics  # the final model is still reported
    assert "test-set" in saved["selection"]["label"] and saved["selection"]["rule"] == "best_test"
    assert (saved["selection"]["batch"], saved["selection"]["epoch"]) == (best["batch"], best["epoch"])
    assert saved["selection"]["score"] == pytest.approx(max(scores))
    assert saved["selected_metrics"]["image_auroc"] == best["image_auroc"]
    assert result.history[-1]["kind"] == "selected"


# -- preset and official checkpoints ----------------------------------------------------------------------------
def test_preset_follows_the_official_recipe():
    assert make_config("rdpp", data={"category": "carpet"}).train.epochs == 10
    assert make_config("rdpp", data={"category": "zipper"}).train.epochs == 300
    cfg = make_config("rdpp", data={"category": "bottle"})
    assert (cfg.train.epochs, cfg.train.accumulate, cfg.train.accumulate_mean) == (200, 2, False)
    assert (cfg.data.resize, cfg.data.mask_threshold, cfg.data.batch_size) == ("cv2", 0.5, 16)
    assert (tuple(cfg.optim.betas), cfg.optim.lr, cfg.model.proj_lr) == ((0.5, 0.999), 5e-3, 1e-3)
    assert cfg.eval.selection == "last" and make_config("rd4ad").eval.selection == "last"


def test_official_checkpoint_loads_with_identical_outputs():
    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    torch.manual_seed(0)
    model = create_method("rdpp", backbone=create_backbone("wide_resnet50_2", weights=None)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = to_official("rdpp", model.state_dict())
    for key, shape in spec.items():
        if key not in state:
            state[key] = torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float)
    assert {k: list(v.shape) for k, v in state.items()} == spec
    loaded = load_official("rdpp", state)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_vectorised_noise_equals_the_scalar_opensimplex_kernel():
    from opensimplex import OpenSimplex

    from reconad.data.noise import noise3_vectorised, octave_noise3_scalar

    for seed in (0, 7, -123456789012, 2**40):
        np.testing.assert_allclose(octave_noise3((3, 31, 29), seed), octave_noise3_scalar((3, 31, 29), seed),
                                   rtol=0, atol=1e-13)
    # off-grid points in every region of the super-cell (negative coordinates too), point by point
    rng = np.random.default_rng(0)
    x, y, z = (rng.uniform(-40, 40, 3000) for _ in range(3))
    gen = OpenSimplex(99)
    expected = np.array([gen.noise3(a, b, c) for a, b, c in zip(x, y, z)])
    ours = noise3_vectorised(x, y, z, gen._perm, gen._perm_grad_index3)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-13)
    assert np.abs(expected).max() > 0.5  # the comparison covers real values, not zeros


@pytest.mark.parametrize("fixed", [True, False])
def test_batched_noise_views_equal_the_per_image_views(fixed):
    images = torch.rand(5, 3, 48, 40)
    noise = SimplexNoisePatch(seed=3, fixed_field=fixed)
    np.random.seed(11)
    per_image = torch.stack([noise(img) for img in images])
    np.random.seed(11)
    torch.testing.assert_close(noise.batch(images), per_image, rtol=0, atol=0)
    assert not torch.equal(per_image, images)


def test_rdpp_training_batch_equals_the_base_per_image_batch():
    from reconad.methods.base import Method

    model = rdpp()
    images = torch.rand(3, 3, 32, 32)
    torch.manual_seed(5)
    ours = model.training_batch(images)
    torch.manual_seed(5)
    from reconad.data.folder import seeded_rngs

    with seeded_rngs(int(torch.randint(0, 2**31 - 1, ())), 0, 0):
        reference = Method.training_batch(model, images)
    assert ours.keys() == reference.keys()
    torch.testing.assert_close(ours["noisy"], reference["noisy"], rtol=0, atol=0)
