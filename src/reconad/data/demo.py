"""The built-in demo dataset: three small MVTec-layout categories made from images shipped with scikit-image.

Normal images are random views (position, small rotation, flips, brightness) of one source photograph per
category, so train and test normals share one distribution. Defective test images get one synthetic defect each,
with its exact mask in ``ground_truth/<defect>/<stem>_mask.png`` (0/255). A mask pixel is foreground where the
defect's blend weight (alpha) exceeds :data:`MASK_ALPHA_THRESHOLD`; every defect covers 1–8 % of the image and
changes the masked pixels visibly.

Categories (48 train, 16 good test and 8 per defect type, 128×128 PNG):

- ``tissue``: immunohistochemistry micrograph (RGB texture); ``scratch``, ``stain``, ``patch`` (coffee photo).
- ``lunar``: lunar surface (grayscale texture, stored as 8-bit gray PNG); ``scratch``, ``hole``, ``patch`` (coins).
- ``cup``: an espresso cup on its saucer (RGB object, aligned); ``scratch``, ``stain``, ``hole``.

Generation is deterministic (seeded ``numpy`` generators, no global RNG): two runs write byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from reconad.data.transforms import DataError

__all__ = ["DEMO_CATEGORIES", "DEMO_VERSION", "MASK_ALPHA_THRESHOLD", "default_demo_root", "ensure_demo_data"]

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v1"
DEMO_CATEGORIES: tuple[str, ...] = ("tissue", "lunar", "cup")
MASK_ALPHA_THRESHOLD = 0.25
"""A pixel belongs to a defect's mask where the defect's blend weight is above this."""

_SIZE = 128
_N_TRAIN, _N_TEST_GOOD, _N_PER_DEFECT = 48, 16, 8
_AREA_RANGE = (0.01, 0.08)  # defect mask area as a fraction of the image
_MIN_CHANGE = 0.1  # mean absolute change inside the mask, so that every defect is visible
_SEED = 20_240_607
_MARKER = "reconad_demo.json"


@dataclass(frozen=True)
class _Recipe:
    """How one category is made."""

    name: str
    source: np.ndarray  # (H, W, 3) float64 in [0, 1], already at working scale (1 source px ≈ 1 output px)
    center: tuple[float, float] | None  # (row, col) of an aligned object; None: anywhere (texture)
    jitter: float  # object only: max shift of the view centre, in px
    rotation: float  # max rotation, degrees
    flips: bool
    brightness: float  # max relative brightness change
    defects: tuple[str, ...]
    region: tuple[int, int]  # defect centres lie in [region[0], region[1]) along both axes
    gray: bool = False
    foreign: np.ndarray | None = None  # texture pasted by the ``patch`` defect


# ---------------------------------------------------------------------------------------------- sources


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """Downscale a uint8 image with anti-aliasing and return float64 RGB in [0, 1]."""
    pil = Image.fromarray(image).convert("RGB")
    size = (round(pil.width * scale), round(pil.height * scale))
    return np.asarray(pil.resize(size, Image.LANCZOS), dtype=np.float64) / 255.0


def _recipe_tissue() -> _Recipe:
    from skimage import data  # lazy: importing scikit-image is slow and only generation needs it

    return _Recipe(
        name="tissue",
        source=_scaled(data.immunohistochemistry(), 2 / 3),
        center=None,
        jitter=0.0,
        rotation=10.0,
        flips=True,
        brightness=0.05,
        defects=("scratch", "stain", "patch"),
        region=(18, 110),
        foreign=_scaled(data.coffee(), 0.5),
    )


def _recipe_lunar() -> _Recipe:
    from skimage import data

    return _Recipe(
        name="lunar",
        source=_scaled(data.moon(), 0.8),
        center=None,
        jitter=0.0,
        rotation=10.0,
        flips=True,
        brightness=0.05,
        defects=("scratch", "hole", "patch"),
        region=(18, 110),
        gray=True,
        foreign=_scaled(data.coins(), 0.8),
    )


def _recipe_cup() -> _Recipe:
    from skimage import data

    scale = _SIZE / 380  # the cup and its saucer fill a 380 px square of the 600×400 photo
    return _Recipe(
        name="cup",
        source=_scaled(data.coffee(), scale),
        center=(200 * scale, 272 * scale),
        jitter=4.0,
        rotation=3.0,
        flips=False,
        brightness=0.06,
        defects=("scratch", "stain", "hole"),
        region=(30, 98),
    )


_RECIPES: dict[str, Callable[[], _Recipe]] = {"tissue": _recipe_tissue, "lunar": _recipe_lunar, "cup": _recipe_cup}


# ---------------------------------------------------------------------------------------------- normal views


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (rows, cols) of the output image, relative to its centre."""
    coords = np.arange(_SIZE, dtype=np.float64) - (_SIZE - 1) / 2
    return np.meshgrid(coords, coords, indexing="ij")


