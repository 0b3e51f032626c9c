"""GNL: AugMix/gray views against the official procedure, EFDM matching, the loss, the reference, checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from reconad.backbones import create_backbone
from reconad.data.augmix import (
    MVTEC_OPS,
    PACS_OPS,
    apply_plan,
    augmix_view,
    draw_plan,
    gray_view,
    op_parameter,
    to_pil,
)
from reconad.data.folder import seeded_rngs
from reconad.losses import global_cosine
from reconad.methods.gnl import GNL, efdm
from reconad.registry import create_method

from .conftest import tiny_run_overrides

SIZE = 64
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "gnl.json"  # copy of spec/official_keys


def make_gnl(seed: int = 0, backbone: str = "resnet18", **cfg) -> GNL:
    torch.manual_seed(seed)
    return create_method("gnl", backbone=create_backbone(backbone, weights=None), **cfg)


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    # 8-bit values, as images read from files are
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float() / 255


# -- the official AugMix, written out as ADShift's dataset.py does it (reference for the tests) ----------------
def _official_ops():
    def sample_level(n):
        return np.random.uniform(low=0.1, high=n)

    def enhance(cls):
        return lambda img, level: cls(img).enhance(float(sample_level(level)) * 1.8 / 10.0 + 0.1)

    return {
        "autocontrast": lambda img, _: ImageOps.autocontrast(img),
        "equalize": lambda img, _: ImageOps.equalize(img),
        "posterize": lambda img, level: ImageOps.posterize(img, 4 - int(sample_level(level) * 4 / 10)),
        "solarize": lambda img, level: ImageOps.solarize(img, 256 - int(sample_level(level) * 256 / 10)),
        "color": enhance(ImageEnhance.Color), "sharpness": enhance(ImageEnhance.Sharpness),
        "contrast": enhance(ImageEnhance.Contrast), "brightness": enhance(ImageEnhance.Brightness),
    }


def official_augmix(pil: Image.Image, op_names, severity=3, width=3, depth=-1, alpha=1.0) -> torch.Tensor:
    from torchvision import transforms

    preprocess = transforms.Compose([transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    fns = _official_ops()
    aug_list = [fns[n] for n in op_names]
    severity = random.randint(0, severity)
    ws = np.float32(np.random.dirichlet([1] * width))
    m = np.float32(np.random.beta(alpha, alpha))
    preprocess_img = preprocess(pil)
    mix = torch.zeros_like(preprocess_img)
    for i in range(width):
        image_aug = pil.copy()
        depth = depth if depth > 0 else np.random.randint(1, 4)
        for _ in range(depth):
            op = np.random.choice(aug_list)
            image_aug = op(image_aug, severity)
        mix += ws[i] * preprocess(image_aug)
    return (1 - m) * preprocess_img + m * mix


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# -- training views ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ops", [MVTEC_OPS, PACS_OPS])
def test_augmix_view_equals_the_official_procedure_bit_for_bit(ops):
    image = images(1, seed=3, size=32)[0]
    for index in range(6):
        with seeded_rngs(7, 0, index):
            ours = augmix_view(image, imagenet_normalize, ops)
        with seeded_rngs(7, 0, index):
            theirs = official_augmix(to_pil(image), ops)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_augmix_plan_statistics():
    plans = []
    for index in range(400):
        with seeded_rngs(1, 0, index):
            plans.append(draw_plan(MVTEC_OPS))
    ops = {op for p in plans for chain in p.chains for op, _ in chain}
    assert ops == set(MVTEC_OPS)  # every op of the list is used, and nothing else
    assert {p.severity for p in plans} == {0, 1, 2, 3}
    for p in plans:
        assert p.weights.dtype == np.float32 and abs(float(p.weights.sum()) - 1) < 1e-6 and (p.weights >= 0).all()
        assert 0 <= p.mix <= 1
        assert len({len(c) for c in p.chains}) == 1 and 1 <= len(p.chains[0]) <= 3  # depth reused across chains
        for chain in p.chains:
            for op, level in chain:
                if op in ("autocontrast", "equalize"):
                    assert level is None
                elif p.severity == 0:
                    assert 0 < level <= 0.1  # numpy's U(0.1, 0)
                else:
                    assert 0.1 <= level <= p.severity
    with seeded_rngs(1, 0, 0):
        pacs = {op for _ in range(200) for c in draw_plan(PACS_OPS).chains for op, _ in c}
    assert pacs == set(PACS_OPS)


def test_augmix_clean_switches():
    lengths = set()
    for index in range(50):
        with seeded_rngs(2, 0, index):
            plan = draw_plan(MVTEC_OPS, reuse_depth=False)
        lengths.add(len({len(c) for c in plan.chains}))
    assert lengths - {1}, "with reuse_depth=False the chains draw their own depth"
    image = images(1, seed=1, size=32)[0]
    for index in range(40):
        with seeded_rngs(3, 0, index):
            plan = draw_plan(MVTEC_OPS, zero_severity="identity")
        if plan.severity == 0:
            view = apply_plan(image, plan, imagenet_normalize, zero_severity="identity")
            torch.testing.assert_close(view, imagenet_normalize(image[None])[0], rtol=0, atol=1e-6)
            break
    else:
        pytest.fail("no severity-0 draw")


def test_op_parameters_follow_the_formulas():
    assert op_parameter("posterize", 2.6) == 4 - int(2.6 * 4 / 10) == 3
    assert op_parameter("solarize", 3.0) == 256 - int(3.0 * 256 / 10) == 180
    assert op_parameter("color", 3.0) == pytest.approx(0.64)
    assert op_parameter("sharpness", 0.05) == pytest.approx(0.109)  # severity 0: the strongest reduction


def test_gray_view_takes_the_luma_of_the_normalised_tensor():
    from torchvision.transforms import Grayscale

    image = images(1, seed=4, size=16)[0]
    official = Grayscale(3)(imagenet_normalize(image[None])[0])
    torch.testing.assert_close(gray_view(image, imagenet_normalize), official, rtol=0, atol=0)
    clean = gray_view(image, imagenet_normalize, after_normalize=False)
    torch.testing.assert_close(clean, imagenet_normalize(Grayscale(3)(image)[None])[0], rtol=0, atol=0)
    assert not torch.allclose(clean, official)


def test_train_views_are_normalised_for_the_backbone():
    model = make_gnl()
    image = images(1, seed=5)[0]
    with seeded_rngs(0, 0, 0):
        views = model.train_views(image)
    assert set(views) == {"augmix", "gray"} and views["augmix"].shape == (3, SIZE, SIZE)
    torch.testing.assert_close(views["gray"], gray_view(image, model.backbone.normalize), rtol=0, atol=0)


# -- loss ----------------------------------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum_of_three_separate_passes():
    model = make_gnl().train()
    torch.manual_seed(1)
    batch = model.training_batch(images(4, seed=6))
    twin = make_gnl().train()
    twin.load_state_dict(model.state_dict())
    terms = model.loss(batch, 0.0)
    # manual: encoder per view, OCBE/decoder per view, in the official order
    views = [twin.backbone.normalize(batch["image"]), batch["augmix"], batch["gray"]]
    outs = []
    for v in views:
        f = twin.backbone(v)
        z = twin.bottleneck(f)
        outs.append((f, z, twin.decoder(z)))
    (f0, z0, d0), (_, z1, d1), (_, z2, d2) = outs
    ori = sum(global_cosine(a, b) for a, b in zip(f0, d0))
    abs_ = global_cosine(z0, z1) + global_cosine(z0, z2)
    lowf = global_cosine(d0[0], d1[0]) + global_cosine(d0[0], d2[0])
    expected = 0.9 * ori + 0.05 * abs_ + 0.05 * lowf
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["abs"], abs_.detach(), rtol=1e-5, atol=1e-6)
    bn = next(m for m in model.bottleneck.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3  # three BN statistics updates per iteration
    one = make_gnl(separate_passes=False).train()
    one.loss(batch, 0.0)["loss"].backward()
    bn = next(m for m in one.bottleneck.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1


# -- EFDM and the reference --------------------------------------------------------------------------------------
def test_efdm_interpolates_sorted_values_in_the_input_rank_order():
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 3, 4, 5, generator=g), torch.randn(3, 20, generator=g)
    ref_sorted = ref.sort(-1).values
    out = efdm(x, ref_sorted, 0.5)
    flat_x, flat_out = x.flatten(2), out.flatten(2)
    expected_sorted = flat_x.sort(-1).values + (ref_sorted - flat_x.sort(-1).values) * 0.5
    torch.testing.assert_close(flat_out.sort(-1).values, expected_sorted, rtol=0, atol=0)
    assert torch.equal(flat_out.argsort(-1), flat_x.argsort(-1))  # rank order kept
    torch.testing.assert_close(efdm(x, ref_sorted, 1.0), x, rtol=0, atol=0)  # λ = 1: the input
    full = efdm(x, ref_sorted, 0.0).flatten(2)  # λ = 0: the reference's values in the input's ranks
    torch.testing.assert_close(full.sort(-1).values, ref_sorted.expand_as(full), rtol=0, atol=1e-6)


def test_efdm_stable_ties_do_not_depend_on_the_batch():
    x = torch.relu(torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(1)))  # many exact zeros
    ref = torch.randn(4, 36).sort(-1).values
    batched = efdm(x, ref, stable=True)
    singles = torch.cat([efdm(x[i:i + 1], ref, stable=True) for i in range(5)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=0)


def official_efdm_test(x: torch.Tensor, ref_sorted: torch.Tensor, lamda: float) -> torch.Tensor:
    """ADShift's EFDM_test transcribed (per-image batch, default torch.sort), with the reference pre-sorted."""
    b, c, w, h = x.shape
    value_content, index_content = torch.sort(x.view(-1, w * h))
    lamda = 1 - lamda
    new = value_content + (ref_sorted.repeat(b, 1) - value_content) * lamda
    inverse_index = index_content.argsort(-1)
    return new.gather(-1, inverse_index).view(b, c, w, h)


