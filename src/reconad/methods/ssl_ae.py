"""Self-supervised inpainting autoencoder of Bauer, Nakajima & Müller (arXiv 2206.11723), from spec/bauer.md.

There is no official code: every default the paper leaves open is a **[choice]** of the spec and a setting here.
The network restores images whose one patch was corrupted (:mod:`reconad.data.corruptions`); the anomaly map is
the box-filtered pixel (or SSIM) difference between the input and its restoration, the image score its sum.
This method works on pixels, so the backbone the registry passes in is not used (a parameter-free
:class:`PixelInput` takes its place: nothing of it is trained or saved).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..data.corruptions import CorruptionConfig, CorruptionGenerator, augment, default_rng
from ..maps import box_filter, ssim_map, upsample
from ..nets.sdc import SDCAutoencoder
from ..registry import register_method
from .base import Method, MethodConfig, Prediction, SizeRule, is_int

log = logging.getLogger(__name__)


@dataclass
class SSLAEConfig(MethodConfig):
    kernel: int = 3
    """f, the SDC kernel size: 3 (textures) or 5 (objects, per category; the paper does not say which)."""
    objective: Literal[1, 4] = 1
    """(1): restore X inside and outside the corruption (the paper's main objective); (4): segment-like."""
    lam: float = 0.5
    """λ, weight of the corrupted-area term (paper: 0.5 for (1); not given for (4))."""
    norm: Literal["literal", "l2sq"] = "literal"
    """``literal``: unsquared ‖·‖₂ over an ‖·‖₁ area per sample, as printed; ``l2sq``: masked MSE ΣM²e²/ΣM."""
    eps: float = 1e-8
    crop_sides: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """Progressive training: random crops of these fractions of the side, at a fixed pixel scale ([choice])."""
    crop_until: list[float] = field(default_factory=lambda: [0.25, 0.5])
    """Training progress at which each crop size but the last ends (25 / 25 / 50 % of the iterations)."""
    diff: Literal["mse", "ssim"] = "mse"
    """Difference map: channel-mean squared error, or channel-mean (1 − SSIM) / 2 (paper, per category)."""
    box_size: int = 9
    """k of the k×k box filter (odd; [choice] 9 at 512 px)."""
    box_passes: int = 10
    """n, the number of box-filter passes (0: no smoothing; [choice] 10 at 512 px)."""
    prior: bool = False
    """Object prior: multiply by (1 − mean held-out map)^t (paper: objects only); needs data.holdout_fraction."""
    prior_power: int = 1
    """t of the object prior ([choice] 1)."""
    early_stopping: bool = True
    """Objective (4) only: keep the snapshot with the best held-out L₄ (on fixed corruptions), chosen in calibrate."""
    val_every: int = 1000
    """Snapshot interval in training batches for the early stopping of objective (4)."""
    val_seed: int = 0
    """Seed of the fixed corruptions of the held-out images."""
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)


class PixelInput(nn.Module):
    """Parameter-free stand-in for a backbone: this method reads [0, 1] pixels without normalisation."""

    name = "pixels"
    trainable = False
    feature_info: tuple = ()

    def train(self, mode: bool = True) -> PixelInput:
        return super().train(False)  # frozen like any untrained backbone

    def normalize(self, images: Tensor) -> Tensor:
        return images

    def forward(self, x: Tensor, hook: Any = None) -> list[Tensor]:
        return [x]


def _per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def _term(weight: Tensor, err: Tensor, area: Tensor, norm: str, eps: float) -> Tensor:
    """‖w⊙e‖₂ / ‖area‖₁ (literal) or Σw²e² / Σarea (l2sq), per sample (B,)."""
    sq = _per_sample((weight * err) ** 2)
    top = sq if norm == "l2sq" else torch.sqrt(sq)
    return top / (_per_sample(area) + eps)


