"""Distribution-shifted test sets (official_code.md §5.5) and the evaluation of one model on all of them.

The corruptions are the ImageNet-C definitions as the ``imagecorruptions`` 1.1.2 package (used by ADShift's
``generate_corrupted_mvtec.py``) implements them, re-written here because that package no longer imports with
current setuptools (it needs ``pkg_resources``). Each takes and returns an (H, W, 3) ``uint8`` array; float results
are truncated to ``uint8`` as the package does.

A shifted copy of an MVTec-layout dataset is ``<output>/<corruption>/<category>/test/<defect>/*.png`` (every
defect folder and ``good``, corrupted) with ``train/`` and ``ground_truth/`` linked to the original (masks reused).
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .files import list_images, list_subdirs
from .transforms import DataError, load_image

__all__ = [
    "CORRUPTIONS",
    "brightness",
    "contrast",
    "corrupt",
    "default_shift_root",
    "defocus_blur",
    "disk_kernel",
    "gaussian_noise",
    "resolve_shifts",
    "shift_table",
    "write_shifted_dataset",
]

logger = logging.getLogger(__name__)

# parity: official_code.md §5.5 — imagecorruptions 1.1.2 constants, severities 1..5
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))


def _check(image: np.ndarray, severity: int) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity}")
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(x, 0, 1) * 255)  # truncation, as imagecorruptions' np.uint8(...)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``clip(x/255 + N(0, c²)) · 255`` with c = 0.08, 0.12, 0.18, 0.26, 0.38 for severity 1..5."""
    x = _check(image, severity)
    rng = rng if rng is not None else np.random.default_rng()
    return _to_uint8(x + rng.normal(size=x.shape, scale=GAUSSIAN_NOISE[severity - 1]))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``(x - μ)·c + μ`` with μ the per-channel image mean, c = 0.4, 0.3, 0.2, 0.1, 0.05."""
    x = _check(image, severity)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * CONTRAST[severity - 1] + means)


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """HSV value channel ``V + c`` (clipped), c = 0.1 … 0.5, via scikit-image's rgb2hsv/hsv2rgb."""
    from skimage.color import hsv2rgb, rgb2hsv

    x = rgb2hsv(_check(image, severity))
    x[:, :, 2] = np.clip(x[:, :, 2] + BRIGHTNESS[severity - 1], 0, 1)
    return _to_uint8(hsv2rgb(x))


def disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """imagecorruptions' anti-aliased disk: a normalised binary disk (float32) smoothed by ``cv2.GaussianBlur``."""
    import cv2

    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    disk /= np.sum(disk)
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-channel ``cv2.filter2D`` (reflect-101 borders) with :func:`disk_kernel` (radius 3, 4, 6, 8, 10)."""
    import cv2

    x = _check(image, severity)
    kernel = disk_kernel(*DEFOCUS[severity - 1])
    channels = np.stack([cv2.filter2D(x[:, :, c], -1, kernel) for c in range(3)], axis=2)
    return _to_uint8(channels)


CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "brightness": brightness, "contrast": contrast, "defocus_blur": defocus_blur, "gaussian_noise": gaussian_noise,
}


def corrupt(image: np.ndarray, name: str, severity: int = 3, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply corruption ``name`` (one of :data:`CORRUPTIONS`) at ``severity`` to an (H, W, 3) uint8 image."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](image, severity, rng)


# ------------------------------------------------------------------------------------------------- writing
def default_shift_root(root: str | Path, severity: int = 3) -> Path:
    """Where ``reconad prepare shift`` writes by default: ``<root>_shift_s<severity>`` beside the dataset."""
    root = Path(root).expanduser()
    return root.parent / f"{root.name}_shift_s{severity}"


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), target, target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): copy instead
        shutil.copytree(source, target)


def _file_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator per (seed, corruption, file), so reruns and partial reruns write identical images."""
    return np.random.default_rng([seed, zlib.crc32("/".join(parts).encode())])


def _test_images(category_dir: Path) -> list[Path]:
    test = category_dir / "test"
    if not test.is_dir():
        raise DataError(f"missing test folder {test} (expected the MVTec layout <root>/<category>/test/<defect>/)")
    return [path for defect in list_subdirs(test) for path in list_images(defect)]


def write_shifted_dataset(root: str | Path, corruptions: Sequence[str], severity: int = 3,
                          output: str | Path | None = None, categories: Sequence[str] | None = None,
                          seed: int = 0) -> dict[str, Path]:
    """Write corrupted copies of the test images of an MVTec-layout dataset, one dataset root per corruption.

    Args:
        root: Dataset root (``<root>/<category>/{train,test,ground_truth}``).
        corruptions: Names from :data:`CORRUPTIONS`.
        severity: ImageNet-C severity 1..5 (GNL: 3).
        output: Folder of the shifted roots; default :func:`default_shift_root`.
        categories: Categories to process; default every category of ``root``.
        seed: Seed of the random corruptions (gaussian_noise), combined with each file's path.

    Returns:
        Corruption name → the root of its shifted dataset (same categories, same layout).
    """
    from .layouts import list_categories

    root = Path(root).expanduser()
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(CORRUPTIONS)}")
    output = Path(output).expanduser() if output is not None else default_shift_root(root, severity)
    categories = list(categories) if categories else list_categories(root)
    roots = {}
    for name in corruptions:
        for category in categories:
            _write_category(root / category, output / name / category, name, severity, seed)
        roots[name] = output / name
        logger.info("shift %s (severity %d) written to %s", name, severity, roots[name])
    return roots


def _write_category(source: Path, target: Path, name: str, severity: int, seed: int) -> None:
    for sub in ("train", "ground_truth"):  # masks (and the training images) are reused as they are
        if (source / sub).is_dir():
            _link_or_copy(source / sub, target / sub)
    for path in _test_images(source):
        rel = path.relative_to(source)
        out = (target / rel).with_suffix(".png")
        if out.exists():
            continue
        image = np.asarray(load_image(path), dtype=np.uint8)
        rng = _file_rng(seed, name, source.name, rel.as_posix())
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(corrupt(image, name, severity, rng)).save(out)


# ---------------------------------------------------------------------------------------------- evaluation
def shift_table(per_run: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "image_auroc"
                ) -> list[dict[str, Any]]:
    """Rows ``{"run": name, clean: v, shift1: v, …}`` for one metric (the GNL paper's layout), plus a mean row."""
    rows = [{"run": name, **{col: m.get(metric, float("nan")) for col, m in cols.items()}}
            for name, cols in per_run.items()]
    if len(rows) > 1:
        columns = [c for c in rows[0] if c != "run"]
        rows.append({"run": "mean", **{c: float(np.nanmean([r.get(c, np.nan) for r in rows])) for c in columns}})
    return rows


def resolve_shifts(names: Sequence[str], shift_root: str | Path | None) -> dict[str, Path]:
    """Shift arguments → column name → root: ``NAME=PATH``; an existing folder (named after it); otherwise
    ``<shift_root>/<name>`` (as ``reconad prepare shift`` writes them)."""
    resolved = {}
    for name in names:
        if "=" in name:
            name, value = name.split("=", 1)
            resolved[name] = Path(value).expanduser()
            if not resolved[name].is_dir():
                raise DataError(f"shifted dataset {resolved[name]} (shift {name!r}) not found")
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            resolved[path.name] = path
            continue
        if shift_root is None:
            raise DataError(f"shift {name!r} is not a folder and no shift root was given")
        path = Path(shift_root).expanduser() / name
        if not path.is_dir():
            raise DataError(f"shifted dataset {path} not found; write it with `reconad prepare shift`")
        resolved[name] = path
    return resolved
