"""Training losses of the reverse-distillation family; each formula exists here once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .maps import cosine_distance_map


def global_cosine(target: Tensor, recon: Tensor) -> Tensor:
    """``mean_B[1 - cos(flatten(target), flatten(recon))]``: one cosine per sample over all C·H·W values.

    parity: official_code.md §1.5 — RD4AD's code flattens each sample (the paper's text says per pixel).
    """
    return (1.0 - F.cosine_similarity(target.flatten(1), recon.flatten(1), dim=1)).mean()


def regional_cosine(target: Tensor, recon: Tensor) -> Tensor:
    """``mean_{B,H,W}[1 - cos_c(target, recon)]``: the per-pixel loss of RD4AD's paper text (ReContrast Config A)."""
    return cosine_distance_map(target, recon).mean()


def summed_over_levels(loss_fn, pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ over levels of ``loss_fn(target, recon)`` with equal weights (levels are summed, not averaged)."""
    return sum(loss_fn(target, recon) for target, recon in pairs)


def mse_cosine_map(target: Tensor, recon: Tensor, weight: float) -> Tensor:
    """Per-pixel ``mean_c (x-y)^2 + weight·(1 - cos_c)`` as (B, 1, H, W) (ULSAD's distance)."""
    return (target - recon).pow(2).mean(1, keepdim=True) + weight * cosine_distance_map(target, recon)


def hard_mining_mask(target: Tensor, recon: Tensor, alpha: float) -> Tensor:
    """Pixels whose distance is at least ``mean + alpha·std`` of the batch (unbiased std): (B, 1, H, W) bool."""
    with torch.no_grad():
        distance = cosine_distance_map(target, recon)
        threshold = distance.mean() + alpha * distance.std()
        return distance >= threshold


def mask_gradient(recon: Tensor, keep: Tensor) -> Tensor:
    """Identity in the forward pass; in the backward pass zero the gradient where ``keep`` is False.

    parity: official_code.md §2.2 — the printed loss still covers every pixel, only gradients are masked (the
    official code does it with a gradient hook). The forward is a view of ``recon``, not
    ``recon·keep + (recon·(1−keep)).detach()``, which made four passes over every decoder output for the same
    values; the backward multiplies by ``keep`` as before, so gradients are bit-identical.
    """
    return _MaskGradient.apply(recon, keep)


class _MaskGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recon: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)  # (B, 1, H, W) bool: broadcasts over channels
        return recon.view_as(recon)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None
