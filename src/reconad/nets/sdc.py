"""The plain convolutional autoencoder of Bauer et al. with stacked-dilated-convolution blocks (spec/bauer.md §2).

Encoder 64/128/256 with max-pooling, four SDC blocks (six parallel f×f dilated convs, dilations 1…32, 64 filters
each, concatenated, then a 3×3 conv with 384 filters), a mirrored decoder with transposed convs and a 1×1 conv +
sigmoid. No skip connections. Any input side divisible by 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

SDC_DILATIONS = (1, 2, 4, 8, 16, 32)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (bias-free, "same" padding) + BN + ReLU; bias-free because BN follows ([choice], spec §2)."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def up_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3×3 stride-2 transposed conv that exactly doubles the side (padding 1, output_padding 1) + BN + ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SDCBlock(nn.Module):
    """Six parallel f×f dilated convs (64 filters each) concatenated to 384 channels, BN + ReLU, then 3×3 conv 384."""

    def __init__(self, in_channels: int, kernel: int = 3, branch_channels: int = 64,
                 dilations: Sequence[int] = SDC_DILATIONS, out_channels: int = 384):
        super().__init__()
        width = branch_channels * len(dilations)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, branch_channels, kernel, padding=d * (kernel - 1) // 2, dilation=d, bias=False)
            for d in dilations)
        # BN + ReLU on the concatenation [choice]: BN is per channel, so per-branch BN would be the same thing
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.fuse = conv_bn_relu(width, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        stacked = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, 6·64, h, w)
        return self.fuse(self.act(self.bn(stacked)))


class SDCAutoencoder(nn.Module):
    """Paper Table 1: [0, 1] RGB (B, 3, H, W) → [0, 1] RGB (B, 3, H, W); H, W divisible by 8.

    Args:
        kernel: f, the SDC kernel size (3 for textures; 3 or 5 for objects).
        widths: encoder widths (decoder mirrors them).
        sdc_blocks: number of stacked SDC blocks.
        sdc_width: output channels of every SDC block (6 × 64 = 384 in the paper).
    """

    def __init__(self, kernel: int = 3, widths: Sequence[int] = (64, 128, 256), sdc_blocks: int = 4,
                 sdc_width: int = 384, in_channels: int = 3):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the SDC kernel size f must be odd for 'same' padding, got {kernel}")
        if sdc_width % len(SDC_DILATIONS):
            raise ValueError(f"sdc_width must be divisible by {len(SDC_DILATIONS)}, got {sdc_width}")
        self.kernel = kernel
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            layers += [conv_bn_relu(cin, width), conv_bn_relu(width, width), nn.MaxPool2d(2, 2)]
            cin = width
        self.encoder = nn.Sequential(*layers)
        branch = sdc_width // len(SDC_DILATIONS)
        self.bottleneck = nn.Sequential(*(SDCBlock(cin if i == 0 else sdc_width, kernel, branch, SDC_DILATIONS,
                                                   sdc_width) for i in range(sdc_blocks)))
        layers, cin = [], sdc_width
        for width in reversed(widths):
            layers += [up_bn_relu(cin, width), conv_bn_relu(width, width), conv_bn_relu(width, width)]
            cin = width
        self.decoder = nn.Sequential(*layers)
        # no BN before the output: the paper saw gridding artefacts with it
        self.head = nn.Conv2d(cin, in_channels, 1)
        self.factor = 2 ** len(widths)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"SDC autoencoder input sides must be divisible by {self.factor}, got "
                             f"{tuple(x.shape[-2:])}")
        return self.head(self.decoder(self.bottleneck(self.encoder(x)))).sigmoid()


def conv_weight_count(module: nn.Module) -> int:
    """Number of conv / transposed-conv weights (biases and BN excluded), as counted in spec §2."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
