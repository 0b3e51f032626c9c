"""BTAD (beanTech Anomaly Detection) as distributed, read in place::

    <root>/<category>/train/ok/*.bmp|png
    <root>/<category>/test/ok/*.bmp|png
    <root>/<category>/test/ko/*.bmp|png
    <root>/<category>/ground_truth/ko/<image stem>.png|bmp

``ok`` images are normal (defect ``"good"``), ``ko`` images anomalous (defect ``"ko"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reconad.config import DataConfig
from reconad.data.dataset import ImageDataset, SampleRecord, Views, anomalous_records, mask_policy, masks_in_use
from reconad.data.files import categories_with, list_images, require_dir
from reconad.data.layouts import Layout, register_layout, require_root, split_records
from reconad.data.transforms import DataError

__all__ = ["BTAD_LAYOUT", "BTADDataset", "list_btad_categories"]

_EXPECTED = ("<root>/<category>/train/ok/*, <root>/<category>/test/{ok,ko}/* and "
             "<root>/<category>/ground_truth/ko/<image stem>.png|bmp")


def list_btad_categories(root: Path) -> list[str]:
    """Sub-folders of ``root`` holding ``train/ok`` or ``test/ko``, sorted."""
    return categories_with(root, "train/ok", "test/ko")


def _images(folder: Path, what: str) -> list[Path]:
    paths = list_images(require_dir(folder, f"{what}; expected the BTAD layout: {_EXPECTED}"))
    if not paths:
        raise DataError(f"No images in {folder} ({what}). Expected the BTAD layout: {_EXPECTED}.")
    return paths


def _train_records(cat_dir: Path) -> list[SampleRecord]:
    return [SampleRecord(p, None, 0, "good") for p in _images(cat_dir / "train" / "ok", "training images")]


def _test_records(cat_dir: Path, policy: str) -> list[SampleRecord]:
    normal = [SampleRecord(p, None, 0, "good") for p in _images(cat_dir / "test" / "ok", "normal test images")]
    gt_dir = cat_dir / "ground_truth" / "ko" if masks_in_use(policy, cat_dir / "ground_truth", cat_dir) else None
    anomalous = anomalous_records(_images(cat_dir / "test" / "ko", "anomalous test images"), "ko", gt_dir,
                                  mask_name="{stem}.png")
    return anomalous + normal  # folder order, as MVTec: ko before ok


class BTADDataset(ImageDataset):
    """One BTAD category (``01``, ``02``, ``03``), read in place.

    Args:
        root: BTAD root.
        category: Category folder.
        split: ``"train"`` (``train/ok``) or ``"test"`` (``test/ko`` then ``test/ok``).
        cfg: Data settings.
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the sorted file list.
        seed: Base seed of ``views``.

    Raises:
        DataError: Missing root, category, folders or masks, no images, or an empty file.
    """

    def __init__(self, root: str | Path, category: str, split: str, cfg: DataConfig, views: Views | None = None,
                 indices: Sequence[int] | None = None, *, seed: int = 0) -> None:
        records = split_records(root, category, split, BTAD_LAYOUT, _train_records,
                                lambda cat_dir: _test_records(cat_dir, mask_policy(cfg)), indices)
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.category, self.split = Path(root).expanduser(), category, split


def _make_dataset(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None,
                  seed: int) -> BTADDataset:
    return BTADDataset(require_root(cfg.root, BTAD_LAYOUT), cfg.category, split, cfg, views, indices, seed=seed)


BTAD_LAYOUT = register_layout(Layout("btad", _EXPECTED, _make_dataset, list_btad_categories))
