"""ULSAD networks (official_code.md §4): feature aggregation, feature reconstruction network, global image AE.

Module and parameter names follow the official code (``featae.conv1``, ``img_encoder.bn2d7`` ...) so official
checkpoints load through a table of prefix renames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def aggregate_features(taps: Sequence[Tensor], out_channels: int) -> Tensor:
    """Upsample every tap to the first tap's size, concatenate, average channels down to ``out_channels``.

    parity: official_code.md §4.2 — bilinear, align_corners=False; ``adaptive_avg_pool1d`` over the channel axis
    (for WRN50-2 layer2 + layer3: 1536 → 384, i.e. the mean of each run of 4 consecutive channels); no spatial
    pooling.

    Args:
        taps: (B, C_i, H_i, W_i) feature maps, the first one the finest.
        out_channels: Channels after pooling.

    Returns:
        (B, out_channels, H_0, W_0).
    """
    size = taps[0].shape[-2:]
    feats = [taps[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in taps[1:]]
    x = torch.cat(feats, dim=1)  # (B, ΣC, H, W)
    b, c, h, w = x.shape
    if c % out_channels == 0:
        # equal runs of c / out_channels channels: adaptive pooling is their mean, taken without transposing
        return x.view(b, out_channels, c // out_channels, h, w).mean(2)
    x = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)  # channels as a 1-D signal per pixel
    x = F.adaptive_avg_pool1d(x, out_channels)
    return x.reshape(b, h, w, out_channels).permute(0, 3, 1, 2).contiguous()


class FeatAE(nn.Module):
    """Feature reconstruction network (official ``FeatAE`` with double_channel=True), §4.3.

    C → 2C → 4C → 4C (no ReLU) → 2C → C → 2C (final ReLU). Output channels ``[:C]`` reconstruct the input
    ("local"), ``[C:]`` are matched to the global autoencoder.
    """

    def __init__(self, channels: int = 384):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.conv2 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(4 * c)
        self.conv3 = nn.Conv2d(4 * c, 4 * c, 3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.deconv1 = nn.ConvTranspose2d(4 * c, 2 * c, 4, stride=2, padding=1)
        self.bn4 = nn.BatchNorm2d(2 * c)
        self.deconv2 = nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1)
        self.bn5 = nn.BatchNorm2d(c)
        self.deconv3 = nn.ConvTranspose2d(c, 2 * c, 5, stride=1, padding=2)
        self.bn6 = nn.BatchNorm2d(2 * c)
        gain = nn.init.calculate_gain("leaky_relu")  # parity: official_code.md §4.3 — biases keep default init
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, 2C, H/2, W/2)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)  # (B, 4C, H/4, W/4)
        x = self.bn3(self.conv3(x))  # parity: official_code.md §4.3 — no ReLU after e3
        x = F.relu(self.bn4(self.deconv1(x)), inplace=True)  # (B, 2C, H/2, W/2)
        x = F.relu(self.bn5(self.deconv2(x)), inplace=True)  # (B, C, H, W)
        # parity: official_code.md §4.3 — the final ReLU makes R >= 0 although T is standardised
        return F.relu(self.bn6(self.deconv3(x)), inplace=True)  # (B, 2C, H, W)


def _bn(channels: int) -> nn.BatchNorm2d:
    # parity: official_code.md §4.4 — affine=False, eps=1e-4
    return nn.BatchNorm2d(channels, affine=False, eps=1e-4)


class ConvAutoEncoder(nn.Module):
    """Global image autoencoder (official ``ConvAutoEncoder``, EfficientAD-style without dropout), §4.4.

    The encoder needs a 256 × 256 input (enc6 is an 8 × 8 valid conv on 8 × 8); the decoder resizes to the fixed
    sizes 3, 8, 15, 31, 63 and finally to ``out_size`` (32 at 256 px: the size of the feature map).
    """

    sizes = (3, 8, 15, 31, 63)  # parity: official_code.md §4.4 decoder resize targets

    def __init__(self, out_channels: int = 384):
        super().__init__()
        self.enconv1 = nn.Conv2d(3, 32, 4, stride=2, padding=1)
        self.enconv2 = nn.Conv2d(32, 32, 4, stride=2, padding=1)
        self.enconv3 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        self.enconv4 = nn.Conv2d(64, 64, 4, stride=2, padding=1)
        self.enconv5 = nn.Conv2d(64, 64, 4, stride=2, padding=1)
        self.enconv6 = nn.Conv2d(64, 64, 8, stride=1, padding=0)
        for i, c in enumerate((32, 32, 64, 64, 64, 64), start=1):
            self.add_module(f"bn2d{i}", _bn(c))
        # the encoder's BNs are registered after all its convs (official key order): name the pairs for inference
        # BN folding (reconad.acceleration.fold_batchnorm)
        self.conv_bn_pairs = tuple((f"enconv{i}", f"bn2d{i}") for i in range(1, 7))
        for i in range(1, 6):
            self.add_module(f"deconv{i}", nn.Conv2d(64, 64, 4, stride=1, padding=2))
            self.add_module(f"bn2d{i + 6}", _bn(64))
        self.deconv7 = nn.Conv2d(64, 64, 3, stride=1, padding=1)
        self.bn2d12 = _bn(64)
        self.deconv8 = nn.Conv2d(64, out_channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor, out_size: tuple[int, int] = (32, 32)) -> Tensor:
        """(B, 3, 256, 256) normalised images → (B, C_out, *out_size)."""
        for i in range(1, 7):
            x = F.relu(getattr(self, f"bn2d{i}")(getattr(self, f"enconv{i}")(x)), inplace=True)  # → (B, 64, 1, 1)
        for i, size in enumerate(self.sizes, start=1):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = F.relu(getattr(self, f"bn2d{i + 6}")(getattr(self, f"deconv{i}")(x)), inplace=True)  # (B, 64, s+1, s+1)
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        x = F.relu(self.bn2d12(self.deconv7(x)), inplace=True)
        return self.deconv8(x)  # (B, C_out, *out_size)


def attention(query: Tensor, tokens: Tensor) -> Tensor:
    """``softmax(Q Kᵀ / √C) V`` with keys = values = ``tokens``; (B, N, C) each → (B, N, C). §4.5."""
    scores = query @ tokens.transpose(1, 2) / query.shape[-1] ** 0.5  # (B, N, N)
    return scores.softmax(dim=-1) @ tokens
