"""Bauer et al. SDC autoencoder (ssl_ae): network sizes, corruption generator, objectives, maps, calibration, run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from reconad.data.corruptions import CorruptionConfig, CorruptionGenerator, area_cap_fraction, augment
from reconad.maps import box_filter, ssim_map
from reconad.methods.ssl_ae import (
    SSLAE,
    SSLAEConfig,
    difference_map,
    max_ensemble,
    restore_objective,
    segment_objective,
)
from reconad.nets.sdc import SDCAutoencoder, conv_weight_count

from .conftest import tiny_run_overrides


def smooth_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.uniform(0, 1, (size, size, 3)), (3, 3, 0))
    img = (img - img.min()) / (img.max() - img.min())
    return torch.from_numpy(img).permute(2, 0, 1).float()


# -- network (spec §2) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "millions"), [(3, 14.12), (5, 22.77)])
def test_layer_shapes_and_conv_weight_count_at_256(kernel, millions):
    with torch.device("meta"):  # shapes without computing: a 256 px pass costs ~40 GMAC
        net = SDCAutoencoder(kernel)
    shapes = {}
    for name, module in [*net.encoder.named_children(), *net.bottleneck.named_children(),
                         *net.decoder.named_children()]:
        prefix = "enc" if module in net.encoder else "sdc" if module in net.bottleneck else "dec"
        module.register_forward_hook(lambda m, i, o, key=f"{prefix}{name}": shapes.__setitem__(key, tuple(o.shape)))
    out = net(torch.empty(1, 3, 256, 256, device="meta"))
    assert tuple(out.shape) == (1, 3, 256, 256)
    # Table 1 scaled to 256: conv×2 + pool per encoder stage, 4 SDC blocks at 32², mirrored decoder
    assert [shapes[f"enc{i}"] for i in (2, 5, 8)] == [(1, 64, 128, 128), (1, 128, 64, 64), (1, 256, 32, 32)]
    assert [shapes[f"sdc{i}"] for i in range(4)] == [(1, 384, 32, 32)] * 4
    assert [shapes[f"dec{i}"] for i in (0, 3, 6, 8)] == [(1, 256, 64, 64), (1, 128, 128, 128), (1, 64, 256, 256),
                                                         (1, 64, 256, 256)]
    block = net.bottleneck[0]
    assert [b.dilation[0] for b in block.branches] == [1, 2, 4, 8, 16, 32]
    assert {b.kernel_size for b in block.branches} == {(kernel, kernel)}
    assert [b.out_channels for b in block.branches] == [64] * 6 and block.fuse[0].out_channels == 384
    assert round(conv_weight_count(net) / 1e6, 2) == millions
    assert conv_weight_count(net) == {3: 14_120_832, 5: 22_771_584}[kernel]


def test_network_rejects_sides_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        SDCAutoencoder(3)(torch.rand(1, 3, 36, 36))


# -- corruption generator (spec §3) ------------------------------------------------------------------------------
def test_generator_patches_respect_size_range_area_cap_and_masks():
    cfg = CorruptionConfig(reference_size=128, brightness_prob=0.5)
    gen = CorruptionGenerator(cfg)
    image = smooth_image(64)
    var = 0.02
    cap = area_cap_fraction(var) * 64 * 64
    changed_inside = 0
    for seed in range(40):
        out = gen(image, np.random.default_rng(seed), pixel_var=var)
        top, left, h, w = out.box
        assert 8 <= h <= 48 and 8 <= w <= 48  # U[16, 96] at 512 scaled by 64/128
        assert h * w <= cap or min(h, w) == 8  # capped, unless the 16 px floor wins
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
        mask = out.mask[0]
        assert out.mask.shape == (1, 64, 64) and mask.min() >= 0 and mask.max() <= 1
        outside = torch.ones_like(mask, dtype=torch.bool)
        outside[top:top + h, left:left + w] = False
        assert mask[outside].abs().max() == 0
        unmasked = (mask == 0).expand_as(image)
        assert torch.equal(out.image[unmasked], image[unmasked])
        changed_inside += int((out.image - image).abs().amax() > 1e-3)
        assert out.image.min() >= 0 and out.image.max() <= 1
    assert changed_inside >= 35


def test_area_cap_follows_theorem_2():
    assert area_cap_fraction(0.25) == pytest.approx(0.5 / 1.5)
    gen = CorruptionGenerator(CorruptionConfig(reference_size=64, patch_size=(40, 60), patch_floor=4))
    for seed in range(10):
        _, _, h, w = gen(smooth_image(64), np.random.default_rng(seed), pixel_var=0.01).box
        assert h * w <= area_cap_fraction(0.01) * 64 * 64 + 1e-9


def test_occlusion_from_texture_folder_and_rotation(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    image = smooth_image(64)
    gen = CorruptionGenerator(CorruptionConfig(reference_size=128, occlusion_prob=1.0, occlusion_dir=str(tmp_path)))
    out = gen(image, np.random.default_rng(1))
    assert gen.textures and (out.image - image).abs().amax() > 0.05
    assert torch.equal(out.image[(out.mask == 0).expand_as(image)], image[(out.mask == 0).expand_as(image)])
    rot = CorruptionGenerator(CorruptionConfig(reference_size=128, rotation_prob=1.0))
    out = rot(image, np.random.default_rng(2))
    unmasked = out.mask[0] == 0
    assert (out.image - image).abs().mean(0)[unmasked].max() <= 1 / 255 + 1e-6  # M covers what the rotation moved
    assert out.mask.mean() > 0.05  # a rotation moves far more than the patch
    from reconad.data.transforms import DataError

    with pytest.raises(DataError, match="holds no images"):
        CorruptionGenerator(CorruptionConfig(occlusion_prob=1.0, occlusion_dir=str(tmp_path / "none")))(image)


def test_augment_is_a_symmetry():
    image = smooth_image(16)
    out = augment(image, "dihedral", np.random.default_rng(3))
    assert sorted(out.flatten().tolist()) == sorted(image.flatten().tolist())
    assert torch.equal(augment(image, "none", np.random.default_rng(0)), image)


# -- objectives (spec §4) ----------------------------------------------------------------------------------------
def _direct(recon, clean, corrupted, mask, lam, norm, which):
    losses = []
    for r, x, xh, m1 in zip(recon.double().numpy(), clean.double().numpy(), corrupted.double().numpy(),
                            mask.double().numpy()):
        m = np.repeat(m1, 3, axis=0)
        e = r - x

        def term(weight, area, e=e):
            sq = np.sum((weight * e) ** 2)
            return (sq if norm == "l2sq" else np.sqrt(sq)) / (np.sum(area) + 1e-8)

        out = term(1 - m, 1 - m)
        inside = term(m, m) if which == 1 else term(np.abs(xh - x), m)
        losses.append((1 - lam) * out + (lam * inside if which == 1 else -lam * inside))
    return float(np.mean(losses))


@pytest.mark.parametrize("norm", ["literal", "l2sq"])
def test_objectives_equal_a_direct_computation(norm):
    g = torch.Generator().manual_seed(0)
    clean, recon = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, 4:9, 3:11] = torch.rand(3, 1, 5, 8, generator=g)
    corrupted = clean * (1 - mask) + mask * torch.rand(3, 3, 16, 16, generator=g)
    got1 = restore_objective(recon, clean, mask, 0.3, norm)[0]
    got4 = segment_objective(recon, clean, corrupted, mask, 0.3, norm)[0]
    assert float(got1) == pytest.approx(_direct(recon, clean, corrupted, mask, 0.3, norm, 1), rel=1e-5)
    assert float(got4) == pytest.approx(_direct(recon, clean, corrupted, mask, 0.3, norm, 4), rel=1e-5)


# -- maps (spec §6) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "passes"), [(3, 1), (5, 4), (9, 10)])
def test_box_filter_equals_repeated_uniform_filter(size, passes):
    x = torch.rand(2, 1, 23, 30, generator=torch.Generator().manual_seed(size))
    ref = x.numpy().astype(np.float64)
    for _ in range(passes):
        ref = ndimage.uniform_filter(ref, size=(1, 1, size, size), mode="reflect")
    np.testing.assert_allclose(box_filter(x, size, passes).numpy(), ref, atol=1e-6)
    assert torch.equal(box_filter(x, size, 0), x)


def test_ssim_map_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 32, 32, generator=g)
    b = (a + 0.2 * torch.rand(1, 1, 32, 32, generator=g)).clamp(0, 1)
    _, ref = structural_similarity(a[0, 0].double().numpy(), b[0, 0].double().numpy(), gaussian_weights=True,
                                   sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)
    np.testing.assert_allclose(ssim_map(a.double(), b.double())[0, 0].numpy(), ref, atol=1e-6)
    diff = difference_map(a.expand(1, 3, 32, 32), b.expand(1, 3, 32, 32), "ssim")
    np.testing.assert_allclose(diff[0, 0].numpy(), np.clip((1 - ref) / 2, 0, 1), atol=1e-5)


def test_forward_is_smoothed_channel_mse_summed():
    torch.manual_seed(0)
    method = SSLAE(SSLAEConfig(box_size=3, box_passes=2)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pred = method(images)
        recon = method.net(images)
    ref = ((images - recon) ** 2).mean(1, keepdim=True).numpy().astype(np.float64)
    for _ in range(2):
        ref = ndimage.uniform_filter(ref, size=(1, 1, 3, 3), mode="reflect")
    np.testing.assert_allclose(pred.anomaly_map.numpy(), ref, atol=1e-6)
    torch.testing.assert_close(pred.score, pred.anomaly_map.flatten(1).sum(1))
    both = max_ensemble([method, method], images)
    torch.testing.assert_close(both.anomaly_map, pred.anomaly_map)


def test_object_prior_from_held_out_normals_and_checkpoint(tmp_path):
    from reconad.fileio import load_weights, save_weights

    torch.manual_seed(0)
    method = SSLAE(SSLAEConfig(prior=True, prior_power=2, box_size=3, box_passes=1))
    images = torch.rand(3, 3, 32, 32)
    with pytest.raises(RuntimeError, match="holdout_fraction"):
        method.predict(images)
    holdout = torch.rand(4, 3, 32, 32)
    method.calibrate([{"image": holdout[:2]}, {"image": holdout[2:]}])
    with torch.no_grad():
        method.eval()
        avg = method.smoothed_map(holdout).mean(0, keepdim=True)
        torch.testing.assert_close(method.avgmap_, avg)
        expected = method.smoothed_map(images) * (1 - avg) ** 2
    torch.testing.assert_close(method.predict(images).anomaly_map, expected)
    save_weights(tmp_path / "w.safetensors", method.state_dict(), {})
    twin = SSLAE(SSLAEConfig(prior=True, prior_power=2, box_size=3, box_passes=1))
    twin.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    torch.testing.assert_close(twin.predict(images).anomaly_map, expected)


# -- training pieces ---------------------------------------------------------------------------------------------
def test_progressive_crops_contain_the_patch():
    torch.manual_seed(0)
    method = SSLAE(SSLAEConfig(corruption=CorruptionConfig(reference_size=256)))
    batch = method.training_batch(torch.stack([smooth_image(64, s) for s in range(4)]))
    assert set(batch) == {"image", "clean", "corrupted", "corruption_mask"}
    for progress, side in [(0.1, 16), (0.3, 32), (0.7, 64)]:
        clean, corrupted, mask = method.crop(batch, method.crop_fraction(progress))
        assert clean.shape == (4, 3, side, side) and mask.shape == (4, 1, side, side)
        if side >= 32:  # patches (≤ 24 px here) fit: the crop keeps all of the mask
            torch.testing.assert_close(mask.sum((1, 2, 3)), batch["corruption_mask"].sum((1, 2, 3)))
        assert method.loss(batch, progress)["crop_side"] == side


def test_prepare_fits_pixel_variance():
    method = SSLAE(SSLAEConfig())
    images = torch.rand(4, 3, 16, 16)
    method.prepare([{"image": images[:2]}, {"image": images[2:]}])
    assert float(method.pixel_var_) == pytest.approx(float(images.double().var(unbiased=False)), rel=1e-9)


def test_objective_4_early_stopping_keeps_the_best_held_out_snapshot(tmp_path):
    from reconad.engine.services import SnapshotSelection

    torch.manual_seed(0)
    cfg = SSLAEConfig(objective=4, val_every=1, corruption=CorruptionConfig(reference_size=128))
    method = SSLAE(cfg).train()
    assert SSLAE(SSLAEConfig(objective=1)).selection_interval() is None  # only objective (4) stops early
    snapshots = SnapshotSelection(method, tmp_path)
    optimizer = torch.optim.Adam(method.net.parameters(), lr=1e-2)
    images = torch.stack([smooth_image(32, s) for s in range(2)])
    for step in range(3):
        optimizer.zero_grad()
        method.loss(method.training_batch(images), step / 3)["loss"].backward()
        optimizer.step()
        snapshots.after_batch(step + 1, total=3)
    holdout = torch.stack([smooth_image(32, 10 + s) for s in range(2)])
    selection = snapshots.select(holdout, done=3)["selection"]
    history = selection["history"]
    assert [s for s, _ in history] == [1, 2, 3]  # snapshots after 1 and 2 batches, and the final weights
    best = min(v for _, v in history)
    assert selection["val_loss"] == best
    method.eval()
    assert method.validation_loss(holdout) == pytest.approx(best, rel=1e-6)


def test_fit_end_to_end_with_prior(tiny_mvtec, tmp_path):
    from reconad.config import make_config
    from reconad.engine import fit

    sections = tiny_run_overrides(tiny_mvtec)
    sections["data"]["holdout_fraction"] = 0.25
    sections["eval"] = {"overlays": 0, "plots": False, "examples": 0}
    sections["model"] = {"prior": True, "box_size": 3, "box_passes": 1, "corruption": {"reference_size": 128}}
    cfg = make_config("ssl_ae", **sections)
    assert cfg.model.kernel == 3 and cfg.optim.lr == 1e-4
    result = fit(cfg, tmp_path / "run")
    assert 0.0 <= result.metrics["image_auroc"] <= 1.0 and "pixel_auroc" in result.metrics
    assert any("term_corrupted" in e for e in result.history)


def test_presets_per_category():
    from reconad.config import make_config

    transistor = make_config("ssl_ae", data={"category": "transistor"}).model
    assert (transistor.diff, transistor.prior) == ("ssim", True)
    assert (transistor.corruption.occlusion_prob, transistor.corruption.rotation_prob) == (0.5, 0.5)
    carpet = make_config("ssl_ae", data={"category": "carpet"}).model
    assert (carpet.diff, carpet.prior, carpet.corruption.augment) == ("ssim", False, "dihedral")
    assert make_config("ssl_ae", data={"category": "grid"}).model.diff == "mse"