def _view(source: np.ndarray, center: tuple[float, float], angle: float, flip_h: bool, flip_v: bool) -> np.ndarray:
    """Bilinear sample of a rotated, optionally flipped ``_SIZE`` square of ``source`` around ``center``."""
    rows, cols = _grid()
    if flip_h:
        cols = -cols
    if flip_v:
        rows = -rows
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    src_r = center[0] + sin * cols + cos * rows
    src_c = center[1] + cos * cols - sin * rows
    channels = [ndimage.map_coordinates(source[..., c], [src_r, src_c], order=1, mode="mirror") for c in range(3)]
    return np.stack(channels, axis=-1)


def _texture_center(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[float, float]:
    margin = _SIZE / 2 * np.sqrt(2) + 2  # a rotated view stays inside the source
    return rng.uniform(margin, shape[0] - margin), rng.uniform(margin, shape[1] - margin)


def _normal(recipe: _Recipe, rng: np.random.Generator) -> np.ndarray:
    """One normal image: a random view of the recipe's source with brightness jitter."""
    if recipe.center is None:
        center = _texture_center(rng, recipe.source.shape)
    else:
        center = (
            recipe.center[0] + rng.uniform(-recipe.jitter, recipe.jitter),
            recipe.center[1] + rng.uniform(-recipe.jitter, recipe.jitter),
        )
    angle = rng.uniform(-recipe.rotation, recipe.rotation)
    flip_h, flip_v = (rng.random() < 0.5, rng.random() < 0.5) if recipe.flips else (False, False)
    image = _view(recipe.source, center, angle, flip_h, flip_v)
    return np.clip(image * rng.uniform(1 - recipe.brightness, 1 + recipe.brightness), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- defects
# Each defect takes a normal image (H, W, 3) in [0, 1] and returns (defective image, blend alpha (H, W)).


def _defect_center(rng: np.random.Generator, recipe: _Recipe) -> np.ndarray:
    return rng.uniform(recipe.region[0], recipe.region[1], size=2)


def _blob(
    rng: np.random.Generator, center: np.ndarray, radius: float, aspect: float, roughness: float, edge: float
) -> np.ndarray:
    """Soft irregular blob in [0, 1]: an ellipse with a wavy outline and a smoothstep edge ``edge`` px wide."""
    rows, cols = _grid()
    rows, cols = rows + (_SIZE - 1) / 2 - center[0], cols + (_SIZE - 1) / 2 - center[1]
    theta0 = rng.uniform(0, np.pi)
    u = np.cos(theta0) * cols + np.sin(theta0) * rows
    v = -np.sin(theta0) * cols + np.cos(theta0) * rows
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    rho, theta = np.hypot(u / a, v / b), np.arctan2(v / b, u / a)
    outline = np.ones_like(theta)
    for k in (2, 3, 4):
        outline += rng.uniform(0, roughness) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    t = np.clip(0.5 + (outline - rho) * np.sqrt(a * b) / edge, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _scratch(image: np.ndarray, rng: np.random.Generator, recipe: _Recipe) -> tuple[np.ndarray, np.ndarray]:
    """A thin anti-aliased curved line (quadratic Bézier), bright or dark, tapering at both ends."""
    mid = _defect_center(rng, recipe)
    length, direction = rng.uniform(55, 95), rng.uniform(0, np.pi)
    half = length / 2 * np.array([np.sin(direction), np.cos(direction)])
    bend = rng.uniform(-0.35, 0.35) * length * np.array([np.cos(direction), -np.sin(direction)])
    p0, p1, p2 = mid - half, mid + bend, mid + half
    t = np.linspace(0.0, 1.0, 400)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = rng.uniform(1.5, 2.6) * (0.35 + 0.65 * np.sin(np.pi * t[:, 0]) ** 0.5)  # half-width along the curve
    rows, cols = np.meshgrid(np.arange(_SIZE), np.arange(_SIZE), indexing="ij")
    dist, nearest = cKDTree(curve).query(np.stack([rows.ravel(), cols.ravel()], axis=1))
    line = np.clip(width[nearest] + 0.5 - dist, 0.0, 1.0).reshape(_SIZE, _SIZE)  # 1-px anti-aliased edge
    alpha = rng.uniform(0.85, 1.0) * line
    value = rng.uniform(0.88, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.12)
    return image * (1 - alpha[..., None]) + value * alpha[..., None], alpha


def _stain(image: np.ndarray, rng: np.random.Generator, recipe: _Recipe) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-edged blob: a tinted liquid stain that darkens a light surface, or pale residue on a dark one."""
    blob = _blob(rng, _defect_center(rng, recipe), rng.uniform(8, 16), rng.uniform(1.0, 2.0), 0.5, rng.uniform(3, 6))
    alpha = rng.uniform(0.65, 0.9) * blob
    if (image.mean(axis=-1) * blob).sum() / blob.sum() > 0.45:
        tints = np.array([[0.45, 0.30, 0.15], [0.60, 0.35, 0.20], [0.20, 0.22, 0.45], [0.30, 0.45, 0.25]])
        tint = tints[rng.integers(len(tints))]
        return image * (1 - alpha[..., None] * (1 - tint)), alpha  # multiplicative: the texture shows through
    pale = rng.uniform(0.75, 0.9) * np.array([1.0, 0.95, 0.85])
    return image * (1 - alpha[..., None]) + pale * alpha[..., None], alpha


def _patch(image: np.ndarray, rng: np.random.Generator, recipe: _Recipe) -> tuple[np.ndarray, np.ndarray]:
    """A piece of a different texture pasted with a soft irregular outline (foreign material)."""
    assert recipe.foreign is not None, f"{recipe.name!r} has no foreign texture for patches"
    foreign = _view(recipe.foreign, _texture_center(rng, recipe.foreign.shape), rng.uniform(0, 360), False, False)
    alpha = _blob(
        rng, _defect_center(rng, recipe), rng.uniform(9, 16), rng.uniform(1.0, 1.6), 0.6, rng.uniform(1.5, 3.0)
    )
    return image * (1 - alpha[..., None]) + foreign * alpha[..., None], alpha


def _hole(image: np.ndarray, rng: np.random.Generator, recipe: _Recipe) -> tuple[np.ndarray, np.ndarray]:
    """A dark, nearly elliptical pit, shaded as if lit from one side."""
    center = _defect_center(rng, recipe)
    alpha = _blob(rng, center, rng.uniform(7, 13), rng.uniform(1.0, 1.8), 0.2, rng.uniform(1.2, 2.2))
    rows, cols = np.meshgrid(np.arange(_SIZE), np.arange(_SIZE), indexing="ij")
    light = rng.uniform(0, 2 * np.pi)
    ramp = ((rows - center[0]) * np.sin(light) + (cols - center[1]) * np.cos(light)) / 12.0
    inside = image * np.clip(rng.uniform(0.08, 0.18) + 0.12 * ramp, 0.02, 0.4)[..., None]
    return image * (1 - alpha[..., None]) + inside * alpha[..., None], alpha


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, _Recipe], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "patch": _patch,
    "hole": _hole,
}


def _defective(recipe: _Recipe, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normal view with one defect whose mask covers 1–8 % of the image and changes it visibly."""
    for _ in range(50):
        normal = _normal(recipe, rng)
        image, alpha = _DEFECTS[defect](normal, rng, recipe)
        image = _finish(np.clip(image, 0.0, 1.0), recipe.gray)
        mask = alpha > MASK_ALPHA_THRESHOLD
        change = np.abs(image.astype(np.float64) - _finish(normal, recipe.gray)) / 255.0
        if _AREA_RANGE[0] <= mask.mean() <= _AREA_RANGE[1] and change[mask].mean() >= _MIN_CHANGE:
            return image, mask
    raise RuntimeError(f"could not draw an acceptable {defect!r} defect for {recipe.name!r}")  # a bug, not data


# ---------------------------------------------------------------------------------------------- writing


def _finish(image: np.ndarray, gray: bool) -> np.ndarray:
    """Quantise to uint8 (gray categories: the channel mean, stored as one channel)."""
    if gray:
        image = image.mean(axis=-1)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _write_category(recipe: _Recipe, index: int, out: Path) -> dict[str, int]:
    """Write one category; returns image counts per folder."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([_SEED, index]).spawn(2 + len(recipe.defects))]
    cat = out / recipe.name
    for i in range(_N_TRAIN):
        _save(_finish(_normal(recipe, rngs[0]), recipe.gray), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(_N_TEST_GOOD):
        _save(_finish(_normal(recipe, rngs[1]), recipe.gray), cat / "test" / "good" / f"{i:03d}.png")
    for defect, rng in zip(recipe.defects, rngs[2:], strict=True):
        for i in range(_N_PER_DEFECT):
            image, mask = _defective(recipe, defect, rng)
            _save(image, cat / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    counts = {"train/good": _N_TRAIN, "test/good": _N_TEST_GOOD}
    counts.update({f"test/{d}": _N_PER_DEFECT for d in recipe.defects})
    return counts


def _generate(out: Path) -> None:
    """Write every category and, last, the marker that says the dataset is complete."""
    counts = {}
    for index, name in enumerate(DEMO_CATEGORIES):
        counts[name] = _write_category(_RECIPES[name](), index, out)
    marker = {"name": "reconad-demo", "version": DEMO_VERSION, "image_size": _SIZE, "counts": counts}
    (out / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- cache


def default_demo_root() -> Path:
    """``$RECONAD_CACHE/demo-v1``, or ``~/.cache/reconad/demo-v1`` when the variable is unset."""
    base = os.environ.get("RECONAD_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "reconad") / DEMO_VERSION


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("name") == "reconad-demo" else None


def _is_complete(root: Path) -> bool:
    marker = _read_marker(root)
    return (
        marker is not None
        and marker.get("version") == DEMO_VERSION
        and all((root / name / "train" / "good").is_dir() for name in DEMO_CATEGORIES)
    )


def _publish(tmp: Path, root: Path) -> None:
    """Move the finished dataset into place with renames only, so ``root`` is never half-written."""
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if not root.exists():
        try:
            os.replace(tmp, root)
        except OSError:
            if not _is_complete(root):  # another process won the race with a complete dataset: fine
                raise
        return
    old = tmp.with_name(tmp.name + "-old")
    os.replace(root, old)  # an outdated demo set (checked by the caller)
    os.replace(tmp, root)
    shutil.rmtree(old, ignore_errors=True)


def ensure_demo_data(root: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Return the demo dataset's root, generating it there first when it is not complete.

    Generation (a few seconds) happens in a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a dataset that looks complete.

    Args:
        root: Where the dataset lives; default ``$RECONAD_CACHE/demo-v1`` or ``~/.cache/reconad/demo-v1``.
        overwrite: Regenerate even when a complete dataset is there.

    Returns:
        The dataset root (MVTec layout, categories :data:`DEMO_CATEGORIES`).

    Raises:
        DataError: ``root`` exists, is not empty and is not a reconad demo dataset (it is never deleted).
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    if not overwrite and _is_complete(root):
        return root
    if root.exists() and _read_marker(root) is None and not (root.is_dir() and not any(root.iterdir())):
        raise DataError(
            f"{root} exists and is not a reconad demo dataset; refusing to overwrite it. "
            "Pick another folder for the demo data or remove this one."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    logger.info("Generating the demo dataset (%s) in %s", DEMO_VERSION, root)
    try:
        _generate(tmp)
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