def test_efdm_default_ties_follow_the_official_default_sort():
    x = torch.relu(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)))  # ~half exact zeros
    ref = torch.randn(4, 256, generator=torch.Generator().manual_seed(3)).sort(-1).values
    torch.testing.assert_close(efdm(x, ref, 0.5), official_efdm_test(x, ref, 0.5), rtol=0, atol=0)
    assert GNL.Config().match_stable_sort is False


def test_efdm_on_a_batch_with_many_ties_equals_the_official_argsort_gather():
    # the scatter that replaces gather(argsort(index)) places every matched value where the official code does
    x = torch.relu(torch.randn(3, 32, 24, 24, generator=torch.Generator().manual_seed(4)))
    ref = torch.randn(32, 576, generator=torch.Generator().manual_seed(5)).sort(-1).values
    torch.testing.assert_close(efdm(x, ref, 0.3), official_efdm_test(x, ref, 0.3), rtol=0, atol=0)


def test_efdm_of_channels_last_features_is_the_same_and_stays_channels_last():
    x = torch.relu(torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(6)))
    ref = torch.randn(8, 144, generator=torch.Generator().manual_seed(7)).sort(-1).values
    nhwc = efdm(x.contiguous(memory_format=torch.channels_last), ref)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, efdm(x, ref), rtol=0, atol=0)


