"""The corruption generator of Bauer et al. (spec/bauer.md §3): one elastically deformed patch per image, blended
in with a soft shape mask, optional brightness change, occlusion by textured shapes and rotation.

Every value the paper leaves open is a :class:`CorruptionConfig` field with the spec's **[choice]** default. Pixel
sizes are given at ``reference_size`` (512) and scaled with the image side. Randomness comes from one
``numpy.random.Generator``; by default it is drawn from numpy's global state, which the data loader seeds per
sample (:func:`reconad.data.folder.seeded_rngs`), so views are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import Tensor

Augment = Literal["none", "dihedral", "rot90", "flips", "hflip"]


@dataclass
class CorruptionConfig:
    """Generator settings; pixel values are at ``reference_size`` and scale with the image side ([choice], §3)."""

    reference_size: int = 512
    patch_size: tuple[int, int] = (16, 96)
    """Patch height and width, each drawn independently from U[min, max] px."""
    patch_floor: int = 16
    """Smallest side kept when the area cap shrinks a patch."""
    area_cap: float | None = None
    """Largest patch area as a fraction of the image; ``None``: 2σ²/(1+2σ²) from the pixel variance (Thm. 2)."""
    elastic_smooth: tuple[float, float] = (4.0, 12.0)
    """Gaussian σ (px) smoothing the U(−1, 1) displacement field."""
    elastic_std: tuple[float, float] = (2.0, 8.0)
    """Displacement standard deviation (px) after rescaling."""
    ellipse_prob: float = 0.5
    """Shape mask: ellipse with this probability, else a random star-shaped polygon."""
    shape_extent: tuple[float, float] = (0.3, 0.5)
    """Ellipse semi-axes / polygon radii as fractions of the patch side."""
    polygon_vertices: tuple[int, int] = (5, 10)
    mask_blur: tuple[float, float] = (2.0, 4.0)
    """Gaussian σ (px) softening the shape mask."""
    brightness_prob: float = 0.3
    brightness_range: tuple[float, float] = (0.8, 1.2)
    occlusion_prob: float = 0.0
    """Probability of occlusion instead of elastic deformation (paper: cable, screw, transistor; spec: 0.5)."""
    occlusion_dir: str | None = None
    """Folder of texture images filling the occluding shapes (e.g. DTD); ``None``: smoothed colour noise."""
    occlusion_shapes: tuple[int, int] = (1, 4)
    rotation_prob: float = 0.0
    """Probability of rotating the corrupted image about its centre (paper: transistor; spec: 0.5)."""
    rotation_degrees: float = 20.0
    augment: Augment = "none"
    """Label-preserving augmentation of the clean image before corruption (spec §1 table, per category)."""


class Corruption(NamedTuple):
    image: Tensor  # (3, H, W) corrupted X̂
    mask: Tensor  # (1, H, W) soft mask M in [0, 1]
    box: tuple[int, int, int, int]  # (top, left, height, width) of the patch


def default_rng() -> np.random.Generator:
    """A generator drawn from numpy's global state (seeded per sample by the data loader)."""
    return np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))


def augment(image: Tensor, mode: Augment, rng: np.random.Generator) -> Tensor:
    """Random element of the chosen symmetry group applied to a (C, H, W) image."""
    if mode == "none":
        return image
    k = int(rng.integers(4)) if mode in ("dihedral", "rot90") else 0
    hflip = mode in ("dihedral", "flips", "hflip") and rng.random() < 0.5
    vflip = mode == "flips" and rng.random() < 0.5
    out = torch.rot90(image, k, dims=(-2, -1)) if k else image
    if hflip:
        out = out.flip(-1)
    if vflip:
        out = out.flip(-2)
    return out.contiguous()


def area_cap_fraction(pixel_var: float) -> float:
    """Largest corrupted fraction |S|/N allowed by |S| ≤ 2σ²|S̄| (paper Thm. 2)."""
    return 2.0 * pixel_var / (1.0 + 2.0 * pixel_var)


