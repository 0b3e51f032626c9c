"""The method contract battery: every registered method must pass it (parametrized over list_methods())."""

from __future__ import annotations

import copy

import pytest
import torch

from reconad.backbones import create_backbone
from reconad.methods.base import Prediction
from reconad.registry import create_method, get_method_class, list_methods

SIZE = 64


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = get_method_class(name)
    backbone = create_backbone("resnet18", weights=None, trainable=cls.trainable_backbone)
    return create_method(name, backbone=backbone)


def batch_for(method, n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = method.training_batch(torch.rand(n, 3, SIZE, SIZE, generator=g))
    return {**batch, "mask": torch.zeros(n, 1, SIZE, SIZE), "label": torch.zeros(n, dtype=torch.long)}


def optimizer_for(method):
    from reconad.config import OptimConfig

    return torch.optim.Adam(method.param_groups(OptimConfig()), lr=1e-3)


@pytest.fixture(params=list_methods())
def method_name(request):
    return request.param


def test_registry_rejects_duplicates():
    from reconad.registry import register_method

    cls = get_method_class("rd4ad")
    twin = type("Twin", (cls,), {"name": "rd4ad"})
    with pytest.raises(ValueError, match="already registered"):
        register_method(twin)
    with pytest.raises(ValueError, match="known methods"):
        get_method_class("no-such-method")


def test_builds_from_defaults(method_name):
    cls = get_method_class(method_name)
    method = build(method_name)
    assert isinstance(method.cfg, cls.Config)
    assert isinstance(method, torch.nn.Module)


def test_loss_is_finite_and_named(method_name):
    method = build(method_name).train()
    terms = method.loss(batch_for(method), progress=0.0)
    assert "loss" in terms and terms["loss"].ndim == 0
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["loss"].requires_grad


def test_one_step_changes_only_trainable_parameters_and_no_frozen_bn_stats(method_name):
    method = build(method_name).train()
    optimizer = optimizer_for(method)
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = {n: t.detach().clone() for n, t in method.state_dict().items()}
    frozen_buffers = {n for n, _ in method.backbone.named_buffers(prefix="backbone")} if not \
        method.backbone.trainable else set()
    terms = method.loss(batch_for(method), progress=0.5)
    terms["loss"].backward()
    optimizer.step()
    after = method.state_dict()
    names = dict(method.named_parameters())
    changed_trainable = [n for n, p in names.items() if id(p) in trainable and not torch.equal(before[n], after[n])]
    changed_frozen = [n for n, p in names.items() if id(p) not in trainable and not torch.equal(before[n], after[n])]
    assert changed_trainable, "an optimizer step changed no trainable parameter"
    assert not changed_frozen, f"frozen parameters changed: {changed_frozen[:5]}"
    changed_stats = [n for n in frozen_buffers if not torch.equal(before[n], after[n])]
    assert not changed_stats, f"frozen BN running stats changed: {changed_stats[:5]}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_returns_maps_and_scores(method_name, mode):
    method = build(method_name)
    method.train(mode == "train")
    with torch.no_grad():
        pred = method(torch.rand(3, 3, SIZE, SIZE))
    assert isinstance(pred, Prediction)
    assert pred.anomaly_map.shape == (3, 1, SIZE, SIZE)
    assert pred.score.shape == (3,)
    assert torch.isfinite(pred.anomaly_map).all() and torch.isfinite(pred.score).all()


def test_seeded_runs_are_deterministic(method_name):
    def run():
        method = build(method_name, seed=3).train()
        optimizer = optimizer_for(method)
        torch.manual_seed(5)
        for step in range(2):
            optimizer.zero_grad()
            method.loss(batch_for(method, seed=step), progress=step / 2)["loss"].backward()
            optimizer.step()
        return method.predict(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)))

    a, b = run(), run()
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)


def test_checkpoint_round_trip(method_name, tmp_path):
    from reconad.fileio import load_weights, save_weights

    method = build(method_name, seed=1).train()
    optimizer = optimizer_for(method)
    method.loss(batch_for(method), progress=0.0)["loss"].backward()
    optimizer.step()
    save_weights(tmp_path / "w.safetensors", method.state_dict(), {})
    twin = build(method_name, seed=2)
    twin.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(method.predict(images), twin.predict(images), rtol=0, atol=0)


def test_frozen_backbone_stays_in_eval(method_name):
    method = build(method_name).train()
    if not method.backbone.trainable:
        assert not method.backbone.training
        assert all(not p.requires_grad for p in method.backbone.parameters())


def test_deepcopy_is_independent(method_name):
    method = build(method_name)
    twin = copy.deepcopy(method)
    next(twin.parameters()).data.add_(1.0)
    assert not torch.equal(next(method.parameters()), next(twin.parameters()))
