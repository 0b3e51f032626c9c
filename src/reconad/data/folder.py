"""Datasets on disk: the MVTec AD layout and a generic folder layout, both giving the same sample dicts.

A sample is ``{"image": (3, H, W) float in [0, 1], "mask": (1, H, W) float in {0, 1}, "label": 0|1,
"path": str, "defect": str}`` ("good" and an all-zero mask for normal images). ``torch``'s ``default_collate``
batches these dicts as they are. Datasets only read; nothing is written to disk.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from reconad.config import DataConfig
from reconad.data.transforms import IMAGE_EXTENSIONS, DataError, load_image, load_mask, resize_image

__all__ = [
    "DataError",
    "FolderDataset",
    "ImageDataset",
    "MVTecDataset",
    "SampleRecord",
    "Views",
    "build_datasets",
    "list_categories",
]

logger = logging.getLogger(__name__)

Views = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
"""Makes extra training inputs (noisy/augmented views) from a sample's [0, 1] image."""

_MVTEC_LAYOUT = (
    "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png and "
    "<root>/<category>/ground_truth/<defect>/<name>_mask.png"
)


@dataclass(frozen=True)
class SampleRecord:
    """One image of a dataset, before loading."""

    path: Path
    mask: Path | None
    """Ground-truth mask file; ``None`` means an all-zero mask."""
    label: int
    """0 normal, 1 anomalous."""
    defect: str
    """``"good"`` for normal images."""


class ImageDataset(Dataset):
    """Loads :class:`SampleRecord` s into sample dicts, resized as ``cfg`` says.

    Args:
        records: The images, in dataset order.
        cfg: Size, crop, resize backend and mask threshold.
        views: Optional callable run on each sample's [0, 1] image; its entries are added to the sample dict
            (an entry named like a base key replaces it). It runs with Python ``random``, ``numpy.random`` and
            torch's CPU RNG seeded from ``(seed, epoch, index)``, and the previous RNG states are restored.
        seed: Base seed of ``views``; the engine sets it (attribute ``seed``) and calls ``set_epoch``.
        has_masks: Whether every anomalous image has a ground-truth mask (pixel metrics are meaningful).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        cfg: DataConfig,
        views: Views | None = None,
        *,
        seed: int = 0,
        has_masks: bool | None = None,
    ) -> None:
        if cfg.crop_size is not None and cfg.crop_size > cfg.image_size:
            raise ValueError(f"data.crop_size ({cfg.crop_size}) must not exceed data.image_size ({cfg.image_size}).")
        self.records: list[SampleRecord] = list(records)
        self.image_size = cfg.image_size
        self.crop_size = cfg.crop_size
        self.resize = cfg.resize
        self.mask_threshold = cfg.mask_threshold
        self.views = views
        self.seed = seed
        self.epoch = 0
        anomalous = [r for r in self.records if r.label == 1]
        self.has_masks: bool = bool(anomalous) and all(r.mask is not None for r in anomalous)
        if has_masks is not None:
            self.has_masks = has_masks

    @property
    def labels(self) -> list[int]:
        """Image labels in dataset order (no image is loaded)."""
        return [r.label for r in self.records]

    @property
    def out_size(self) -> int:
        """Side of the returned images and masks."""
        return self.crop_size if self.crop_size is not None else self.image_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds ``views`` (call before each epoch for fresh, reproducible views)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.records))[index]  # IndexError when out of range; negative indices count from the end
        rec = self.records[index]
        pil = load_image(rec.path)
        image = resize_image(pil, self.image_size, self.resize, self.crop_size)  # (3, S, S)
        if rec.mask is None:
            mask = torch.zeros(1, self.out_size, self.out_size)
        else:
            mask = load_mask(
                rec.mask,
                self.image_size,
                self.mask_threshold,
                crop_size=self.crop_size,
                image_size=pil.size,
                image_path=rec.path,
            )  # (1, S, S)
        sample = {"image": image, "mask": mask, "label": rec.label, "path": str(rec.path), "defect": rec.defect}
        if self.views is not None:
            with seeded_rngs(self.seed, self.epoch, index):
                sample.update(self.views(image.clone()))  # a clone: views may work in place
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {sum(self.labels)} anomalous, has_masks={self.has_masks})"


@contextmanager
def seeded_rngs(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Seed Python ``random``, ``numpy.random`` and torch's CPU RNG from ``(seed, epoch, index)``; restore after.

    Only torch's CPU generator is touched (``torch.manual_seed`` would also reseed CUDA generators, which this
    context could not restore).
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be non-negative, got {(seed, epoch, index)}.")
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(4, dtype=np.uint32)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))
    torch.default_generator.manual_seed((int(words[2]) << 32) | int(words[3]))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


# ---------------------------------------------------------------------------------------------- file listing


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (deterministic on every OS)."""
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _check_nonempty(paths: Sequence[Path]) -> None:
    """Cheap validation at construction: every file exists and is not empty (full decoding happens on load)."""
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as err:
            raise DataError(f"Cannot access {path}: {err}. Check the file and its permissions.") from err
        if size == 0:
            raise DataError(f"Empty file: {path}. Re-download or re-export it, or delete it from the dataset.")


