"""RD++: "Revisiting Reverse Distillation" (Tien et al., CVPR 2023), as in its official code (official_code.md §3).

RD4AD plus a multi-projection layer between the frozen encoder and the OCBE, trained with simplex-noise views:
the projector is shared by clean and noisy features, the decoder sees the projected clean features, and the
anomaly map compares the *unprojected* encoder features with the decoder output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..data.noise import SimplexNoisePatch
from ..losses import summed_over_levels
from ..maps import cosine_distance_map
from ..nets.rd import MultiProjectionLayer
from ..registry import register_method
from .base import Method, OfficialLayout
from .rd4ad import LOSSES, RD4ADConfig, ReverseDistillationRules, build_rd_student

# parity: official_code.md §3.3 — L_proj = (ssot + 0.01·recon + 0.1·contrast) / 1.11
RECON_WEIGHT, CONTRAST_WEIGHT, PROJ_NORM = 0.01, 0.1, 1.11


@dataclass
class RDPPConfig(RD4ADConfig):
    proj_lr: float = 1e-3
    """Projector learning rate (OCBE + decoder use ``optim.lr``, 5e-3); official: two Adams with equal betas."""
    proj_weight: float = 0.2
    """Weight of the projection loss (official ``--weight_proj``)."""
    ssot: bool = True
    """Compute the SSOT Sinkhorn term (official). It is ~0 by construction (§3.3); ``False`` drops it."""
    contrast_margin: float = 0.5
    """CosineEmbeddingLoss margin (target −1) between unprojected noisy and projected clean features."""
    noise_scale: float = 0.2
    noise_min: int = 10
    noise_max: int = 31
    noise_octaves: int = 6
    noise_persistence: float = 0.6
    noise_frequency: float = 32.0
    fixed_noise: bool = True
    """Official quirk (§3.2): every patch is a crop of one fixed noise field per run. ``False``: fresh noise."""
    noise_seed: int | None = None
    """Seed of the noise field; ``None`` draws it from torch's RNG when the model is built (the engine seeds that
    RNG with ``train.seed`` first, so a run, its resume and its reload get the same field)."""
    drop_odd_batches: bool = False
    """Paper-era behaviour (before commit 94a8df5): zero_grad before every backward, so with ``train.accumulate:
    2`` only every 2nd batch contributes. Implemented as a zero-gradient loss for the first batch of each pair."""


@lru_cache(maxsize=1)
def _sinkhorn():
    from geomloss import SamplesLoss

    # parity: official_code.md §3.3 — the official geomloss settings
    return SamplesLoss(loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=10000000, scaling=0.95, truncate=10,
                       debias=True, backend="auto")


def ssot_loss(proj: list[Tensor], perm: Tensor) -> Tensor:
    """Σ_levels Sinkhorn(softmax(flatten(P_k)), same cloud permuted by ``perm``); ~0 by construction."""
    total = proj[0].new_zeros(())
    for p in proj:
        cloud = torch.softmax(p.flatten(1), dim=-1)  # (B, C·H·W), softmax over the flattened sample
        total = total + _sinkhorn()(cloud, cloud[perm])
    return total


def reconstruction_loss(proj_noisy: list[Tensor], proj: list[Tensor]) -> Tensor:
    """Σ_levels mean_{B,H,W}[1 − cos_c(Pn_k, P_k)]; gradients reach both sides (official: no detach)."""
    return sum(cosine_distance_map(pn, p).mean() for pn, p in zip(proj_noisy, proj))


def contrast_loss(feats_noisy: list[Tensor], proj: list[Tensor], margin: float = 0.5) -> Tensor:
    """Σ_levels CosineEmbeddingLoss(flatten(Fn_k), flatten(P_k), target −1) = mean_B max(0, cos_flat − margin).

    parity: official_code.md §3.3 — the *unprojected* noisy encoder features against the projected clean ones.
    """
    criterion = nn.CosineEmbeddingLoss(margin=margin)
    target = -torch.ones(proj[0].shape[0], device=proj[0].device)
    return sum(criterion(fn.flatten(1), p.flatten(1), target) for fn, p in zip(feats_noisy, proj))


@register_method
class RDPP(ReverseDistillationRules, Method):
    """Frozen encoder → shared projector → OCBE → decoder; map = ``1 − cos`` of unprojected features and decoder."""

    name = "rdpp"
    Config = RDPPConfig
    official_layout = OfficialLayout(
        renames=(("encoder.", "backbone."), ("bn.", "bottleneck."), ("decoder.", "decoder."), ("proj.", "proj.")),
        # parity: official_code.md §1.2/§1.3/§3.1 — layer4/fc are unused, conv4/bn4 never called
        unused=("encoder.layer4.", "encoder.fc.", "bn.conv4.", "bn.bn4."),
    )

    def __init__(self, cfg: RDPPConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        self.proj = MultiProjectionLayer([t.channels for t in backbone.feature_info])
        self.bottleneck, self.decoder = build_rd_student(backbone, cfg)
        seed = cfg.noise_seed if cfg.noise_seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.noise = SimplexNoisePatch(seed, cfg.noise_scale, cfg.noise_min, cfg.noise_max, cfg.noise_octaves,
                                       cfg.noise_persistence, cfg.noise_frequency, cfg.fixed_noise)
        if cfg.drop_odd_batches:  # saved with the weights, so a resumed run keeps the batch parity
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def encode(self, images: Tensor) -> list[Tensor]:
        return self.backbone(self.backbone.normalize(images))

    def train_views(self, image: Tensor) -> dict[str, Tensor]:
        # parity: official_code.md §3.2 — noise added to the [0, 1] image before normalisation, no clipping
        return {"noisy": self.noise(image)}

    def training_batch(self, images: Tensor) -> dict[str, Tensor]:
        # outside the data loader nothing seeds numpy per sample: seed it from torch's RNG (state restored after),
        # so torch.manual_seed alone makes these batches reproducible
        from ..data.folder import seeded_rngs

        with seeded_rngs(int(torch.randint(0, 2**31 - 1, ())), 0, 0):
            # the whole batch at once, on the images' device: equal to stacking train_views image by image
            return {"image": images, "noisy": self.noise.batch(images)}

    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        return {"cached_teacher": self.encode(batch["image"])}  # the clean view; the noisy one is drawn anew

    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        feats = self.encode(images)  # [(B, c_k, H_k, W_k)] — the map uses the unprojected features
        recon = self.decoder(self.bottleneck(self.proj(feats)))
        return list(zip(feats, recon))

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        images = batch["image"]
        noisy = batch["noisy"] if "noisy" in batch else self.training_batch(images)["noisy"]
        n = images.shape[0]
        if "cached_teacher" in batch:  # the clean view's taps from the feature cache: only the noisy view is new
            feats, feats_noisy = batch["cached_teacher"], self.encode(noisy)
            both = [torch.cat([f, g]) for f, g in zip(feats, feats_noisy)]
        else:
            # clean and noisy in one pass: the frozen encoder (eval BN) and InstanceNorm act per sample
            both = self.encode(torch.cat([images, noisy]))
            feats, feats_noisy = [f[:n] for f in both], [f[n:] for f in both]
        projected = self.proj(both)
        proj, proj_noisy = [p[:n] for p in projected], [p[n:] for p in projected]
        recon = self.decoder(self.bottleneck(proj))  # the decoder is fed the projected clean features
        terms = {"distill": summed_over_levels(LOSSES[self.cfg.loss], list(zip(feats, recon))),
                 "recon": reconstruction_loss(proj_noisy, proj),
                 "contrast": contrast_loss(feats_noisy, proj, self.cfg.contrast_margin)}
        proj_loss = RECON_WEIGHT * terms["recon"] + CONTRAST_WEIGHT * terms["contrast"]
        perm = torch.randperm(n)  # drawn either way, so that ``ssot: false`` leaves the RNG stream as it is
        if self.cfg.ssot:
            terms["ssot"] = ssot_loss(proj, perm.to(images.device))
            proj_loss = terms["ssot"] + proj_loss
        total = terms["distill"] + self.cfg.proj_weight * proj_loss / PROJ_NORM
        out = {k: v.detach() for k, v in terms.items()}
        if self.cfg.drop_odd_batches and self.training:
            total, out["dropped"] = self._drop_first_of_pair(total)
        return {"loss": total, "proj": (proj_loss / PROJ_NORM).detach(), **out}

    def _drop_first_of_pair(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """Same value, zero gradient for the 1st, 3rd, … batch: what zero_grad before each backward left."""
        index = int(self.batches_seen)
        self.batches_seen += 1
        if index % 2 == 0:
            # parity: official_code.md §3.4 — paper-era code discarded these gradients (forward and BN stats ran)
            return total.detach() + 0.0 * total, total.new_ones(())
        return total, total.new_zeros(())

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        # parity: official_code.md §3.4 — two Adams (projector 1e-3; OCBE + decoder 5e-3) with the same betas are
        # one Adam with two groups: Adam's update is per parameter and both steps happen together
        student = list(self.bottleneck.parameters()) + list(self.decoder.parameters())
        return [{"params": list(self.proj.parameters()), "lr": self.cfg.proj_lr, "name": "proj"},
                {"params": student, "lr": optim.lr, "name": "student"}]
