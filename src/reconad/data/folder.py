"""The folder layout: plain folders named by ``data.train_dir``, ``normal_dir``, ``anomalous_dir`` and ``mask_dir``.

Folders are relative to ``data.root`` (or absolute); masks are optional. The classes and helpers that used to live
here (``ImageDataset``, ``SampleRecord``, ``seeded_rngs``, ``build_datasets``...) are re-exported for importers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from reconad.config import DataConfig
from reconad.data.dataset import ImageDataset, SampleRecord, Views, mask_policy, seeded_rngs
from reconad.data.files import (
    check_nonempty,
    find_mask,
    list_images,
    mask_index,
    require_dir,
    resolve,
    select,
    unique_stems,
)
from reconad.data.layouts import Layout, build_datasets, list_categories, register_layout
from reconad.data.transforms import IMAGE_EXTENSIONS, DataError

__all__ = [
    "FOLDER_LAYOUT",
    "DataError",
    "FolderDataset",
    "ImageDataset",
    "SampleRecord",
    "Views",
    "build_datasets",
    "list_categories",
    "seeded_rngs",
]

_EXPECTED = "data.train_dir, data.normal_dir, data.anomalous_dir and optionally data.mask_dir (relative to data.root)"


def _folder(root: str | Path | None, sub: str | None, field: str) -> Path:
    if sub is None:
        raise DataError(f"The folder layout needs data.{field} (a folder, relative to data.root or absolute).")
    folder = resolve(root, sub)
    if not folder.exists():
        raise DataError(f"data.{field} folder not found: {folder}.")
    return require_dir(folder, f"data.{field}")


def _folder_images(folder: Path, field: str) -> list[Path]:
    paths = list_images(folder)
    if not paths:
        raise DataError(f"No images in {folder} (data.{field}); looked for {', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return paths


class FolderDataset(ImageDataset):
    """An image-level dataset in plain folders, named by ``cfg.train_dir/normal_dir/anomalous_dir/mask_dir``.

    Folders are relative to ``root`` (or absolute). Training uses ``train_dir`` (normal images); testing uses
    ``normal_dir`` (label 0, defect "good") and ``anomalous_dir`` (label 1, defect = that folder's name).
    Masks are optional: with ``mask_dir``, each anomalous image needs ``<stem>_mask.<ext>`` or ``<stem>.<ext>``
    there; without it masks are all zero and ``has_masks`` is ``False``, so the engine skips pixel metrics.

    Args:
        root: Base of relative folders (``None``: folders are used as given).
        split: ``"train"`` or ``"test"``.
        cfg: Data settings, including the folders.
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the sorted file list.
        seed: Base seed of ``views``.

    Raises:
        DataError: A folder is unset, missing or holds no images, a mask is missing, or a file is empty.
    """

    def __init__(
        self,
        root: str | Path | None,
        split: Literal["train", "test"],
        cfg: DataConfig,
        views: Views | None = None,
        indices: Sequence[int] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if split == "train":
            folder = _folder(root, cfg.train_dir, "train_dir")
            records = [SampleRecord(p, None, 0, "good") for p in _folder_images(folder, "train_dir")]
        elif split == "test":
            records = self._test_records(root, cfg)
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        records = select(records, indices)
        check_nonempty([p for r in records for p in (r.path, r.mask) if p is not None])
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.split = root, split

    @staticmethod
    def _test_records(root: str | Path | None, cfg: DataConfig) -> list[SampleRecord]:
        normal = _folder(root, cfg.normal_dir, "normal_dir")
        anomalous = _folder(root, cfg.anomalous_dir, "anomalous_dir")
        mask_dir = _mask_dir(root, cfg)
        masks = mask_index(mask_dir) if mask_dir is not None else {}
        records = [SampleRecord(p, None, 0, "good") for p in _folder_images(normal, "normal_dir")]
        paths = _folder_images(anomalous, "anomalous_dir")
        if mask_dir is not None:
            unique_stems(paths, "masks are matched to images by name, so this is ambiguous")
        for path in paths:
            mask = None
            if mask_dir is not None:
                mask = find_mask(masks, path.stem)
                if mask is None:
                    raise DataError(
                        f"No mask for {path} in {mask_dir}: expected {path.stem}_mask.png or {path.stem}.png. "
                        "Add it, or unset data.mask_dir (or set data.masks: none) for image-level evaluation."
                    )
            records.append(SampleRecord(path, mask, 1, anomalous.name))
        return records


def _mask_dir(root: str | Path | None, cfg: DataConfig) -> Path | None:
    """The mask folder, if masks are used (``data.masks: none`` ignores ``data.mask_dir``)."""
    policy = mask_policy(cfg)
    if policy == "none":
        return None
    if cfg.mask_dir is None:
        if policy == "required":
            raise DataError("data.masks is 'required' but data.mask_dir is not set; set it to the mask folder.")
        return None
    return _folder(root, cfg.mask_dir, "mask_dir")


def _make_dataset(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None,
                  seed: int) -> FolderDataset:
    return FolderDataset(cfg.root, split, cfg, views, indices, seed=seed)


FOLDER_LAYOUT = register_layout(Layout("folder", _EXPECTED, _make_dataset, lambda root: [], multi_category=False))
