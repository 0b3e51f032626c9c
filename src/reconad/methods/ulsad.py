"""ULSAD: unified local-global anomaly detection (Patra & Ben Taieb, 2024), as in its official code (§4).

A frozen backbone gives standardised aggregated features T; a feature reconstruction network (FRN) reconstructs
T ("local") and, in its second half, the output A of a global image autoencoder ("global"). The anomaly map
averages the two quantile-normalised, blurred distance maps.

Unlike the official code, the map quantiles are fitted on held-out *training* normals (``calibrate``); the
official test-set behaviour is only available as :func:`official_test_calibration`, labelled as test-set
selection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import mse_cosine_map
from ..maps import MapsConfig, fuse, gaussian_blur, image_score, upsample
from ..nets.ulsad import ConvAutoEncoder, FeatAE, aggregate_features, attention
from ..registry import register_method
from .base import Method, MethodConfig, OfficialLayout, Prediction, SizeRule, describe_taps, is_int

log = logging.getLogger(__name__)

QUANTILE_LIMIT = 2**24
"""torch.quantile's input limit; the official code subsamples at random above it (§4.7)."""


def _ulsad_maps() -> MapsConfig:
    # parity: official_code.md §4.7 — bilinear align_corners=False, σ 4, anomalib GaussianBlur2d (kornia kernel,
    # torch "reflect" border), max score
    return MapsConfig(align_corners=False, fuse="mean", sigma=4.0, truncate=4.0, padding="reflect", score="max")


@dataclass
class ULSADConfig(MethodConfig):
    """ULSAD settings; the defaults reproduce the official code (official_code.md §4)."""

    maps: MapsConfig = field(default_factory=_ulsad_maps)
    feature_dim: int | None = None
    """Channels of T after channel pooling; the FRN and AE widths follow it. ``None`` derives it from the backbone
    as the official code's ratio does: ``Σ channels of the aggregated taps // feature_pool`` (WRN50-2 layer2 +
    layer3: 1536 // 4 = 384, the official value; EfficientNet-Lite0 blocks.2 + blocks.4: (40 + 112) // 4 = 38).
    An int fixes the width whatever the backbone (a 384-wide FRN on taps of a few dozen channels is ~6× slower
    per step and no better)."""
    feature_pool: int = 4
    """Channels averaged into one by the derived width (official: 1536 → 384, i.e. 4)."""
    n_levels: int = 2
    """Aggregate the last ``n_levels`` backbone taps (official: layer2 + layer3 of WRN50-2)."""
    lambda_local: float = 0.5
    """Cosine weight of the local loss ``mse + λ·(1 - cos)``."""
    lambda_attention: float = 0.5
    """Cosine weight of the attention loss (official: read from the config key ``lambdadir_g``)."""
    lambda_global: float = 0.5
    """Cosine weight of the global-local loss."""
    map_cosine_weight: float = 0.5
    """Cosine weight of both inference maps."""
    quantiles: tuple[float, float] = (0.9, 0.995)
    """(q_a, q_b) fitted per branch by ``calibrate``; maps become ``0.1·(m - q_a)/(q_b - q_a)``."""
    quantile_scale: float = 0.1
    branch_weights: tuple[float, float] = (0.5, 0.5)
    """(local, global) weights of the combined map."""
    ae_input_size: int = 256
    """The global AE's encoder needs 256 px (enc6 is an 8×8 valid conv); other inputs are resized to it."""
    norm_eps: float = 1e-11
    """Added to the ImageNet std when normalising images (official in-model normaliser)."""