def loader_of(imgs: torch.Tensor, batch_size: int = 3):
    return [{"image": imgs[i:i + batch_size]} for i in range(0, len(imgs), batch_size)]


def test_prepare_fits_the_first_training_image_and_matching_uses_it():
    model = make_gnl().eval()
    train = images(7, seed=8)
    model.prepare(loader_of(train))
    feats = model.backbone(model.backbone.normalize(train[:1]))
    torch.testing.assert_close(model.ref_sorted_0_, feats[0].flatten(2).sort(-1).values[0], rtol=0, atol=0)
    torch.testing.assert_close(model.ref_sorted_1_, feats[1].flatten(2).sort(-1).values[0], rtol=0, atol=0)
    test = images(1, seed=9)  # one image: the batched encoder below rounds like the per-image one
    matched = model.encode(test)
    raw = model.backbone(model.backbone.normalize(test))
    torch.testing.assert_close(matched[0], efdm(raw[0], model.ref_sorted_0_), rtol=0, atol=0)
    layer2 = model.backbone.layer2(matched[0])  # layer2 runs on the matched layer1, then is matched itself
    torch.testing.assert_close(matched[1], efdm(layer2, model.ref_sorted_1_), rtol=0, atol=0)
    torch.testing.assert_close(matched[2], model.backbone.layer3(matched[1]), rtol=0, atol=0)  # layer3 unmatched
    assert not torch.allclose(model.encode(test, match=False)[2], matched[2])


