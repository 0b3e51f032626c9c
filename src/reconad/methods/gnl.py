"""GNL: anomaly detection under distribution shift (Cao, Zhu & Pang, ICCV 2023), as in ``mala-lab/ADShift``.

The network is RD4AD unchanged. Training (the code's "DINL", official_code.md §5.1–5.3) adds an AugMix view and a
grayscale view and asks the OCBE output and the decoder's first output to agree across views. Testing (the code's
"ATTA", §5.4) matches the encoder's first two tapped stages to a reference normal image by exact feature
distribution matching (EFDM); the matched features feed the student and are the anomaly map's targets.

The reference's per-channel sorted features are fitted once by :meth:`GNL.prepare` from the first training image
(official: ``train/good/000.png``) and kept as buffers ``ref_sorted_<i>_`` in the checkpoint; matching is done
batch-wise and gives the same result at any batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..data.augmix import OP_LISTS, augmix_view, gray_view
from ..registry import register_method
from .base import is_int
from .rd4ad import LOSSES, RD4AD, RD4ADConfig

log = logging.getLogger(__name__)


@dataclass
class GNLConfig(RD4ADConfig):
    ori_weight: float = 0.9
    """Weight of the RD loss on the clean view (``loss_normal``)."""
    abs_weight: float = 0.05
    """Weight of the OCBE-output consistency (``loss_bn``): clean vs AugMix + clean vs gray."""
    lowf_weight: float = 0.05
    """Weight of the decoder-output-0 consistency (``loss_last``): clean vs AugMix + clean vs gray."""
    separate_passes: bool = True
    """Official: OCBE/decoder run once per view (three BN batch statistics and running-stat updates per
    iteration). ``False``: one pass over the three views concatenated."""
    augmix_ops: Literal["mvtec", "pacs"] = "mvtec"
    """Op list of the AugMix view: MVTec (6 ops) or PACS (adds contrast and brightness)."""
    augmix_severity: int = 3
    augmix_width: int = 3
    augmix_depth: int = -1
    """Ops per chain; ``<= 0`` draws 1..3."""
    augmix_alpha: float = 1.0
    reuse_depth: bool = True
    """Official quirk: the first chain's depth is reused by the other chains. ``False``: one draw per chain."""
    zero_severity: Literal["official", "identity"] = "official"
    """Official quirk: severity 0 samples levels from U(0.1, 0) = (0, 0.1] (strong colour/sharpness reduction).
    ``identity``: a severity-0 view is the unchanged image."""
    gray_after_normalize: bool = True
    """Official quirk: the luma of the already-normalised tensor. ``False``: normalise the luma of the image."""
    match: bool = True
    """Test-time EFDM matching to the reference normal image (``pairs``/``forward``; never in the loss)."""
    match_stages: list[str] | None = None
    """Stages matched, in order; ``None`` = the first two taps (layer1 and layer2 for ResNets)."""
    match_lambda: float = 0.5
    match_stable_sort: bool = False
    """Sort order of tied feature values in EFDM. ``False`` (official): torch's default sort, whose order among
    ties (a third of the post-ReLU values are exact zeros) is whatever the device's sort kernel gives, so the
    official result depends on the device (and its sort implementation) wherever values tie. ``True``: a stable
    sort (ties rank by position): reproducible everywhere and independent of the batch; maps then differ from the
    official code's by up to ~3e-3 on the tied pixels."""
    match_per_image: bool = True
    """Run the encoder one image at a time when matching (the sorting and interpolation stay batched). Convolutions
    round differently at different batch sizes (~1e-6), and the rank-based matching turns such differences into
    visible ones where values nearly tie, so only per-image encoding gives results identical to the official
    batch-1 test at any batch size. ``False``: one batched encoder pass (faster; results depend on the batch)."""
    """Matched values = ``s_x + (s_ref - s_x)·(1 - λ)``; 0.5 is the official setting."""
    reference_index: int = 0
    """Position of the reference image in the sorted training set (official: the first image)."""
    reference_count: int = 1
    """Number of consecutive training images from ``reference_index``; with k > 1 the reference is the mean of the
    k images' sorted features per channel (their 1-D Wasserstein barycentre)."""


