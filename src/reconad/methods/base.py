"""The method contract shared by every method (design.md, "The method contract")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..maps import MapsConfig, anomaly_map, image_score


def is_int(value: Any) -> bool:
    """An integer setting (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite numeric setting."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe_taps(feature_info: Sequence[Any]) -> str:
    """``layer2 (stride 8, 128 ch), ...`` for messages."""
    return ", ".join(f"{t.name} (stride {t.stride}, {t.channels} ch)" for t in feature_info)


@dataclass(frozen=True)
class OfficialLayout:
    """How an official checkpoint's keys map onto a method's modules (``reconad.load_official``)."""


    renames: tuple[tuple[str, str], ...]
    """(official prefix, reconad prefix), first match wins."""
    unused: tuple[str, ...] = ()
    """Official key prefixes with no counterpart here (never-used layers); dropped."""


class Prediction(NamedTuple):
    anomaly_map: Tensor  # (B, 1, H, W)
    score: Tensor  # (B,)


@dataclass(frozen=True)
class SizeRule:
    """Which square input sides a network takes: ``ceil(side / stride)`` must be a multiple of ``multiple``.

    Strided convolutions of both backbone families round up (ResNet padding, TF "SAME"), so the feature map at
    stride s of a side-H input is ``ceil(H / s)`` wide; a decoder that upsamples by 2 k times needs that a
    multiple of 2^k. ``reason`` says which part of the network needs it (for messages).
    """

    stride: int
    multiple: int
    reason: str

    def accepts(self, side: int) -> bool:
        return side >= 1 and -(-side // self.stride) % self.multiple == 0

    def suggestions(self, side: int) -> tuple[int, int]:
        """The nearest sides below (at least one period) and above ``side`` that are multiples of the period."""
        period = self.stride * self.multiple
        return max(period, side // period * period), (side // period + 1) * period


@dataclass
class MethodConfig:
    """Settings every method has; subclasses add their own fields (defaults = official code)."""

    maps: MapsConfig = field(default_factory=MapsConfig)


class Method(nn.Module):
    """Base class: build modules in ``__init__`` only (no data, no device choice).

    Subclasses set ``name`` and ``Config``, implement :meth:`pairs` and :meth:`loss`, and may override
    :meth:`train_views`, :meth:`prepare`, :meth:`calibrate`, :meth:`param_groups` and :meth:`forward`.
    Images are float tensors in [0, 1]; each method normalises them for its backbone.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    default_backbone: ClassVar[str] = "wide_resnet50_2"
    trainable_backbone: ClassVar[bool] = False
    official_layout: ClassVar[Any] = None
    """An :class:`OfficialLayout` when official checkpoints of this method can be imported."""

    @classmethod
    def input_size_rule(cls, cfg: MethodConfig, feature_info: Sequence[Any]) -> SizeRule | None:
        """The image sides this method's network takes with these taps (``feature_info``: the backbone's
        :class:`~reconad.backbones.TapInfo` list), checked by ``reconad.validation`` before anything is built.
        ``None``: any side."""
        return None

    @classmethod
    def config_problems(cls, run_cfg: Any, cfg: MethodConfig, feature_info: Sequence[Any]) -> list[str]:
        """What is wrong with this method's settings on these taps, one line each naming the setting (``--model.x``
        …) and what to do; checked by ``reconad.validation`` before anything is built. Default: nothing."""
        return []

    def __init__(self, cfg: MethodConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    # -- data ------------------------------------------------------------------------------------------
    def train_views(self, image: Tensor) -> dict[str, Tensor]:
        """Extra training inputs made in the data loader from one [0, 1] image (3, H, W). Default: none."""
        return {}

    def training_batch(self, images: Tensor) -> dict[str, Tensor]:
        """A training batch as the data loader would build it: the images plus their stacked ``train_views``.

        For benchmarks and tests that skip the data loader; views are made on the CPU, one image at a time.
        """
        batch = {"image": images}
        views = [self.train_views(img.cpu()) for img in images]
        for key in views[0] if views else {}:
            batch[key] = torch.stack([v[key] for v in views]).to(images.device)
        return batch

    # -- frozen computation the engine may cache (reconad.engine.cache) --------------------------------
    cache_replaces_images: ClassVar[bool] = False
    """With its :meth:`frozen_features` in the batch, :meth:`loss` needs no other entry (no image is loaded)."""

    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        """What this method's frozen networks compute from a training sample's deterministic inputs (the clean
        image, deterministic views), keyed as :meth:`loss` looks for them in the batch. The engine computes it once
        per training image (``train.feature_cache``) and adds the rows to every batch; it must not depend on
        anything training changes. Default: nothing to cache."""
        return {}

    # -- fitted statistics -----------------------------------------------------------------------------
    def prepare(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit statistics needed before training (buffers ending in ``_``). Default: nothing."""

    def calibrate(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit statistics after training on held-out normal images (never test data). Default: nothing."""

    # -- engine services a method opts into ------------------------------------------------------------
    def selection_interval(self) -> int | None:
        """Batches between weight snapshots for model selection by :meth:`validation_loss` on held-out normals
        (``reconad.engine.services``); ``None`` (default): the final weights are the model."""
        return None

    def validation_loss(self, images: Tensor) -> float:
        """Loss on held-out normal images used to choose among snapshots (lower is better)."""
        raise NotImplementedError(f"{self.name} does not define a validation loss")

    # -- training --------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        """Loss terms of one batch; must hold ``"loss"``. ``progress`` is the fraction of training done."""
        raise NotImplementedError

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """Trainable parameters with their learning rates. Default: one group at ``optim.lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": optim.lr, "name": "all"}]

    # -- inference -------------------------------------------------------------------------------------
    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(target, reconstruction) per level, each (B, C, h, w)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Prediction:
        """(B, 3, H, W) images in [0, 1] → anomaly maps (B, 1, H, W) and scores (B,)."""
        maps = anomaly_map(self.pairs(images), tuple(images.shape[-2:]), self.cfg.maps)
        return Prediction(maps, image_score(maps, self.cfg.maps.score, self.cfg.maps.topk))

    def rank_sensitive_modules(self) -> list[nn.Module]:
        """Modules whose outputs a rank-based step of the inference forward reads (a sort). Rounding differences
        of ~1e-7 there reorder near-equal values, which moves the maps by the gaps between sorted values; so the
        fast switches that round differently (``eval.fold_bn``, ``eval.channels_last``) leave these modules as they
        are while ``eval.rank_safe`` is on (reconad.acceleration). Default: none."""
        return []

    def fitted_buffers(self) -> dict[str, Tensor]:
        """Buffers set by :meth:`prepare` / :meth:`calibrate` (names end in ``_``)."""
        return {name: buf for name, buf in self.named_buffers() if name.rsplit(".", 1)[-1].endswith("_")}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Eval-mode inference without gradients (restores the previous mode)."""
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)
