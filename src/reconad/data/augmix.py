"""GNL's training views (official_code.md §5.1): the ADShift AugMix view and the grayscale view.

Both views are returned in the backbone's *normalised* input space, because the official code mixes the chains
after ``ToTensor + Normalize`` and takes the grayscale of the normalised tensor; returning them normalised makes
the method's loss see exactly the official tensors (no round trip through [0, 1]).

Random draws follow the official order, so a given ``random``/``numpy.random`` state gives the same view:
severity (Python ``random``), chain weights (Dirichlet) and mix weight (Beta), then per chain its depth and per
op the op choice followed by the op's level (``numpy.random``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

__all__ = [
    "MVTEC_OPS",
    "OP_LISTS",
    "PACS_OPS",
    "AugMixPlan",
    "apply_plan",
    "augmix_view",
    "draw_plan",
    "gray_view",
    "op_parameter",
    "to_pil",
]

Normalize = Callable[[Tensor], Tensor]

# parity: official_code.md §5.1 — op lists and their order (the order fixes which op an RNG draw picks)
MVTEC_OPS = ("autocontrast", "equalize", "posterize", "solarize", "color", "sharpness")
PACS_OPS = ("autocontrast", "equalize", "posterize", "solarize", "color", "contrast", "brightness", "sharpness")
OP_LISTS = {"mvtec": MVTEC_OPS, "pacs": PACS_OPS}
LEVELLESS_OPS = ("autocontrast", "equalize")
ENHANCERS = {"color": ImageEnhance.Color, "sharpness": ImageEnhance.Sharpness, "contrast": ImageEnhance.Contrast,
             "brightness": ImageEnhance.Brightness}
# torchvision Grayscale on tensors (ITU-R 601-2 luma as torchvision rounds it)
LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugMixPlan:
    """Every random choice of one AugMix view."""

    severity: int
    weights: np.ndarray  # (width,) float32, Dirichlet(1, …, 1)
    mix: np.float32  # Beta(alpha, alpha)
    chains: tuple[tuple[tuple[str, float | None], ...], ...]
    """Per chain, the ops in order with their sampled level (``None`` for ops without a level)."""


def _sample_level(severity: int, zero_severity: str) -> float:
    if severity == 0 and zero_severity == "identity":
        return 0.0
    # parity: official_code.md §5.1 — U(0.1, s); for s = 0 numpy accepts low > high and returns (0, 0.1]
    return float(np.random.uniform(low=0.1, high=severity))


def draw_plan(ops: Sequence[str], severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0,
              reuse_depth: bool = True, zero_severity: Literal["official", "identity"] = "official") -> AugMixPlan:
    """Draw one view's random choices from Python ``random`` and ``numpy.random``, in the official order.

    Args:
        ops: Op names, e.g. :data:`MVTEC_OPS`.
        severity: Largest severity; the view's severity is ``random.randint(0, severity)``.
        width: Number of chains.
        depth: Ops per chain; ``<= 0`` draws it uniformly from 1..3.
        alpha: Dirichlet and Beta concentration.
        reuse_depth: Official quirk: the depth drawn for the first chain is reused by the others.
        zero_severity: ``official``: a severity-0 view samples levels from numpy's U(0.1, 0), i.e. (0, 0.1];
            ``identity``: a severity-0 view leaves the image unchanged.

    Returns:
        The plan.
    """
    # parity: official_code.md §5.1 — python RNG for the severity, numpy for everything else
    drawn_severity = random.randint(0, severity)
    weights = np.float32(np.random.dirichlet([alpha] * width))
    mix = np.float32(np.random.beta(alpha, alpha))
    chains = []
    for _ in range(width):
        # parity: official_code.md §5.1 (quirk 1) — `depth` is overwritten by chain 1's draw and reused
        chain_depth = depth if depth > 0 else int(np.random.randint(1, 4))
        if reuse_depth:
            depth = chain_depth
        chain = []
        for _ in range(chain_depth):
            op = ops[int(np.random.choice(len(ops)))]
            level = None if op in LEVELLESS_OPS else _sample_level(drawn_severity, zero_severity)
            chain.append((op, level))
        chains.append(tuple(chain))
    return AugMixPlan(drawn_severity, weights, mix, tuple(chains))


def op_parameter(op: str, level: float) -> float | int:
    """The PIL parameter of an op at ``level``: posterize bits, solarize threshold, or enhance factor."""
    if op == "posterize":
        return 4 - int(level * 4 / 10)
    if op == "solarize":
        return 256 - int(level * 256 / 10)
    return float(level) * 1.8 / 10.0 + 0.1


def _apply_op(img: Image.Image, op: str, level: float | None, identity: bool) -> Image.Image:
    if identity:
        return img
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "posterize":
        return ImageOps.posterize(img, op_parameter(op, level))
    if op == "solarize":
        return ImageOps.solarize(img, op_parameter(op, level))
    return ENHANCERS[op](img).enhance(op_parameter(op, level))


def to_pil(image01: Tensor) -> Image.Image:
    """(3, H, W) float image in [0, 1] → 8-bit RGB PIL image (exact for images that came from 8-bit files)."""
    arr = (image01.detach().cpu().float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def _to_tensor(img: Image.Image) -> Tensor:
    """torchvision ``ToTensor`` for 8-bit RGB: (3, H, W) float32 / 255."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)