def test_reference_mean_of_k_and_index():
    model = make_gnl(reference_index=2, reference_count=3)
    train = images(7, seed=10)
    model.prepare(loader_of(train, batch_size=2))  # the images span several batches
    feats = model.backbone(model.backbone.normalize(train[2:5]))
    expected = feats[0].flatten(2).sort(-1).values.mean(0)
    torch.testing.assert_close(model.ref_sorted_0_, expected, rtol=0, atol=0)


def test_batched_prediction_equals_batch_one():
    model = make_gnl().eval()
    model.prepare(loader_of(images(3, seed=11)))
    test = images(5, seed=12)
    with torch.no_grad():
        batched = model.encode(test)
        singles = [model.encode(test[i:i + 1]) for i in range(5)]
    for level, feats in enumerate(batched):  # the matched targets: identical
        torch.testing.assert_close(feats, torch.cat([s[level] for s in singles]), rtol=0, atol=0)
    batched, singles = model.predict(test), [model.predict(test[i:i + 1]) for i in range(5)]
    # the student's convolutions round differently per batch size (~1e-7); nothing is amplified after them
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in singles]), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.score, torch.cat([s.score for s in singles]), rtol=0, atol=1e-5)


def test_fitted_reference_is_saved_and_loaded(tmp_path):
    from reconad.fileio import load_weights, save_weights

    model = make_gnl(seed=1).eval()
    model.prepare(loader_of(images(2, seed=13)))
    assert set(model.fitted_buffers()) == {"ref_sorted_0_", "ref_sorted_1_"}
    save_weights(tmp_path / "w.safetensors", model.state_dict(), {})
    twin = make_gnl(seed=2)
    assert not twin.reference_fitted
    twin.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    assert twin.reference_fitted
    test = images(2, seed=14)
    torch.testing.assert_close(twin.predict(test), model.predict(test), rtol=0, atol=0)


# -- official checkpoints ----------------------------------------------------------------------------------------
def test_official_checkpoint_loads_with_identical_outputs():
    from reconad.official import load_official, to_official

    spec = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    model = make_gnl(backbone="wide_resnet50_2").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = to_official("gnl", model.state_dict())  # unfitted: the official checkpoint holds no reference
    for key, shape in spec.items():
        if key not in state:
            state[key] = torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float)
    assert {k: list(v.shape) for k, v in state.items()} == spec
    loaded = load_official("gnl", state)
    reference = images(1, seed=15)
    model.set_reference(reference)
    loaded.set_reference(reference)  # official: train/good/000.png, given at test time
    test = images(1, seed=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(test), model(test), rtol=0, atol=0)


# -- end to end --------------------------------------------------------------------------------------------------
def test_fit_writes_the_reference_and_reloads(tiny_mvtec, tmp_path):
    from reconad.config import make_config
    from reconad.engine import evaluate, fit, load

    cfg = make_config("gnl", **tiny_run_overrides(tiny_mvtec, iterations=2))
    result = fit(cfg, tmp_path / "run")
    assert 0 <= result.metrics["image_auroc"] <= 1 and "pixel_auroc" in result.metrics
    logged = [e for e in result.history if e.get("kind") == "train"]
    assert {"ori", "abs", "lowf"} <= set(logged[0])
    model = load(tmp_path / "run")
    assert model.reference_fitted
    first = Image.open(tiny_mvtec / "stripes/train/good/000.png").convert("RGB")
    image = torch.from_numpy(np.asarray(first).copy()).permute(2, 0, 1).float()[None] / 255
    expected = model.backbone(model.backbone.normalize(image))[0].flatten(2).sort(-1).values[0]
    torch.testing.assert_close(model.ref_sorted_0_, expected, rtol=0, atol=0)
    assert evaluate(tmp_path / "run", write=False) == pytest.approx(result.metrics)
