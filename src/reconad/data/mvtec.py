"""The MVTec AD layout (also MVTec AD 2-style and many derived sets)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png            ("good" = normal)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

A category without ``ground_truth/`` is an image-level dataset under ``data.masks: auto`` (the default).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from reconad.config import DataConfig
from reconad.data.dataset import ImageDataset, SampleRecord, Views, anomalous_records, mask_policy, masks_in_use
from reconad.data.files import categories_with, list_images, list_subdirs, require_dir
from reconad.data.layouts import Layout, register_layout, require_root, split_records
from reconad.data.transforms import IMAGE_EXTENSIONS, DataError

__all__ = ["MVTEC_LAYOUT", "MVTecDataset", "list_mvtec_categories"]

logger = logging.getLogger(__name__)

_EXPECTED = (
    "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png and "
    "<root>/<category>/ground_truth/<defect>/<name>_mask.png"
)


def list_mvtec_categories(root: Path) -> list[str]:
    """Sub-folders of ``root`` that hold ``train/`` or ``test/``, sorted."""
    return categories_with(root, "train", "test")


def _train_records(cat_dir: Path) -> list[SampleRecord]:
    good = require_dir(cat_dir / "train" / "good", f"the training folder; expected the MVTec AD layout: {_EXPECTED}")
    paths = list_images(good)
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"No training images in {good} (looked for {exts}). Put the normal images there.")
    return [SampleRecord(p, None, 0, "good") for p in paths]


def _test_records(cat_dir: Path, policy: str, require_masks: bool | None) -> list[SampleRecord]:
    test = require_dir(cat_dir / "test", f"the test folder; expected the MVTec AD layout: {_EXPECTED}")
    uses_masks = masks_in_use(policy, cat_dir / "ground_truth", cat_dir)
    records = []
    for defect_dir in list_subdirs(test):
        defect, paths = defect_dir.name, list_images(defect_dir)
        if defect == "good":
            records += [SampleRecord(p, None, 0, defect) for p in paths]
        else:
            gt_dir = cat_dir / "ground_truth" / defect if uses_masks else None
            records += anomalous_records(paths, defect, gt_dir, strict=require_masks is not False)
    if not records:
        raise DataError(f"No test images in {test}/<defect>/. Expected the MVTec AD layout: {_EXPECTED}.")
    return records


class MVTecDataset(ImageDataset):
    """One category of a dataset in the MVTec AD layout.

    ``root/category/train/good/*`` (train) and ``root/category/test/<defect>/*`` with masks in
    ``root/category/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``); ``good`` test images get empty
    masks. Files are sorted by defect folder, then by name.

    Args:
        root: Dataset root.
        category: Category folder under ``root``.
        split: ``"train"`` (normal images only) or ``"test"``.
        cfg: Data settings (size, crop, resize backend, mask threshold, ``masks``).
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the sorted file list (in this order).
        require_masks: ``False`` accepts anomalous images without a mask (``has_masks`` is then ``False`` unless
            every one has a mask); ``None`` (default) follows ``cfg.masks``.
        seed: Base seed of ``views``.

    Raises:
        DataError: Missing root, category or folders, no images, a missing mask, or an empty file.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: Literal["train", "test"],
        cfg: DataConfig,
        views: Views | None = None,
        indices: Sequence[int] | None = None,
        *,
        require_masks: bool | None = None,
        seed: int = 0,
    ) -> None:
        records = split_records(root, category, split, MVTEC_LAYOUT, _train_records,
                                lambda cat_dir: _test_records(cat_dir, mask_policy(cfg), require_masks), indices)
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.category, self.split = Path(root).expanduser(), category, split


def _make_dataset(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None,
                  seed: int) -> MVTecDataset:
    require_root(cfg.root, MVTEC_LAYOUT)
    return MVTecDataset(cfg.root, cfg.category, split, cfg, views, indices, seed=seed)


MVTEC_LAYOUT = register_layout(Layout("mvtec", _EXPECTED, _make_dataset, list_mvtec_categories))