def efdm(x: Tensor, ref_sorted: Tensor, lam: float = 0.5, stable: bool = False) -> Tensor:
    """Exact feature distribution matching of ``x`` (B, C, H, W) to per-channel sorted values (C, H·W).

    Each channel's sorted values ``s_x`` become ``s_x + (s_ref - s_x)·(1 - λ)`` and are put back in ``x``'s rank
    order (scattered to the sort's index: the positions the official ``gather(argsort(index))`` gives).
    ``stable=False`` is the official default sort: tied values (e.g. ReLU zeros) get the device's order;
    ``stable=True`` ranks ties by position, so the result does not depend on the batch.
    """
    matched, index = matched_sorted_values(x, ref_sorted, lam, stable)
    # parity: official_code.md §5.4 — EFDM_test puts them back with gather(matched, argsort(index)), i.e. matched[j]
    # at position index[j]; a scatter does that directly: the same values (the argsort of a permutation has no
    # ties), without a second sort (~10-20× faster than the argsort)
    out = torch.empty_like(matched).scatter_(-1, index, matched).reshape(x.shape)
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


def matched_sorted_values(x: Tensor, ref_sorted: Tensor, lam: float = 0.5, stable: bool = False,
                          ) -> tuple[Tensor, Tensor]:
    """EFDM's first half: each channel's sorted values moved towards the reference, and the sort's index.

    Returns ``(matched, index)``, both (B, C, H·W): ``matched[..., j]`` belongs at position ``index[..., j]``.
    """
    b, c, h, w = x.shape
    if ref_sorted.shape != (c, h * w):
        raise ValueError(f"reference features {tuple(ref_sorted.shape)} do not fit features {(c, h * w)} "
                         "(the reference must have the test images' size; re-fit it with prepare/set_reference)")
    # parity: official_code.md §5.4 — EFDM_test sorts with torch's default (unstable) sort. The sort runs on an
    # NCHW-contiguous copy: on a channels_last view it is ~2× slower, and its order among ties may differ.
    values, index = torch.sort(x.reshape(b, c, h * w).contiguous(), dim=-1, stable=stable)
    # parity: official_code.md §5.4 — EFDM_test: lamda = 1 - lamda; s_x + (s_r - s_x)·lamda
    return values + (ref_sorted.to(values.dtype).unsqueeze(0) - values) * (1 - lam), index


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@register_method
class GNL(RD4AD):
    """RD4AD trained with AugMix/gray consistency; at test time encoder stages matched to a normal reference."""

    name = "gnl"
    Config = GNLConfig
    @classmethod
    def config_problems(cls, run_cfg: Any, cfg: Any, feature_info: Sequence[Any]) -> list[str]:
        from ..backbones import stage_info

        problems = super().config_problems(run_cfg, cfg, feature_info)
        stages = [i.name for i in stage_info(run_cfg.backbone.name)]
        kept = stages[: stages.index(feature_info[-1].name) + 1] if feature_info else []
        unknown = [s for s in (cfg.match_stages or []) if s not in kept]
        if unknown:
            problems.append(f"--model.match_stages {unknown} are not stages the backbone runs ({', '.join(kept)})")
        if not is_int(cfg.reference_count) or cfg.reference_count < 1:
            problems.append(f"--model.reference_count must be an integer >= 1, got {cfg.reference_count!r}")
        if not is_int(cfg.reference_index) or cfg.reference_index < 0:
            problems.append(f"--model.reference_index must be an integer >= 0, got {cfg.reference_index!r}")
        return problems
    # official_layout is RD4AD's (inherited): parity: official_code.md §5 — the network is RD4AD unchanged

    def __init__(self, cfg: GNLConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        taps = list(backbone.taps)
        self.match_stages = list(cfg.match_stages) if cfg.match_stages is not None else taps[:2]
        stages = backbone.stage_names()
        unknown = [s for s in self.match_stages if s not in stages]
        if unknown:
            raise ValueError(f"match_stages {unknown} are not stages of {backbone.name}: {', '.join(stages)}")
        if cfg.reference_count < 1 or cfg.reference_index < 0:
            raise ValueError("reference_index must be >= 0 and reference_count >= 1")
        # Unfitted until prepare()/set_reference(): None buffers stay out of the state dict, so official
        # checkpoints (which hold no reference) load as they are.
        for i in range(len(self.match_stages)):
            self.register_buffer(f"ref_sorted_{i}_", None)
        self._warned_unfitted = False

    # -- training views and loss ----------------------------------------------------------------------
    def train_views(self, image: Tensor) -> dict[str, Tensor]:
        """The AugMix and gray views of one [0, 1] image, both already normalised for the backbone."""
        cfg = self.cfg
        aug = augmix_view(image, self.backbone.normalize, OP_LISTS[cfg.augmix_ops], cfg.augmix_severity,
                          cfg.augmix_width, cfg.augmix_depth, cfg.augmix_alpha, cfg.reuse_depth, cfg.zero_severity)
        return {"augmix": aug, "gray": gray_view(image, self.backbone.normalize, cfg.gray_after_normalize)}

    def training_batch(self, images: Tensor) -> dict[str, Tensor]:
        # outside the data loader nothing seeds the per-sample RNGs: seed them from torch's RNG
        from ..data.folder import seeded_rngs

        with seeded_rngs(int(torch.randint(0, 2**31 - 1, ())), 0, 0):
            return super().training_batch(images)

    def _student(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        z = self.bottleneck(feats)
        return z, self.decoder(z)

    cache_replaces_images = False  # the AugMix view is new every epoch

    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        # the clean and the gray view are the same every epoch; only the AugMix view is drawn anew
        return {"cached_clean": self.backbone(self.backbone.normalize(batch["image"])),
                "cached_gray": self.backbone(batch["gray"])}

    def _teacher_views(self, batch: dict[str, Any]) -> list[list[Tensor]]:
        """The frozen encoder's taps of the clean, AugMix and gray views (clean and gray from the cache if there)."""
        n = batch["image"].shape[0]
        if "cached_clean" in batch and "cached_gray" in batch:
            return [batch["cached_clean"], self.backbone(batch["augmix"]), batch["cached_gray"]]
        views = torch.cat([self.backbone.normalize(batch["image"]), batch["augmix"], batch["gray"]])
        # the frozen encoder is in eval mode: one pass over the three views equals three passes
        feats = [f.split(n) for f in self.backbone(views)]
        return [[f[v] for f in feats] for v in range(3)]

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        if "augmix" not in batch or "gray" not in batch:
            batch = {**batch, **self.training_batch(batch["image"])}
        n = batch["image"].shape[0]
        per_view = self._teacher_views(batch)  # clean, augmix, gray
        if self.cfg.separate_passes:
            # parity: official_code.md §5.2 — three OCBE/decoder passes per iteration (clean, AugMix, gray)
            outs = [self._student(f) for f in per_view]
        else:
            z, dec = self._student([torch.cat(f) for f in zip(*per_view)])
            outs = [(z_v, [d.split(n)[v] for d in dec]) for v, z_v in enumerate(z.split(n))]
        fn = LOSSES[self.cfg.loss]
        (z0, d0), (z1, d1), (z2, d2) = outs
        ori = sum(fn(t, r) for t, r in zip(per_view[0], d0))
        # parity: official_code.md §5.2 — the two view terms are summed (not averaged); no stop-gradient
        abs_ = fn(z0, z1) + fn(z0, z2)
        lowf = fn(d0[0], d1[0]) + fn(d0[0], d2[0])
        cfg = self.cfg
        total = cfg.ori_weight * ori + cfg.abs_weight * abs_ + cfg.lowf_weight * lowf
        return {"loss": total, "ori": ori.detach(), "abs": abs_.detach(), "lowf": lowf.detach()}

    # -- reference and matching -----------------------------------------------------------------------
    def _reference_buffers(self) -> list[Tensor | None]:
        return [getattr(self, f"ref_sorted_{i}_") for i in range(len(self.match_stages))]

    @property
    def reference_fitted(self) -> bool:
        """Whether the reference features are set (by :meth:`prepare` or :meth:`set_reference`)."""
        return all(b is not None for b in self._reference_buffers())

    @torch.no_grad()
    def set_reference(self, images: Tensor) -> None:
        """Fit the reference from normal images (k, 3, H, W) in [0, 1]: per matched stage, the mean over images
        of each channel's sorted values, from the unmatched encoder (official: each stage of the reference sees
        the reference's own unmatched input)."""
        device = next(self.backbone.parameters()).device
        captured: dict[str, Tensor] = {}

        def grab(stage: str, x: Tensor) -> Tensor:
            if stage in self.match_stages:
                captured[stage] = x
            return x

        self.backbone(self.backbone.normalize(images.to(device)), hook=grab)
        for i, stage in enumerate(self.match_stages):
            x = captured[stage]
            sorted_values = torch.sort(x.flatten(2), dim=-1).values.mean(0)  # (C, H·W)
            setattr(self, f"ref_sorted_{i}_", sorted_values.float())

    def prepare(self, loader: Iterable[dict[str, Any]]) -> None:
        """Take the reference images from the training set in file order (``reference_index``, ``reference_count``)."""
        first, count = self.cfg.reference_index, self.cfg.reference_count
        images, seen = [], 0
        for batch in loader:
            imgs = batch["image"]
            lo, hi = max(first - seen, 0), min(first + count - seen, imgs.shape[0])
            if lo < hi:
                images.append(imgs[lo:hi])
            seen += imgs.shape[0]
            if seen >= first + count:
                break
        if sum(len(i) for i in images) < count:
            raise ValueError(f"the training set has {seen} images; reference_index {first} + reference_count "
                             f"{count} needs more")
        self.set_reference(torch.cat(images))

    def _hook(self, stage: str, x: Tensor) -> Tensor:
        if stage not in self.match_stages:
            return x
        # parity: official_code.md §5.4 — match layer1, then layer2 computed from the matched layer1; not layer3
        return efdm(x, getattr(self, f"ref_sorted_{self.match_stages.index(stage)}_"), self.cfg.match_lambda,
                    self.cfg.match_stable_sort)

    def rank_sensitive_modules(self) -> list[nn.Module]:
        """The encoder up to its last matched stage: EFDM sorts those stages' outputs."""
        if not (self.cfg.match and self.reference_fitted):
            return []
        stages = self.backbone.stage_names()
        return self.backbone.stage_modules(max(self.match_stages, key=stages.index))

    def encode(self, images: Tensor, match: bool | None = None) -> list[Tensor]:
        """Encoder taps; with matching (default: ``cfg.match``) the matched stages are EFDM'd to the reference."""
        match = self.cfg.match if match is None else match
        if match and not self.reference_fitted:
            if not self._warned_unfitted:
                log.warning("GNL: no reference image fitted (call prepare() or set_reference()); matching is off")
                self._warned_unfitted = True
            match = False
        x = self.backbone.normalize(images)
        if not match:
            return self.backbone(x)
        if self.cfg.match_per_image and x.shape[0] > 1:
            # parity: official_code.md §5.4 — the official test encodes one image at a time (batch 1)
            per_image = [self.backbone(x[i:i + 1], hook=self._hook) for i in range(x.shape[0])]
            return [torch.cat(level) for level in zip(*per_image)]
        return self.backbone(x, hook=self._hook)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a fitted reference in the checkpoint: allocate the (unfitted, None) buffers so they load
        for i in range(len(self.match_stages)):
            key = f"{prefix}ref_sorted_{i}_"
            if key in state_dict and self._buffers.get(f"ref_sorted_{i}_") is None:
                self._buffers[f"ref_sorted_{i}_"] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
