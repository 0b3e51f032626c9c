"""ReContrast: reconstructive contrastive learning (Guo et al., NeurIPS 2023), as in its official code.

One implementation carries the paper's whole ablation ladder (Table 5) as switches of :class:`ReContrastConfig`:

========  ===============  =============  ==============  ===========  ===========
preset    encoder          loss           stop-gradient   pairs        hard mining
========  ===============  =============  ==============  ===========  ===========
A         frozen           regional       (n/a)           no           no
B         frozen           global         (n/a)           no           no
B+        frozen           global         (n/a)           no           yes
C         trained          global         no              no           no
D         trained          global         yes             no           no
E−        trained          global         no              yes          no
E         trained          global         yes             yes          no
full      trained          global         yes             yes          yes
========  ===============  =============  ==============  ===========  ===========

With a frozen encoder and no contrast pairs the model is exactly RD4AD (same modules, same loss).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..losses import hard_mining_mask, mask_gradient, summed_over_levels
from ..maps import channel_normalize
from ..registry import register_method
from .base import Method, OfficialLayout
from .rd4ad import LOSSES, RD4ADConfig, ReverseDistillationRules, build_rd_student

Pairs = list[tuple[Tensor, Tensor]]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class ReContrastConfig(RD4ADConfig):
    """ReContrast settings; the defaults are the full method of the official per-class scripts (§2)."""

    train_encoder: bool = True
    """Optimise the encoder (Config C and above); False keeps it frozen and in eval (Config A/B/B+ = RD4AD)."""
    encoder_bn_train: bool = True
    """BN mode of the trained encoder during training (official: eval for some categories, see the presets)."""
    encoder_lr: float = 1e-5
    """Learning rate of the trained encoder; bottleneck and decoder use ``optim.lr`` (2e-3)."""
    stop_gradient: bool = True
    """Detach every encoder target (Config D and above); the encoder then learns only as the decoder's input."""
    contrast_pairs: bool = True
    """Frozen twin encoder + two decoder heads + the six cross pairs (Config E); False: one encoder, 3 pairs."""
    hard_mining: bool = True
    """Mask the reconstruction's gradient where the pixel distance is below ``mean + alpha·std`` (global-hm)."""
    alpha_start: float = -3.0
    alpha_end: float = 1.0
    alpha_warmup: float = 0.1
    """α rises linearly from ``alpha_start`` to ``alpha_end`` over this fraction of training (0.2 = "stable")."""
    decoder_act: Literal["relu", "gelu"] = "relu"
    """Decoder activation (official multi-class scripts: GELU)."""


def feature_diversity(features: Tensor) -> Tensor:
    """Diversity of a feature map, ReContrast Fig. 5(b).

    Each position's feature vector is L2-normalised along channels, ``u(h, w) = f(h, w) / ||f(h, w)||``; the
    diversity is the standard deviation (unbiased) of ``u`` over the H·W positions, computed per sample and channel
    and averaged over channels and samples. It is 0 when every position carries the same direction.

    Args:
        features: (B, C, H, W) features.

    Returns:
        A detached scalar.
    """
    with torch.no_grad():
        unit = channel_normalize(features.detach().float()).flatten(2)  # (B, C, H·W)
        return unit.std(dim=2).mean()