def _mask_index(folder: Path) -> dict[str, Path]:
    """Stem → mask file for the images in ``folder`` (``.png`` wins when a stem has several files)."""
    if not folder.is_dir():
        return {}
    index: dict[str, Path] = {}
    for path in _list_images(folder):
        if path.stem not in index or path.suffix.lower() == ".png":
            index[path.stem] = path
    return index


def _find_mask(index: Mapping[str, Path], stem: str) -> Path | None:
    """The mask of image ``stem``: ``<stem>_mask.*`` (MVTec) or else ``<stem>.*`` (prepared VisA-style sets)."""
    return index.get(f"{stem}_mask") or index.get(stem)


def _resolve(root: str | Path | None, sub: str | Path) -> Path:
    sub = Path(sub).expanduser()
    if sub.is_absolute() or root is None:
        return sub
    return Path(root).expanduser() / sub


def _select(records: list[SampleRecord], indices: Sequence[int] | None) -> list[SampleRecord]:
    if indices is None:
        return records
    return [records[int(i)] for i in indices]


# ---------------------------------------------------------------------------------------------- MVTec layout


def list_categories(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` that look like MVTec categories (they hold ``train/`` or ``test/``), sorted.

    Raises:
        DataError: ``root`` does not exist.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. Expected the MVTec AD layout: {_MVTEC_LAYOUT}.")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def _category_dir(root: str | Path, category: str) -> Path:
    categories = list_categories(root)
    folder = Path(root).expanduser() / category
    if not folder.is_dir():
        found = ", ".join(categories) if categories else "none"
        raise DataError(f"Category {category!r} not found in {Path(root).expanduser()}. Categories found: {found}.")
    return folder


def _mvtec_train_records(cat_dir: Path) -> list[SampleRecord]:
    good = cat_dir / "train" / "good"
    if not good.is_dir():
        raise DataError(f"Missing training folder {good}. Expected the MVTec AD layout: {_MVTEC_LAYOUT}.")
    paths = _list_images(good)
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"No training images in {good} (looked for {exts}). Put the normal images there.")
    return [SampleRecord(p, None, 0, "good") for p in paths]


def _mvtec_test_records(cat_dir: Path, require_masks: bool) -> list[SampleRecord]:
    test = cat_dir / "test"
    if not test.is_dir():
        raise DataError(f"Missing test folder {test}. Expected the MVTec AD layout: {_MVTEC_LAYOUT}.")
    records = []
    for defect_dir in sorted((p for p in test.iterdir() if p.is_dir()), key=lambda p: p.name):
        defect = defect_dir.name
        gt_dir = cat_dir / "ground_truth" / defect
        masks = _mask_index(gt_dir) if defect != "good" else {}
        for path in _list_images(defect_dir):
            records.append(_mvtec_test_record(gt_dir, masks, defect, path, require_masks))
    if not records:
        raise DataError(f"No test images in {test}/<defect>/. Expected the MVTec AD layout: {_MVTEC_LAYOUT}.")
    return records


def _mvtec_test_record(
    gt_dir: Path, masks: Mapping[str, Path], defect: str, path: Path, require_masks: bool
) -> SampleRecord:
    if defect == "good":
        return SampleRecord(path, None, 0, defect)
    mask = _find_mask(masks, path.stem)
    if mask is None and require_masks:
        raise DataError(
            f"No ground-truth mask for {path}: expected {gt_dir / (path.stem + '_mask.png')}. Add the mask, or "
            "pass require_masks=False for an image-level dataset."
        )
    return SampleRecord(path, mask, 1, defect)


class MVTecDataset(ImageDataset):
    """One category of a dataset in the MVTec AD layout.

    ``root/category/train/good/*`` (train) and ``root/category/test/<defect>/*`` with masks in
    ``root/category/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``); ``good`` test images get empty
    masks. Files are sorted by defect folder, then by name.

    Args:
        root: Dataset root.
        category: Category folder under ``root``.
        split: ``"train"`` (normal images only) or ``"test"``.
        cfg: Data settings (size, crop, resize backend, mask threshold).
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the sorted file list (in this order).
        require_masks: Raise when an anomalous test image has no mask (``False`` for image-level datasets).
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
        require_masks: bool = True,
        seed: int = 0,
    ) -> None:
        cat_dir = _category_dir(root, category)
        if split == "train":
            records = _mvtec_train_records(cat_dir)
        elif split == "test":
            records = _mvtec_test_records(cat_dir, require_masks)
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        records = _select(records, indices)
        _check_nonempty([p for r in records for p in (r.path, r.mask) if p is not None])
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.category, self.split = Path(root).expanduser(), category, split


# --------------------------------------------------------------------------------------------- folder layout


def _folder(root: str | Path | None, sub: str | None, field: str) -> Path:
    if sub is None:
        raise DataError(f"The folder layout needs data.{field} (a folder, relative to data.root or absolute).")
    folder = _resolve(root, sub)
    if not folder.is_dir():
        raise DataError(f"data.{field} folder not found: {folder}.")
    return folder


def _folder_images(folder: Path, field: str) -> list[Path]:
    paths = _list_images(folder)
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
        records = _select(records, indices)
        _check_nonempty([p for r in records for p in (r.path, r.mask) if p is not None])
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.split = root, split

    @staticmethod
    def _test_records(root: str | Path | None, cfg: DataConfig) -> list[SampleRecord]:
        normal = _folder(root, cfg.normal_dir, "normal_dir")
        anomalous = _folder(root, cfg.anomalous_dir, "anomalous_dir")
        mask_dir = _folder(root, cfg.mask_dir, "mask_dir") if cfg.mask_dir is not None else None
        masks = _mask_index(mask_dir) if mask_dir is not None else {}
        records = [SampleRecord(p, None, 0, "good") for p in _folder_images(normal, "normal_dir")]
        for path in _folder_images(anomalous, "anomalous_dir"):
            mask = None
            if mask_dir is not None:
                mask = _find_mask(masks, path.stem)
                if mask is None:
                    raise DataError(
                        f"No mask for {path} in {mask_dir}: expected {path.stem}_mask.png or {path.stem}.png. "
                        "Add it, or unset data.mask_dir for image-level evaluation."
                    )
            records.append(SampleRecord(path, mask, 1, anomalous.name))
        return records


# ------------------------------------------------------------------------------------------------- building


def _holdout_split(n: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """Deterministic (train, holdout) index lists, each sorted; at least one image held out."""
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


def _multi_category(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None,
                    seed: int) -> ImageDataset:
    """One dataset over several MVTec-layout categories (records concatenated in ``cfg.categories`` order)."""
    if cfg.category is not None:
        raise DataError(f"Set either data.category ({cfg.category!r}) or data.categories, not both.")
    parts = [MVTecDataset(cfg.root, c, split, cfg, seed=seed) for c in cfg.categories]
    records = _select([r for part in parts for r in part.records], indices)
    dataset = ImageDataset(records, cfg, views, seed=seed)
    dataset.root, dataset.categories, dataset.split = Path(cfg.root).expanduser(), list(cfg.categories), split
    return dataset


def _make(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None, seed: int) -> ImageDataset:
    if cfg.layout == "mvtec":
        if cfg.root is None:
            raise DataError(f"data.root is not set. Expected the MVTec AD layout: {_MVTEC_LAYOUT}.")
        if cfg.categories:
            return _multi_category(cfg, split, views, indices, seed)
        if cfg.category is None:
            found = ", ".join(list_categories(cfg.root)) or "none"
            raise DataError(f"data.category is not set. Categories found in {cfg.root}: {found}.")
        return MVTecDataset(cfg.root, cfg.category, split, cfg, views, indices, seed=seed)
    if cfg.layout == "folder":
        return FolderDataset(cfg.root, split, cfg, views, indices, seed=seed)
    if cfg.layout == "loco":
        from reconad.data.loco import make_loco_dataset  # lazily: loco.py builds on this module

        return make_loco_dataset(cfg, split, views, indices, seed)
    raise DataError(f"Unknown data.layout {cfg.layout!r}; use 'mvtec', 'folder' or 'loco'.")


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
