"""Building datasets: ``build_datasets`` (train, holdout, test) and ``list_categories`` for any registered layout,
and the helpers layouts share (root and category checks). The registry itself is :mod:`reconad.data.registry`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reconad.data.dataset import ImageDataset, SampleRecord
from reconad.data.errors import DataError
from reconad.data.files import check_nonempty, select
from reconad.data.registry import (
    BUILTIN_LAYOUT_MODULES,
    Layout,
    check_layout_name,
    get_layout,
    list_layouts,
    register_layout,
)

if TYPE_CHECKING:
    from reconad.config import DataConfig
    from reconad.data.dataset import Views

__all__ = [
    "BUILTIN_LAYOUT_MODULES",
    "Layout",
    "build_datasets",
    "category_dir",
    "check_layout_name",
    "get_layout",
    "list_categories",
    "list_layouts",
    "register_layout",
    "require_root",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers for layouts


def require_root(root: str | Path | None, layout: Layout) -> Path:
    """``root`` as an existing folder, or a DataError quoting the layout."""
    if root is None:
        raise DataError(f"data.root is not set. Expected the {layout.name} layout: {layout.expected}.")
    path = Path(root).expanduser()
    if path.is_file():
        raise DataError(f"Dataset root {path} is a file; set data.root to the dataset folder ({layout.expected}).")
    if not path.is_dir():
        raise DataError(f"Dataset root not found: {path}. Expected the {layout.name} layout: {layout.expected}.")
    return path


def category_dir(root: str | Path | None, category: str | None, layout: Layout) -> Path:
    """``root/category`` as an existing folder; the error lists the categories found."""
    base = require_root(root, layout)
    folder = base / category if category else None
    if folder is None or not folder.is_dir():
        found = ", ".join(layout.list_categories(base)) or "none"
        if not category:
            raise DataError(f"data.category is not set. Categories found in {base}: {found}.")
        raise DataError(f"Category {category!r} not found in {base}. Categories found: {found}.")
    return folder


def split_records(root: str | Path, category: str, split: str, layout: Layout,
                  train: Callable[[Path], list[SampleRecord]], test: Callable[[Path], list[SampleRecord]],
                  indices: Sequence[int] | None) -> list[SampleRecord]:
    """The records of one split of ``root/category`` (``train`` / ``test`` read the category folder), restricted
    to ``indices``, every file checked non-empty: what every category-folder layout (MVTec, BTAD) does the same."""
    cat_dir = category_dir(root, category, layout)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    records = select(train(cat_dir) if split == "train" else test(cat_dir), indices)
    check_nonempty([p for r in records for p in (r.path, r.mask) if p is not None])
    return records


def list_categories(root: str | Path, layout: str = "mvtec") -> list[str]:
    """The categories of the dataset at ``root`` in ``layout``, sorted.

    Raises:
        DataError: ``root`` does not exist, or the layout is unknown.
    """
    chosen = get_layout(layout)
    return chosen.list_categories(require_root(root, chosen))


# ------------------------------------------------------------------------------------------------- building


def _holdout_split(n: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """Deterministic (train, holdout) index lists, each sorted; at least one image held out."""
    import numpy as np

    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.holdout_fraction must be in [0, 1), got {fraction}.")
    n_hold = max(1, int(round(fraction * n)))
    if n_hold >= n:
        raise DataError(
            f"data.holdout_fraction={fraction} holds out {n_hold} of the {n} training images in {where}, leaving "
            "none to train on. Lower the fraction or add images."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_hold:]), sorted(int(i) for i in perm[:n_hold])


def _multi_category(layout: Layout, cfg: DataConfig, split: str, views: Views | None,
                    indices: Sequence[int] | None, seed: int) -> ImageDataset:
    """One dataset over several categories (records concatenated in ``cfg.categories`` order)."""
    if cfg.category is not None:
        raise DataError(f"Set either data.category ({cfg.category!r}) or data.categories, not both.")
    if not layout.multi_category:
        raise DataError(f"data.categories is not supported by the {layout.name} layout; set data.category.")
    parts = [layout.make_dataset(dataclasses.replace(cfg, category=c, categories=None), split, None, None, seed)
             for c in cfg.categories]
    records = select([r for part in parts for r in part.records], indices)
    dataset = ImageDataset(records, cfg, views, seed=seed, has_masks=all(p.has_masks for p in parts))
    dataset.root, dataset.categories, dataset.split = Path(cfg.root).expanduser(), list(cfg.categories), split
    return dataset


def _make(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None, seed: int) -> ImageDataset:
    layout = get_layout(cfg.layout)
    if cfg.categories:
        return _multi_category(layout, cfg, split, views, indices, seed)
    return layout.make_dataset(cfg, split, views, indices, seed)


def build_datasets(
    cfg: DataConfig, views: Views | None = None, *, seed: int = 0
) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """Build the (train, holdout, test) datasets that ``cfg`` describes.

    With ``cfg.holdout_fraction > 0``, that fraction of the training images (at least one, chosen with
    ``cfg.holdout_seed``) is kept out of training as held-out normal images for calibration; it never sees test
    data and gets no ``views``.

    Args:
        cfg: Data settings.
        views: Extra training views for the train set only.
        seed: Base seed of ``views``.

    Returns:
        ``(train, holdout or None, test)``.

    Raises:
        DataError: Anything wrong with the folders or settings; the message names the path.
    """
    full = _make(cfg, "train", None, None, seed)
    holdout = None
    train_idx = None
    if cfg.holdout_fraction != 0:
        where = str(getattr(full, "root", cfg.root))
        train_idx, hold_idx = _holdout_split(len(full), cfg.holdout_fraction, cfg.holdout_seed, where)
        holdout = _make(cfg, "train", None, hold_idx, seed)
    train = _make(cfg, "train", views, train_idx, seed)
    test = _make(cfg, "test", None, None, seed)
    logger.info("Data: %d train, %d holdout, %d test images.", len(train), len(holdout or ()), len(test))
    return train, holdout, test