@register_method
class ReContrast(ReverseDistillationRules, Method):
    """Trainable encoder + frozen twin → shared OCBE/decoder with two heads → six cross-reconstruction pairs."""

    name = "recontrast"
    Config = ReContrastConfig
    trainable_backbone = True
    official_layout = OfficialLayout(
        renames=(("model.encoder_freeze.", "frozen_backbone."), ("model.encoder.", "backbone."),
                 ("model.bottleneck.", "bottleneck."), ("model.decoder.", "decoder.")),
        # parity: official_code.md §2.1 — the OCBE's conv4/bn4 are inherited from RD4AD and never called
        unused=("model.bottleneck.conv4.", "model.bottleneck.bn4."),
    )

    def __init__(self, cfg: ReContrastConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        if cfg.contrast_pairs and not cfg.train_encoder:
            raise ValueError("contrast_pairs needs train_encoder=True: a frozen encoder and its frozen twin are the "
                             "same network, so the cross pairs would be plain RD4AD pairs computed twice")
        if cfg.train_encoder:
            backbone.unfreeze(bn_train=cfg.encoder_bn_train)
        else:
            backbone.freeze()
        # the twin is a copy of the encoder as built (pretrained weights); a checkpoint overwrites both
        self.frozen_backbone = copy.deepcopy(backbone).freeze() if cfg.contrast_pairs else None
        self.bottleneck, self.decoder = build_rd_student(backbone, cfg, n_heads=2 if cfg.contrast_pairs else 0,
                                                         act=ACTIVATIONS[cfg.decoder_act])

    # -- forward pieces ----------------------------------------------------------------------------------------------
    def encode(self, images: Tensor, cached: dict[str, Any] | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
        """(encoder features, frozen-twin features or None); the twin runs under no_grad (it is frozen).

        ``cached``: a training batch holding :meth:`frozen_features` rows, used instead of recomputing them.
        """
        cached = cached or {}
        x = self.backbone.normalize(images)
        # [(B, c1, H/4, W/4), (B, c2, H/8, W/8), (B, c3, H/16, W/16)]
        feats = cached["cached_encoder"] if "cached_encoder" in cached else self.backbone(x)
        if self.frozen_backbone is None:
            return feats, None
        frozen = cached["cached_frozen"] if "cached_frozen" in cached else self.frozen_backbone(x)
        return feats, frozen

    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        """The frozen twin's taps; with ``train_encoder: false`` also the (then frozen) encoder's."""
        x = self.backbone.normalize(batch["image"])
        out = {"cached_frozen": self.frozen_backbone(x)} if self.frozen_backbone is not None else {}
        if not self.cfg.train_encoder:
            out["cached_encoder"] = self.backbone(x)
        return out

    def _cross_pairs(self, feats: Sequence[Tensor], frozen: Sequence[Tensor]) -> list[Pairs]:
        """[(frozen target, head 0 on the trained half) × 3], [(trained target, head 1 on the frozen half) × 3]."""
        n = feats[0].shape[0]
        # parity: official_code.md §2.1 — one bottleneck/decoder pass over the concatenated batch, trained half
        # first, so their BN statistics cover both encoders
        joint = [torch.cat([t, f]) for t, f in zip(feats, frozen)]  # each (2B, c_k, h_k, w_k)
        dec = self.decoder
        d3 = dec.layer1(self.bottleneck(joint))
        d2 = dec.layer2(d3)
        d1 = dec.layer3(d2)
        levels, heads = (d1, d2, d3), (dec.out1, dec.out2, dec.out3)
        # The official code applies both heads to all 2B samples and keeps head 0 on the first half and head 1 on
        # the second; 1×1 convs act per sample, so running each head on its own half gives the same outputs.
        recon = [[heads[k][h](levels[k][h * n:(h + 1) * n]) for k in range(3)] for h in range(2)]
        return [list(zip(frozen, recon[0])), list(zip(feats, recon[1]))]

    def pair_groups(self, images: Tensor, cached: dict[str, Any] | None = None,
                    ) -> tuple[list[Pairs], list[Tensor], list[Tensor] | None]:
        """Pairs grouped by target encoder (frozen targets first), plus both encoders' features."""
        feats, frozen = self.encode(images, cached)
        if frozen is None:
            groups = [list(zip(feats, self.decoder(self.bottleneck(feats))))]
        else:
            groups = self._cross_pairs(feats, frozen)
        return groups, feats, frozen

    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [pair for group in self.pair_groups(images)[0] for pair in group]

    # -- training ----------------------------------------------------------------------------------------------------
    def alpha(self, progress: float) -> float:
        """Hard-mining α at ``progress`` (fraction of training done).

        parity: official_code.md §2.2 — ``min(-3 + 4·it / (0.1·total), 1)``.
        """
        c = self.cfg
        if c.alpha_warmup <= 0 or c.alpha_start == c.alpha_end:  # also a constant α of ±inf (no inf - inf)
            return c.alpha_end
        return min(c.alpha_start + (c.alpha_end - c.alpha_start) * progress / c.alpha_warmup, c.alpha_end)

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        groups, feats, frozen = self.pair_groups(batch["image"], batch)
        alpha = self.alpha(progress)
        terms: dict[str, Tensor] = {}
        discarded: list[Tensor] = []
        names = ("frozen", "trainable") if frozen is not None else ("trainable" if self.cfg.train_encoder else
                                                                   "frozen",)
        # parity: official_code.md §2.2 — ½·Σ_k over the frozen targets + ½·Σ_k over the trained targets
        weight = 1.0 / len(groups)
        group_losses = []
        for name, group in zip(names, groups):
            level_terms: list[Tensor] = []
            group_losses.append(summed_over_levels(self._term_fn(alpha, level_terms, discarded), group))
            for level, value in enumerate(level_terms, start=1):
                terms[f"loss/{name}/l{level}"] = value
            terms[f"loss/{name}"] = group_losses[-1].detach()
        total = sum(weight * g for g in group_losses)
        terms["loss"] = total
        if self.cfg.hard_mining:
            terms["alpha"] = torch.tensor(float(alpha))
            terms["hm_discard_rate"] = torch.stack(discarded).mean()
        self._log_diversity(terms, feats, frozen)
        return terms

    def _term_fn(self, alpha: float, level_terms: list[Tensor], discarded: list[Tensor]):
        """The per-level loss with the configured stop-gradient and hard mining; records detached diagnostics."""

        def term(target: Tensor, recon: Tensor) -> Tensor:
            if self.cfg.stop_gradient:
                target = target.detach()  # parity: official_code.md §2.2 — stop-gradient on every encoder target
            if self.cfg.hard_mining:
                keep = hard_mining_mask(target, recon, alpha)  # (B, 1, h, w)
                discarded.append(1.0 - keep.float().mean())
                recon = mask_gradient(recon, keep)
            value = LOSSES[self.cfg.loss](target, recon)
            level_terms.append(value.detach())
            return value

        return term

    def _log_diversity(self, terms: dict[str, Tensor], feats: Sequence[Tensor],
                       frozen: Sequence[Tensor] | None) -> None:
        streams = {"trainable" if self.cfg.train_encoder else "frozen": feats}
        if frozen is not None:
            streams["frozen"] = frozen
        for name, levels in streams.items():
            for level, f in enumerate(levels, start=1):
                terms[f"diversity/{name}/l{level}"] = feature_diversity(f)

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        # parity: official_code.md §2.3 — the official code steps two AdamW optimisers with the same β, eps and
        # weight decay (decoder+bottleneck at 2e-3, encoder at 1e-5); AdamW updates every parameter independently
        # from its own state, so one AdamW with two learning-rate groups performs exactly the same updates.
        student = list(self.bottleneck.parameters()) + list(self.decoder.parameters())
        groups = [{"params": student, "lr": optim.lr, "name": "student"}]
        if self.cfg.train_encoder:
            groups.append({"params": list(self.backbone.parameters()), "lr": self.cfg.encoder_lr, "name": "encoder"})
        return groups