class CorruptionGenerator:
    """Callable ``(image (3, H, W) in [0, 1]) -> Corruption``; see the module docstring."""

    def __init__(self, cfg: CorruptionConfig | None = None):
        self.cfg = cfg or CorruptionConfig()

    @cached_property
    def textures(self) -> list[Path]:
        from .files import is_hidden
        from .transforms import IMAGE_EXTENSIONS, DataError

        if self.cfg.occlusion_dir is None:
            return []
        folder = Path(self.cfg.occlusion_dir).expanduser()
        found = sorted(folder.rglob("*")) if folder.is_dir() else []
        files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p)]
        if not files:
            raise DataError(f"occlusion_dir {folder} holds no images; point it at a texture folder (e.g. DTD) or "
                            "set it to null for smoothed colour noise.")
        return files

    def __call__(self, image: Tensor, rng: np.random.Generator | None = None,
                 pixel_var: float | None = None) -> Corruption:
        rng = rng if rng is not None else default_rng()
        x = image.permute(1, 2, 0).double().numpy()  # (H, W, 3)
        height, width = x.shape[:2]
        scale = min(height, width) / self.cfg.reference_size
        var = float(x.var()) if pixel_var is None else pixel_var
        top, left, h, w = self.patch_box(height, width, scale, var, rng)
        original = x[top:top + h, left:left + w]
        if rng.random() < self.cfg.occlusion_prob:
            replaced, shape = self.occluder(h, w, scale, rng), self.occlusion_mask(h, w, scale, rng)
        else:
            replaced, shape = self.elastic(original, scale, rng), self.shape_mask(h, w, scale, rng)
        if rng.random() < self.cfg.brightness_prob:
            replaced = np.clip(replaced * rng.uniform(*self.cfg.brightness_range), 0.0, 1.0)
        out, mask = x.copy(), np.zeros((height, width))
        out[top:top + h, left:left + w] = shape[..., None] * replaced + (1.0 - shape[..., None]) * original
        mask[top:top + h, left:left + w] = shape
        if rng.random() < self.cfg.rotation_prob:
            out, mask = self.rotate(out, x, mask, rng)
        return Corruption(torch.from_numpy(out).permute(2, 0, 1).float().contiguous(),
                          torch.from_numpy(mask)[None].float(), (top, left, h, w))

    # -- pieces ----------------------------------------------------------------------------------------------
    def patch_box(self, height: int, width: int, scale: float, pixel_var: float,
                  rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w): sides from U[min, max]·scale, area capped, fully inside the image."""
        lo, hi = (max(2, round(v * scale)) for v in self.cfg.patch_size)
        h, w = (int(rng.integers(lo, hi + 1)) for _ in range(2))
        cap = self.cfg.area_cap if self.cfg.area_cap is not None else area_cap_fraction(pixel_var)
        limit, floor = cap * height * width, max(2, round(self.cfg.patch_floor * scale))
        if h * w > limit:
            shrink = math.sqrt(limit / (h * w))
            h, w = max(floor, int(h * shrink)), max(floor, int(w * shrink))
        h, w = min(h, height), min(w, width)
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w

    def elastic(self, patch: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """"Gaussian distortion": smoothed U(−1, 1) displacements rescaled to a random std, bilinear, reflect."""
        h, w = patch.shape[:2]
        sigma = rng.uniform(*self.cfg.elastic_smooth) * scale
        std = rng.uniform(*self.cfg.elastic_std) * scale
        fields = []
        for _ in range(2):
            d = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (h, w)), sigma, mode="reflect")
            fields.append(d * (std / (d.std() + 1e-12)))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        coords = np.stack([yy + fields[0], xx + fields[1]])
        return np.stack([ndimage.map_coordinates(patch[..., c], coords, order=1, mode="reflect")
                         for c in range(patch.shape[2])], axis=-1)

    def _shape(self, h: int, w: int, rng: np.random.Generator, centre: tuple[float, float],
               extent: float = 1.0) -> np.ndarray:
        """A binary ellipse or star-shaped polygon (h, w) around ``centre``, sized relative to the patch."""
        cy, cx = centre
        if rng.random() < self.cfg.ellipse_prob:
            ay, ax = (rng.uniform(*self.cfg.shape_extent) * extent * s for s in (h, w))
            theta = rng.uniform(0, math.pi)
            yy, xx = np.mgrid[0:h, 0:w] + 0.5
            u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
            v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
            return ((u / max(ax, 0.5)) ** 2 + (v / max(ay, 0.5)) ** 2 <= 1.0).astype(np.float64)
        n = int(rng.integers(self.cfg.polygon_vertices[0], self.cfg.polygon_vertices[1] + 1))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(*self.cfg.shape_extent, n) * extent
        points = [(cx + r * w * math.cos(a), cy + r * h * math.sin(a)) for a, r in zip(angles, radii)]
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(points, fill=255)
        return np.asarray(canvas, dtype=np.float64) / 255.0

    def _soften(self, shape: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        # zero padding keeps the blurred mask inside the patch, so X̂ = X outside it
        soft = ndimage.gaussian_filter(shape, rng.uniform(*self.cfg.mask_blur) * scale, mode="constant")
        return np.clip(soft, 0.0, 1.0)

    def shape_mask(self, h: int, w: int, scale: float, rng: np.random.Generator) -> np.ndarray:
        """P₂: one soft shape centred in the patch."""
        return self._soften(self._shape(h, w, rng, (h / 2, w / 2)), scale, rng)

    def occlusion_mask(self, h: int, w: int, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Union of 1–4 smaller shapes at random places inside the patch, softened."""
        count = int(rng.integers(self.cfg.occlusion_shapes[0], self.cfg.occlusion_shapes[1] + 1))
        shapes = [self._shape(h, w, rng, (rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w), 0.6)
                  for _ in range(count)]
        return self._soften(np.maximum.reduce(shapes), scale, rng)

    def occluder(self, h: int, w: int, scale: float, rng: np.random.Generator) -> np.ndarray:
        """(h, w, 3) fill: a random crop of a random texture image, or smoothed colour noise without a folder."""
        if self.textures:
            from .transforms import load_image

            img = load_image(self.textures[int(rng.integers(len(self.textures)))])
            side = min(img.size)
            crop = int(rng.integers(max(1, side // 4), side + 1))
            x0, y0 = int(rng.integers(0, img.size[0] - crop + 1)), int(rng.integers(0, img.size[1] - crop + 1))
            tile = img.crop((x0, y0, x0 + crop, y0 + crop)).resize((w, h), Image.BILINEAR)
            return np.asarray(tile, dtype=np.float64) / 255.0
        noise = ndimage.gaussian_filter(rng.uniform(0, 1, (h, w, 3)), (2 * scale + 0.5, 2 * scale + 0.5, 0))
        lo, hi = noise.min(axis=(0, 1)), noise.max(axis=(0, 1))
        return (noise - lo) / np.maximum(hi - lo, 1e-12)

    def rotate(self, corrupted: np.ndarray, clean: np.ndarray, mask: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rotate X̂ about its centre (input only); M also covers every pixel the rotation changed (> 1/255)."""
        angle = rng.uniform(-self.cfg.rotation_degrees, self.cfg.rotation_degrees)
        rotated = np.clip(ndimage.rotate(corrupted, angle, axes=(0, 1), reshape=False, order=1, mode="nearest"),
                          0.0, 1.0)
        changed = (np.abs(rotated - clean).mean(axis=2) > 1.0 / 255.0).astype(np.float64)
        return rotated, np.maximum(mask, changed)