def restore_objective(recon: Tensor, clean: Tensor, mask: Tensor, lam: float = 0.5, norm: str = "literal",
                      eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """Objective (1): (1−λ)·‖M̄⊙e‖₂/‖M̄‖₁ + λ·‖M⊙e‖₂/‖M‖₁, per sample, averaged over the batch.

    Args:
        recon: F(X̂), (B, 3, H, W). clean: X. mask: M, (B, 1, H, W) or (B, 3, H, W), norms over all H·W·3 entries.

    Returns:
        (loss, mean unchanged-area term, mean corrupted-area term).
    """
    m = mask.expand_as(clean)
    err = recon - clean
    outside = _term(1.0 - m, err, 1.0 - m, norm, eps)
    inside = _term(m, err, m, norm, eps)
    return ((1.0 - lam) * outside + lam * inside).mean(), outside.mean(), inside.mean()


def segment_objective(recon: Tensor, clean: Tensor, corrupted: Tensor, mask: Tensor, lam: float = 0.5,
                      norm: str = "literal", eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """Objective (4): (1−λ)·‖M̄⊙e‖₂/‖M̄‖₁ − λ·‖ |X̂−X| ⊙ e ‖₂/‖M‖₁ (normaliser ‖M‖₁ as written, spec §9 #14)."""
    m = mask.expand_as(clean)
    err = recon - clean
    outside = _term(1.0 - m, err, 1.0 - m, norm, eps)
    inside = _term((corrupted - clean).abs(), err, m, norm, eps)
    return ((1.0 - lam) * outside - lam * inside).mean(), outside.mean(), inside.mean()


def difference_map(images: Tensor, recon: Tensor, kind: str = "mse") -> Tensor:
    """Channel-mean squared difference, or channel-mean (1 − SSIM)/2 clipped to [0, 1]: (B, 3, H, W) → (B, 1, H, W)."""
    if kind == "mse":
        return ((images - recon) ** 2).mean(1, keepdim=True)
    if kind == "ssim":
        return ((1.0 - ssim_map(images, recon)) / 2.0).clamp(0.0, 1.0).mean(1, keepdim=True)
    raise ValueError(f"diff must be 'mse' or 'ssim', got {kind!r}")


def _crop_start(lo_hi: tuple[int, int], limit: int) -> int:
    lo, hi = sorted(lo_hi)
    lo, hi = max(0, min(lo, limit)), max(0, min(hi, limit))
    return int(torch.randint(lo, hi + 1, ()))


@register_method
class SSLAE(Method):
    """Plain SDC autoencoder trained to undo synthetic patch corruptions; map = smoothed restoration error."""

    name = "ssl_ae"
    Config = SSLAEConfig
    default_backbone = "efficientnet_lite0"  # never used; the offline one, so create_method("ssl_ae") works anywhere

    @classmethod
    def input_size_rule(cls, cfg: SSLAEConfig, feature_info: Sequence[Any]) -> SizeRule:
        return SizeRule(1, 8, "the SDC autoencoder max-pools by 2 three times and upsamples back")

    @classmethod
    def config_problems(cls, run_cfg: Any, cfg: SSLAEConfig, feature_info: Sequence[Any]) -> list[str]:
        if not is_int(cfg.kernel) or cfg.kernel < 1 or cfg.kernel % 2 == 0:
            return [f"--model.kernel must be an odd integer (the SDC kernel size f, 'same' padding), "
                    f"got {cfg.kernel!r}"]
        return []

    def __init__(self, cfg: SSLAEConfig, backbone: nn.Module | None = None):
        # the registry's backbone is dropped: pixels in, pixels out (a frozen, parameter-free placeholder instead)
        super().__init__(cfg, PixelInput())
        self.net = SDCAutoencoder(cfg.kernel)
        self.corrupter = CorruptionGenerator(cfg.corruption)
        self.register_buffer("pixel_var_", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("avgmap_", torch.zeros(0))

    # -- data ------------------------------------------------------------------------------------------------
    def train_views(self, image: Tensor) -> dict[str, Tensor]:
        rng = default_rng()
        clean = augment(image, self.cfg.corruption.augment, rng)
        var = float(self.pixel_var_)
        out = self.corrupter(clean, rng, var if var >= 0 else None)
        return {"clean": clean, "corrupted": out.image, "corruption_mask": out.mask}

    def training_batch(self, images: Tensor) -> dict[str, Tensor]:
        # outside the data loader nothing seeds numpy per sample: seed it from torch's RNG (state restored after)
        from ..data.folder import seeded_rngs

        with seeded_rngs(int(torch.randint(0, 2**31 - 1, ())), 0, 0):
            return super().training_batch(images)

    def prepare(self, loader: Iterable[dict[str, Any]]) -> None:
        """σ², the per-pixel variance of the category's training pixels, for the patch-area cap (Thm. 2)."""
        total, sq, count = 0.0, 0.0, 0
        for batch in loader:
            x = batch["image"].double()
            total, sq, count = total + float(x.sum()), sq + float((x * x).sum()), count + x.numel()
        if count:
            mean = total / count
            self.pixel_var_.fill_(max(sq / count - mean * mean, 0.0))

    # -- training --------------------------------------------------------------------------------------------
    def crop_fraction(self, progress: float) -> float:
        for fraction, until in zip(self.cfg.crop_sides, self.cfg.crop_until):
            if progress < until:
                return fraction
        return self.cfg.crop_sides[-1]

    def crop(self, batch: dict[str, Tensor], fraction: float) -> tuple[Tensor, Tensor, Tensor]:
        """Same-size random crops (sides multiples of 8) that contain each sample's corrupted patch."""
        clean, corrupted, mask = batch["clean"], batch["corrupted"], batch["corruption_mask"]
        height, width = clean.shape[-2:]
        ch = min(height, max(8, int(height * fraction) // 8 * 8))
        cw = min(width, max(8, int(width * fraction) // 8 * 8))
        if (ch, cw) == (height, width):
            return clean, corrupted, mask
        crops = []
        for i in range(clean.shape[0]):
            rows, cols = mask[i, 0].amax(1).nonzero(), mask[i, 0].amax(0).nonzero()
            y0, y1 = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, height)
            x0, x1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, width)
            top = _crop_start((y1 - ch, y0), height - ch)
            left = _crop_start((x1 - cw, x0), width - cw)
            crops.append([t[i, :, top:top + ch, left:left + cw] for t in (clean, corrupted, mask)])
        return tuple(torch.stack(parts) for parts in zip(*crops))  # type: ignore[return-value]

    def objective(self, recon: Tensor, clean: Tensor, corrupted: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        c = self.cfg
        if c.objective == 1:
            return restore_objective(recon, clean, mask, c.lam, c.norm, c.eps)
        return segment_objective(recon, clean, corrupted, mask, c.lam, c.norm, c.eps)

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        fraction = self.crop_fraction(progress)
        clean, corrupted, mask = self.crop(batch, fraction)
        total, outside, inside = self.objective(self.net(corrupted), clean, corrupted, mask)
        return {"loss": total, "term_unchanged": outside.detach(), "term_corrupted": inside.detach(),
                "crop_side": torch.tensor(float(clean.shape[-1]))}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        return [{"params": list(self.net.parameters()), "lr": optim.lr, "name": "autoencoder"}]

    # -- early stopping of objective (4): the engine's snapshot service (reconad.engine.services) -----------
    def selection_interval(self) -> int | None:
        """Snapshots every ``val_every`` batches when objective (4) stops early; the engine keeps the best on V."""
        return self.cfg.val_every if self.cfg.objective == 4 and self.cfg.early_stopping else None

    @torch.no_grad()
    def validation_loss(self, images: Tensor) -> float:
        """Mean L₄ (or L₁) over held-out images with fixed corruptions (``val_seed``), in eval mode."""
        device = next(self.net.parameters()).device
        var = float(self.pixel_var_)
        total = 0.0
        for i, image in enumerate(images):
            rng = np.random.default_rng([self.cfg.val_seed, i])
            out = self.corrupter(image.cpu(), rng, var if var >= 0 else None)
            clean, corrupted, mask = (t[None].to(device) for t in (image, out.image, out.mask))
            total += float(self.objective(self.net(corrupted), clean, corrupted, mask)[0])
        return total / max(1, len(images))

    # -- calibration and inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, loader: Iterable[dict[str, Any]]) -> None:
        """On held-out training normals V: the object prior's mean map (early stopping ran before, in the engine)."""
        was_training = self.training
        self.eval()
        try:
            images = torch.cat([batch["image"] for batch in loader])
            if self.cfg.prior:
                device = next(self.net.parameters()).device
                maps = [self.smoothed_map(chunk.to(device)) for chunk in images.split(8)]
                self.avgmap_ = torch.cat(maps).mean(0, keepdim=True)  # (1, 1, H, W)
        finally:
            self.train(was_training)

    def smoothed_map(self, images: Tensor) -> Tensor:
        """G_k^n(Diff(X̂, F(X̂))), (B, 1, H, W), before the object prior."""
        diff = difference_map(images, self.net(images), self.cfg.diff)
        return box_filter(diff, self.cfg.box_size, self.cfg.box_passes)

    def apply_prior(self, maps: Tensor) -> Tensor:
        if not self.cfg.prior:
            return maps
        if self.avgmap_.numel() == 0:
            raise RuntimeError("ssl_ae: the object prior (model.prior) needs held-out training images; set "
                               "data.holdout_fraction > 0 (paper: 0.05) so that calibrate() can fit it.")
        avg = upsample(self.avgmap_.to(maps.dtype), tuple(maps.shape[-2:]), align_corners=False)
        return maps * (1.0 - avg).clamp_min(0.0) ** self.cfg.prior_power

    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(images, self.net(images))]

    def forward(self, images: Tensor) -> Prediction:
        maps = self.apply_prior(self.smoothed_map(images))
        return Prediction(maps, maps.flatten(1).sum(1))  # image score = SUM of the map (paper §6.2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # avgmap_ takes the shape of the calibration images: adopt the saved one before loading
        key = prefix + "avgmap_"
        if key in state_dict:
            self.avgmap_ = torch.empty_like(state_dict[key], device=self.avgmap_.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def max_ensemble(models: Sequence[SSLAE], images: Tensor) -> Prediction:
    """Pixel-wise max of the maps of separately trained models (paper Table 4: objectives (1) and (4)); score = sum."""
    maps = torch.stack([m.predict(images).anomaly_map for m in models]).amax(0)
    return Prediction(maps, maps.flatten(1).sum(1))
