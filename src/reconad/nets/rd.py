"""Reverse-distillation building blocks: the OCBE bottleneck and the mirrored decoder, for any tap channels.

Module and attribute names follow the official RD4AD code (``resnet.py`` / ``de_resnet.py``) so that official
checkpoints load through a table of prefix renames (see ``reconad.official``).

Sizes are derived from the encoder taps ``(c1, c2, c3)`` at strides (4, 8, 16):

* OCBE: MFF ``c1 → c2 → c3`` (two 3×3 s2 convs), ``c2 → c3`` (one), concat with f3 → ``3·c3``; OCE: three
  residual blocks, the first with stride 2, to ``2·c3`` channels at stride 32.
* Decoder: three stages ``2·c3 → c3 → c2 → c1`` with (3, 4, 6) blocks; the first block of each stage upsamples
  with a 2×2 stride-2 transposed conv in its main path and its shortcut.

With WideResNet50-2 taps (256, 512, 1024) and bottleneck blocks of width ratio 0.5 this is exactly the
official model (official_code.md §1.3/§1.4), minus the dead ``conv4``/``bn4`` (kept behind a switch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

BlockType = Literal["bottleneck", "basic"]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def deconv2x2(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2, bias=False)


def activation(act: type[nn.Module]) -> nn.Module:
    """``act()``, in place where that is possible (ReLU: saves a copy per call; autograd needs only its output)."""
    return act(inplace=True) if act in (nn.ReLU, nn.LeakyReLU) else act()


def rescaling_conv(in_ch: int, out_ch: int, scale: float) -> nn.Module:
    """2×2 stride-2 transposed conv (scale 2), 3×3 stride-2 conv (scale 0.5) or 3×3 conv (scale 1)."""
    return deconv2x2(in_ch, out_ch) if scale == 2 else conv3x3(in_ch, out_ch, stride=2 if scale < 1 else 1)


class _ResidualBlock(nn.Module):
    def _set_shortcut(self, scale: float, shortcut: nn.Module | None) -> None:
        # official names: `upsample` in the decoder, `downsample` in the OCE
        if scale == 2:
            self.upsample = shortcut
        else:
            self.downsample = shortcut

    def _shortcut(self, x: Tensor) -> Tensor:
        shortcut = self.upsample if hasattr(self, "upsample") else self.downsample
        return x if shortcut is None else shortcut(x)


class Bottleneck(_ResidualBlock):
    """ResNet bottleneck; ``scale`` = 2 upsamples (decoder), 0.5 downsamples (OCE), 1 keeps the size."""

    def __init__(self, in_ch: int, width: int, out_ch: int, scale: float = 1, shortcut: nn.Module | None = None,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = rescaling_conv(width, width, scale)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = activation(act)
        self._set_shortcut(scale, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self._shortcut(x)  # in place, as the official blocks: BN's backward needs its input, not its output
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """ResNet basic block (ResNet18/34 decoders); ``scale`` as in :class:`Bottleneck`."""

    def __init__(self, in_ch: int, width: int, out_ch: int, scale: float = 1, shortcut: nn.Module | None = None,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        del width  # basic blocks have no inner width
        self.conv1 = rescaling_conv(in_ch, out_ch, scale)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = activation(act)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self._set_shortcut(scale, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self._shortcut(x)  # in place (see Bottleneck)
        return self.relu(out)


BLOCKS: dict[str, type[nn.Module]] = {"bottleneck": Bottleneck, "basic": BasicBlock}


def make_stage(block: BlockType, in_ch: int, out_ch: int, num_blocks: int, scale: float, width_ratio: float,
               act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A ResNet stage whose first block rescales (``scale`` 2 or 0.5) and changes channels ``in_ch → out_ch``."""
    cls = BLOCKS[block]
    width = max(1, int(round(out_ch * width_ratio)))
    if scale == 2:
        shortcut = nn.Sequential(deconv2x2(in_ch, out_ch), nn.BatchNorm2d(out_ch))
    elif scale != 1 or in_ch != out_ch:
        shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride=2 if scale < 1 else 1), nn.BatchNorm2d(out_ch))
    else:
        shortcut = None
    blocks = [cls(in_ch, width, out_ch, scale=scale, shortcut=shortcut, act=act)]
    blocks += [cls(out_ch, width, out_ch, act=act) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def init_resnet_style(module: nn.Module) -> None:
    """kaiming_normal (fan_out, relu) for ``nn.Conv2d`` only, BN weight 1 / bias 0.

    parity: official_code.md §1.4 — the loop matches ``nn.Conv2d`` only, so every ``ConvTranspose2d`` keeps
    PyTorch's default init (kaiming_uniform, a=√5).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class OCBE(nn.Module):
    """One-class bottleneck embedding: multi-scale feature fusion (MFF) + one-class embedding (OCE).

    Input: taps ``[f1, f2, f3]`` at strides 4/8/16; output ``(B, 2·c3, H/32, W/32)``.
    """

    def __init__(self, channels: Sequence[int], block: BlockType = "bottleneck", width_ratio: float = 0.5,
                 num_blocks: int = 3, dead_conv4: bool = False):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = conv3x3(c1, c2, stride=2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = conv3x3(c2, c3, stride=2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, stride=2)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = 2 * c3
        self.bn_layer = make_stage(block, 3 * c3, self.out_channels, num_blocks, scale=0.5, width_ratio=width_ratio)
        if dead_conv4:
            # parity: official_code.md §1.3 — defined but never used; only for exact parameter counts / key sets
            self.conv4 = conv1x1(4 * c3, 2 * c3)
            self.bn4 = nn.BatchNorm2d(2 * c3)
        init_resnet_style(self)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f1, f2, f3 = feats
        a = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f1))))))  # (B, c3, H/16, W/16)
        b = self.relu(self.bn3(self.conv3(f2)))  # (B, c3, H/16, W/16)
        fused = torch.cat([a, b, f3], dim=1)  # (B, 3·c3, H/16, W/16) — order as official
        return self.bn_layer(fused).contiguous()  # (B, 2·c3, H/32, W/32)


class Decoder(nn.Module):
    """Mirrored student decoder; returns features aligned with the taps, ``[d1, d2, d3]`` (strides 4, 8, 16).

    With ``n_heads > 0`` (ReContrast), each level gets ``n_heads`` 1×1 conv heads with bias (``out1..out3``),
    and :meth:`forward` returns the list of head outputs ``[head0(l1..l3), head1(l1..l3), …]``.
    """

    def __init__(self, channels: Sequence[int], in_channels: int, block: BlockType = "bottleneck",
                 width_ratio: float = 0.5, num_blocks: Sequence[int] = (3, 4, 6), n_heads: int = 0,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        c1, c2, c3 = channels
        self.layer1 = make_stage(block, in_channels, c3, num_blocks[0], scale=2, width_ratio=width_ratio, act=act)
        self.layer2 = make_stage(block, c3, c2, num_blocks[1], scale=2, width_ratio=width_ratio, act=act)
        self.layer3 = make_stage(block, c2, c1, num_blocks[2], scale=2, width_ratio=width_ratio, act=act)
        init_resnet_style(self)
        self.n_heads = n_heads
        for level, ch in enumerate((c1, c2, c3), start=1):
            if n_heads:
                heads = nn.ModuleList(nn.Conv2d(ch, ch, kernel_size=1, bias=True) for _ in range(n_heads))
                for head in heads:
                    # parity: official_code.md §2.1 — kaiming_normal fan_out weight, default bias init
                    nn.init.kaiming_normal_(head.weight, mode="fan_out", nonlinearity="relu")
                setattr(self, f"out{level}", heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        d3 = self.layer1(x)  # (B, c3, H/16, W/16)
        d2 = self.layer2(d3)  # (B, c2, H/8, W/8)
        d1 = self.layer3(d2)  # (B, c1, H/4, W/4)
        feats = [d1, d2, d3]
        if not self.n_heads:
            return feats
        heads = [self.out1, self.out2, self.out3]
        return [heads[level][h](feats[level]) for h in range(self.n_heads) for level in range(3)]


@dataclass(frozen=True)
class RDArch:
    """Block type, width ratio and block counts of the OCE and decoder for one encoder family."""

    block: BlockType
    width_ratio: float
    oce_blocks: int
    decoder_blocks: tuple[int, int, int]


def default_arch(backbone_name: str) -> RDArch:
    """Mirror the encoder family as the official code does (``de_resnet18/50``, ``de_wide_resnet50_2``)."""
    if backbone_name in ("resnet18", "resnet34"):
        blocks = (2, 2, 2) if backbone_name == "resnet18" else (3, 4, 6)
        return RDArch("basic", 1.0, 2, blocks)
    if backbone_name in ("resnet50", "resnet101", "resnet152"):
        return RDArch("bottleneck", 0.25, 3, (3, 4, 6))
    # wide_resnet50_2 (width_per_group 128) and every other backbone (EfficientNet-Lite…): wide bottlenecks
    return RDArch("bottleneck", 0.5, 3, (3, 4, 6))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class ProjLayer(nn.Module):
    """RD++ projector for one level: 4 × [conv3×3 (bias) → InstanceNorm → LeakyReLU 0.01], ``c → c/2 → c/4 → c/2 →
    c_out``.

    parity: official_code.md §3.1 — InstanceNorm2d without affine or running stats, PyTorch default conv init,
    the last layer also normalised and activated; ``proj.{0,3,6,9}`` are the official conv keys.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        widths = [in_ch, in_ch // 2, in_ch // 4, in_ch // 2, out_ch]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1), nn.InstanceNorm2d(c_out),
                       nn.LeakyReLU(inplace=True)]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MultiProjectionLayer(nn.Module):
    """One :class:`ProjLayer` per tap (``proj_a``, ``proj_b``, ``proj_c`` as official), each keeping its shape."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        self.proj_a = ProjLayer(c1, c1)
        self.proj_b = ProjLayer(c2, c2)
        self.proj_c = ProjLayer(c3, c3)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [proj(f) for proj, f in zip((self.proj_a, self.proj_b, self.proj_c), feats)]
