"""RD4AD: reverse distillation from a one-class embedding (Deng & Li, CVPR 2022), as in its official code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from ..config import OptimConfig
from ..losses import global_cosine, regional_cosine, summed_over_levels
from ..nets.rd import OCBE, BlockType, Decoder, default_arch
from ..registry import register_method
from .base import Method, MethodConfig, OfficialLayout, SizeRule, describe_taps, is_number


@dataclass
class RD4ADConfig(MethodConfig):
    loss: Literal["global", "regional"] = "global"
    """``global``: flattened cosine per sample (official code, §1.5); ``regional``: per-pixel (paper text)."""
    dead_conv4: bool = False
    """Build the official OCBE's unused conv4/bn4 (§1.3): only changes parameter counts and checkpoint keys."""
    block: BlockType | None = None
    """OCE/decoder block type; ``None`` mirrors the backbone family (bottleneck for WRN50-2)."""
    width_ratio: float | None = None
    """Bottleneck width / output channels; ``None`` mirrors the backbone (0.5 for WRN50-2)."""


LOSSES = {"global": global_cosine, "regional": regional_cosine}


def build_rd_student(backbone: nn.Module, cfg: RD4ADConfig, n_heads: int = 0,
                     act: type[nn.Module] = nn.ReLU) -> tuple[OCBE, Decoder]:
    """OCBE + decoder sized from the backbone's three taps (strides 4, 8, 16)."""
    info = backbone.feature_info
    if len(info) != 3 or [t.stride for t in info] != [info[0].stride, 2 * info[0].stride, 4 * info[0].stride]:
        taps = ", ".join(f"{t.name} (stride {t.stride})" for t in info)
        raise ValueError(f"reverse distillation needs three taps with strides s, 2s, 4s; got {taps}. "
                         "Set --backbone.taps to three consecutive stages.")
    arch = default_arch(backbone.name)
    block = cfg.block or arch.block
    width_ratio = cfg.width_ratio or arch.width_ratio
    channels = [t.channels for t in info]
    bottleneck = OCBE(channels, block, width_ratio, arch.oce_blocks, dead_conv4=cfg.dead_conv4)
    decoder = Decoder(channels, bottleneck.out_channels, block, width_ratio, arch.decoder_blocks, n_heads, act)
    return bottleneck, decoder


class ReverseDistillationRules:
    """The input-size rule and tap checks of every method built on the OCBE + mirrored decoder (RD4AD, RD++, GNL,
    ReContrast): mixed in before :class:`Method`."""

    @classmethod
    def input_size_rule(cls, cfg: Any, feature_info: Sequence[Any]) -> SizeRule:
        s = feature_info[0].stride
        return SizeRule(s, 8, f"the reverse-distillation decoder upsamples the stride-{8 * s} bottleneck x2 three "
                              f"times back to the stride-{s} tap")

    @classmethod
    def config_problems(cls, run_cfg: Any, cfg: Any, feature_info: Sequence[Any]) -> list[str]:
        """Taps at strides s, 2s, 4s (the OCBE fuses three levels) and a positive decoder width ratio."""
        problems = []
        s = feature_info[0].stride if feature_info else 0
        if [t.stride for t in feature_info] != [s, 2 * s, 4 * s]:
            problems.append(f"--backbone.taps: {run_cfg.method} needs three taps at strides s, 2s, 4s, got "
                            f"{describe_taps(feature_info)}; e.g. [stride4, stride8, stride16] (the default)")
        ratio = getattr(cfg, "width_ratio", None)
        if ratio is not None and (not is_number(ratio) or ratio <= 0):
            problems.append(f"--model.width_ratio must be > 0 or null (mirror the backbone), got {ratio!r}")
        return problems


@register_method
class RD4AD(ReverseDistillationRules, Method):
    """Frozen teacher encoder → OCBE → student decoder; anomaly = per-pixel ``1 - cos`` between them."""

    name = "rd4ad"
    Config = RD4ADConfig
    official_layout = OfficialLayout(
        renames=(("encoder.", "backbone."), ("bn.", "bottleneck."), ("decoder.", "decoder.")),
        # parity: official_code.md §1.2/§1.3 — layer4/fc are computed but unused; conv4/bn4 are never called
        unused=("encoder.layer4.", "encoder.fc.", "bn.conv4.", "bn.bn4."),
    )

    def __init__(self, cfg: RD4ADConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        self.bottleneck, self.decoder = build_rd_student(backbone, cfg)

    def encode(self, images: Tensor) -> list[Tensor]:
        return self.backbone(self.backbone.normalize(images))

    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        # [(B, c1, H/4, W/4), (B, c2, H/8, W/8), (B, c3, H/16, W/16)]
        return self._reconstructed(self.encode(images))

    def _reconstructed(self, feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(teacher tap, student reconstruction) per level."""
        return list(zip(feats, self.decoder(self.bottleneck(feats))))

    cache_replaces_images = True  # the loss needs only the teacher's taps

    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        return {"cached_teacher": self.encode(batch["image"])}

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        feats = batch["cached_teacher"] if "cached_teacher" in batch else self.encode(batch["image"])
        total = summed_over_levels(LOSSES[self.cfg.loss], self._reconstructed(feats))
        return {"loss": total}

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        # parity: official_code.md §1.6 — Adam over bottleneck + decoder only
        params = list(self.bottleneck.parameters()) + list(self.decoder.parameters())
        return [{"params": params, "lr": optim.lr, "name": "student"}]