@register_method
class ULSAD(Method):
    """Frozen backbone → standardised features T → FRN (local + global halves) and a global image AE."""

    name = "ulsad"
    Config = ULSADConfig
    default_backbone = "wide_resnet50_2.racm"
    official_layout = OfficialLayout(
        renames=(
            ("model.pretrain.encoder.feature_extractor.", "backbone."),
            ("model.featae.", "frn."),
            ("model.img_encoder.", "global_ae."),
            # the official ParameterDicts map onto our fitted buffers (full keys used as prefixes)
            ("model.mean_std.mean", "feat_mean_"),
            ("model.mean_std.std", "feat_std_"),
            ("model.quantiles.qa_local", "qa_local_"),
            ("model.quantiles.qb_local", "qb_local_"),
            ("model.quantiles.qa_global", "qa_global_"),
            ("model.quantiles.qb_global", "qb_global_"),
        ),
        # parity: official_code.md §4.7 — the blur kernel is a constant rebuilt from σ, not a learned tensor
        unused=("model.blur.",),
    )

    @classmethod
    def input_size_rule(cls, cfg: ULSADConfig, feature_info: Sequence[Any]) -> SizeRule:
        s = feature_info[-cfg.n_levels].stride
        return SizeRule(s, 4, f"ULSAD's feature reconstruction network halves the stride-{s} features twice and "
                              "upsamples them back")

    @classmethod
    def config_problems(cls, run_cfg: Any, cfg: ULSADConfig, feature_info: Sequence[Any]) -> list[str]:
        levels = cfg.n_levels
        if not is_int(levels) or not 1 <= levels <= len(feature_info):
            return [f"--model.n_levels {levels!r} must be between 1 and the number of taps ({len(feature_info)}: "
                    f"{describe_taps(feature_info)}); set --backbone.taps, e.g. [stride8, stride16] "
                    "(official: layer2, layer3)"]
        problems, channels = [], sum(t.channels for t in feature_info[-levels:])
        if not is_int(cfg.feature_pool) or cfg.feature_pool < 1:
            problems.append(f"--model.feature_pool must be an integer >= 1, got {cfg.feature_pool!r}")
        dim = cfg.feature_dim
        if dim is not None and (not is_int(dim) or not 1 <= dim <= channels):
            derived = max(1, channels // cfg.feature_pool) if is_int(cfg.feature_pool) else "?"
            problems.append(f"--model.feature_dim {dim!r} does not fit the {channels} channels of the aggregated "
                            f"taps ({describe_taps(feature_info[-levels:])}): channel pooling cannot make more "
                            f"channels than it averages; set --model.feature_dim null to derive it from the backbone "
                            f"({derived}) or a value in 1..{channels}")
        if is_int(run_cfg.data.batch_size) and run_cfg.data.batch_size == 1:
            problems.append("--data.batch_size must be >= 2 for ulsad: its global autoencoder's BatchNorm works on "
                            "a 1x1 code and cannot train on one image")
        return problems

    def __init__(self, cfg: ULSADConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        if len(backbone.feature_info) < cfg.n_levels:
            raise ValueError(f"ULSAD aggregates the last {cfg.n_levels} taps but the backbone has "
                             f"{len(backbone.feature_info)}; set --backbone.taps (official: layer2 layer3)")
        self.feature_dim = c = derived_feature_dim(backbone, cfg)
        self.frn = FeatAE(c)
        self.global_ae = ConvAutoEncoder(c)
        self.register_buffer("feat_mean_", torch.zeros(1, c, 1, 1))
        self.register_buffer("feat_std_", torch.ones(1, c, 1, 1))
        for name in ("qa_local_", "qb_local_", "qa_global_", "qb_global_"):
            self.register_buffer(name, torch.zeros(()))
        self.fitted_on: dict[str, list[str]] = {}
        """Paths of the images each fitted statistic came from (``"features"``, ``"quantiles"``); not saved."""

    # -- features ----------------------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """ImageNet normalisation inside the model, as the official code: ``(x - mean) / (std + eps)``."""
        mean = torch.as_tensor(self.backbone.input_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.backbone.input_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / (std + self.cfg.norm_eps)  # parity: official_code.md §4.1 (std + 1e-11)

    def aggregated(self, normalized: Tensor) -> Tensor:
        """Aggregated, not yet standardised backbone features (B, C, h, w), §4.2."""
        taps = self.backbone(normalized)[-self.cfg.n_levels:]
        return aggregate_features(taps, self.feature_dim)

    def features(self, normalized: Tensor) -> Tensor:
        """T: aggregated features standardised per channel (no ε, §4.2). No gradient flows into it."""
        with torch.no_grad():
            return (self.aggregated(normalized) - self.feat_mean_) / self.feat_std_

    def global_features(self, normalized: Tensor, size: tuple[int, int]) -> Tensor:
        """A: the global AE's output at the feature size (B, C, h, w), §4.4."""
        s = self.cfg.ae_input_size
        if tuple(normalized.shape[-2:]) != (s, s):
            normalized = F.interpolate(normalized, size=(s, s), mode="bilinear", align_corners=False)
        return self.global_ae(normalized, out_size=size)

    def branches(self, images: Tensor, features: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(T, R, A) for [0, 1] images; R has 2C channels: ``R[:, :C]`` local, ``R[:, C:]`` global.

        ``features``: T of these images from the feature cache (else computed)."""
        x = self.normalize(images)
        t = self.features(x) if features is None else features  # (B, C, h, w)
        return t, self.frn(t), self.global_features(x, tuple(t.shape[-2:]))

    # -- fitted statistics -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, loader: Iterable[dict[str, Any]]) -> None:
        """Per-channel mean / population std of the aggregated features over all training pixels (float64)."""
        device = self.feat_mean_.device
        total = sq = None
        count, paths = 0, []
        for batch in loader:
            feats = self.aggregated(self.normalize(batch["image"].to(device))).double()  # (B, C, h, w)
            s, s2 = feats.sum(dim=(0, 2, 3)), feats.pow(2).sum(dim=(0, 2, 3))
            total, sq = (s, s2) if total is None else (total + s, sq + s2)
            count += feats.numel() // feats.shape[1]
            paths += list(batch.get("path", []))
        if total is None:
            raise ValueError("ULSAD.prepare got an empty loader")
        mean = total / count
        std = (sq / count - mean.pow(2)).sqrt()  # parity: official_code.md §4.2 — sqrt(E[x²] - E[x]²), no ε
        self.feat_mean_.copy_(mean.view_as(self.feat_mean_))
        self.feat_std_.copy_(std.view_as(self.feat_std_))
        self.fitted_on["features"] = paths

    @torch.no_grad()
    def calibrate(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit the (q_a, q_b) quantiles of each branch's map on held-out normal images (never test data)."""
        was_training = self.training
        self.eval()
        for name in ("qa_local_", "qb_local_", "qa_global_", "qb_global_"):
            getattr(self, name).zero_()  # unset: maps are taken unnormalised, as the official code does
        local, glob, paths = [], [], []
        try:
            for batch in loader:
                images = batch["image"].to(self.feat_mean_.device)
                m_local, m_global = self.branch_maps(images)  # upsampled and blurred (§4.7)
                local.append(m_local.flatten())
                glob.append(m_global.flatten())
                paths += list(batch.get("path", []))
        finally:
            self.train(was_training)
        if not local:
            raise ValueError("ULSAD.calibrate got an empty loader")
        for branch, values in (("local", torch.cat(local)), ("global", torch.cat(glob))):
            qa, qb = _quantiles(values, self.cfg.quantiles)
            getattr(self, f"qa_{branch}_").fill_(qa)
            getattr(self, f"qb_{branch}_").fill_(qb)
        self.fitted_on["quantiles"] = paths
        log.info("ULSAD quantiles from %d images: local (%.4g, %.4g), global (%.4g, %.4g)", len(paths),
                 self.qa_local_, self.qb_local_, self.qa_global_, self.qb_global_)

    @property
    def calibrated(self) -> bool:
        """Whether map quantiles are set (the official code skips the normalisation while they are zero)."""
        return bool(self.qb_local_ != self.qa_local_) or bool(self.qb_global_ != self.qa_global_)

    # -- training ----------------------------------------------------------------------------------------------
    def frozen_features(self, batch: dict[str, Any]) -> dict[str, list[Tensor]]:
        # T depends on the frozen extractor and the statistics fitted by prepare() (before training) only
        return {"cached_features": [self.features(self.normalize(batch["image"]))]}

    def loss(self, batch: dict[str, Any], progress: float) -> dict[str, Tensor]:
        c, cfg = self.feature_dim, self.cfg
        if self.training and batch["image"].shape[0] < 2:
            # the AE's enc6 output is 1 × 1, so its train-mode BatchNorm needs at least 2 images
            raise ValueError("ULSAD cannot train on a batch of 1 image (BatchNorm over the global AE's 1×1 code); "
                             "set --data.drop_last true or a batch size that leaves no single-image last batch")
        cached = batch["cached_features"][0] if "cached_features" in batch else None
        t, r, a = self.branches(batch["image"], cached)
        local = mse_cosine_map(t, r[:, :c], cfg.lambda_local).mean()
        attn = attention_loss(t, a, cfg.lambda_attention)
        global_local = mse_cosine_map(a, r[:, c:], cfg.lambda_global).mean()
        total = local + attn + global_local  # parity: official_code.md §4.5 — unweighted sum
        return {"loss": total, "local": local.detach(), "attention": attn.detach(),
                "global_local": global_local.detach()}

    # -- inference ---------------------------------------------------------------------------------------------
    def pairs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(T, R_local) and (A, R_global); their distance is ULSAD's ``mse + 0.5·(1 - cos)``, see :meth:`forward`."""
        c = self.feature_dim
        t, r, a = self.branches(images)
        return [(t, r[:, :c]), (a, r[:, c:])]

    def branch_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Local and global maps (B, 1, H, W): distance, upsampling, quantile normalisation (once fitted), blur."""
        size, cfg = tuple(images.shape[-2:]), self.cfg
        out = []
        for branch, (target, recon) in zip(("local", "global"), self.pairs(images)):
            m = upsample(mse_cosine_map(target, recon, cfg.map_cosine_weight), size, cfg.maps.align_corners)
            if self.calibrated:
                qa, qb = getattr(self, f"qa_{branch}_"), getattr(self, f"qb_{branch}_")
                m = cfg.quantile_scale * (m - qa) / (qb - qa)  # parity: official_code.md §4.7 (before the blur)
            out.append(self._blur(m))
        return out[0], out[1]

    def forward(self, images: Tensor) -> Prediction:
        local, glob = self.branch_maps(images)
        combined = fuse([local, glob], weights=self.cfg.branch_weights)  # (B, 1, H, W)
        return Prediction(combined, image_score(combined, self.cfg.maps.score, self.cfg.maps.topk))

    def _blur(self, maps: Tensor) -> Tensor:
        m = self.cfg.maps
        return gaussian_blur(maps, m.sigma, m.truncate, m.padding)


def derived_feature_dim(backbone: nn.Module, cfg: ULSADConfig) -> int:
    """``cfg.feature_dim``, or when ``None`` the official pooling ratio applied to the aggregated taps (≥ 1)."""
    if cfg.feature_dim is not None:
        if cfg.feature_dim < 1:
            raise ValueError(f"model.feature_dim must be a positive number of channels, got {cfg.feature_dim}")
        return int(cfg.feature_dim)
    if cfg.feature_pool < 1:
        raise ValueError(f"model.feature_pool must be >= 1, got {cfg.feature_pool}")
    total = sum(t.channels for t in backbone.feature_info[-cfg.n_levels:])
    return max(1, total // cfg.feature_pool)


def attention_loss(t: Tensor, a: Tensor, weight: float) -> Tensor:
    """``mean dist_λ(selfattn(T), crossattn(query A; keys, values T))`` over pixels, §4.5.

    T is constant; the gradient reaches A only through the query.
    """
    tokens = t.detach().flatten(2).transpose(1, 2)  # (B, N, C)
    with torch.no_grad():
        target = attention(tokens, tokens)
    cross = attention(a.flatten(2).transpose(1, 2), tokens)  # (B, N, C)
    as_map = lambda x: x.transpose(1, 2).unsqueeze(-1)  # noqa: E731  (B, C, N, 1) for the channel-wise distance
    return mse_cosine_map(as_map(target), as_map(cross), weight).mean()


def _quantiles(values: Tensor, qs: tuple[float, float]) -> tuple[float, float]:
    if values.numel() > QUANTILE_LIMIT:
        # parity: official_code.md §4.7 — a random 2^24 subset (seeded here, for reproducibility)
        g = torch.Generator(device="cpu").manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=g)[:QUANTILE_LIMIT].to(values.device)]
    q = torch.quantile(values.float(), torch.tensor(qs, dtype=torch.float32, device=values.device))
    return float(q[0]), float(q[1])


def official_test_calibration(method: ULSAD, test_set: Any, batch_size: int = 32) -> None:
    """PARITY ONLY — TEST-SET SELECTION: fit the quantiles on the *good test images*, as the official code does.

    parity: official_code.md §4.7 — the official ``val_split_mode: same_as_test`` makes the validation set the
    test set, so its quantiles see test data. Results obtained this way are optimistic and must be labelled so.
    """
    from torch.utils.data import DataLoader, Subset

    good = [i for i, label in enumerate(test_set.labels) if label == 0]
    method.calibrate(DataLoader(Subset(test_set, good), batch_size=batch_size))
    method.fitted_on["quantiles_source"] = ["test-set good images (official parity; test-set selection)"]