def apply_plan(image01: Tensor, plan: AugMixPlan, normalize: Normalize,
               zero_severity: Literal["official", "identity"] = "official") -> Tensor:
    """The mixed view ``(1 - m)·N(x) + m·Σ_i w_i·N(chain_i(x))`` in normalised space, (3, H, W)."""
    pil = to_pil(image01)
    identity = plan.severity == 0 and zero_severity == "identity"
    clean = normalize(_to_tensor(pil).unsqueeze(0))[0]
    mix = torch.zeros_like(clean)
    for weight, chain in zip(plan.weights, plan.chains):
        aug = pil.copy()
        for op, level in chain:
            aug = _apply_op(aug, op, level, identity)
        # parity: official_code.md §5.1 — chains are mixed after ToTensor + Normalize
        mix += float(weight) * normalize(_to_tensor(aug).unsqueeze(0))[0]
    mixed = (1 - plan.mix) * clean + plan.mix * mix
    return mixed.float()


def augmix_view(image01: Tensor, normalize: Normalize, ops: Sequence[str] = MVTEC_OPS, severity: int = 3,
                width: int = 3, depth: int = -1, alpha: float = 1.0, reuse_depth: bool = True,
                zero_severity: Literal["official", "identity"] = "official") -> Tensor:
    """ADShift's ``augmvtec``/``augpacs`` on one [0, 1] image; returns the normalised view (3, H, W).

    Args:
        image01: (3, H, W) image in [0, 1].
        normalize: The backbone's normalisation of (B, 3, H, W) [0, 1] images.
        ops, severity, width, depth, alpha, reuse_depth, zero_severity: see :func:`draw_plan`.

    Returns:
        The mixed view in normalised space.
    """
    plan = draw_plan(ops, severity, width, depth, alpha, reuse_depth, zero_severity)
    return apply_plan(image01, plan, normalize, zero_severity)


def gray_view(image01: Tensor, normalize: Normalize, after_normalize: bool = True) -> Tensor:
    """The grayscale view in normalised space, (3, H, W).

    Args:
        image01: (3, H, W) image in [0, 1].
        normalize: The backbone's normalisation.
        after_normalize: Official quirk: the luma of the already-normalised channels. ``False``: normalise the
            luma of the [0, 1] image (the clean order).
    """
    def luma(x: Tensor) -> Tensor:
        r, g, b = x.unbind(dim=-3)
        return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3).expand(x.shape).contiguous()

    if after_normalize:
        # parity: official_code.md §5.1 — ToTensor → Normalize → Grayscale(3)
        return luma(normalize(image01.unsqueeze(0))[0])
    return normalize(luma(image01).unsqueeze(0))[0]
