"""The dataset every layout returns: :class:`SampleRecord` s loaded into sample dicts.

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

import numpy as np
import torch
from torch.utils.data import Dataset

from reconad.config import DataConfig
from reconad.data.files import find_mask, mask_index, unique_stems
from reconad.data.transforms import DataError, load_image, load_mask, mask_has_positive, resize_image

__all__ = ["MASK_POLICIES", "ImageDataset", "SampleRecord", "Views", "anomalous_records", "check_masks_mark_something",
           "mask_policy", "masks_in_use", "seeded_rngs"]

logger = logging.getLogger(__name__)

Views = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
"""Makes extra training inputs (noisy/augmented views) from a sample's [0, 1] image."""


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


MASK_POLICIES = ("auto", "required", "none")
"""``data.masks``: ``auto`` reads masks where the dataset has them and evaluates image-level metrics only where it
has none at all; ``required`` makes every anomalous test image need a mask; ``none`` ignores masks."""


def mask_policy(cfg: DataConfig) -> str:
    """``cfg.masks``, checked against :data:`MASK_POLICIES`."""
    policy = getattr(cfg, "masks", "auto")
    if policy not in MASK_POLICIES:
        raise DataError(f"data.masks is {policy!r}; use one of {', '.join(MASK_POLICIES)}.")
    return policy


def masks_in_use(policy: str, ground_truth: Path, where: Path) -> bool:
    """Whether anomalies of ``where`` get masks from ``ground_truth`` under ``data.masks: policy``.

    ``auto`` with no ``ground_truth`` folder at all means an image-level dataset; that is logged once, here.
    """
    if policy == "none":
        return False
    if policy == "auto" and not ground_truth.exists():
        logger.info("%s has no %s folder: only image-level metrics will be computed (data.masks: auto).", where,
                    ground_truth.name)
        return False
    return True


def anomalous_records(paths: Sequence[Path], defect: str, gt_dir: Path | None, *, strict: bool = True,
                      mask_name: str = "{stem}_mask.png") -> list[SampleRecord]:
    """Anomalous images (label 1), each with its mask from ``gt_dir`` matched by name (``None``: no masks).

    Args:
        paths: The images of one folder.
        defect: Their defect name.
        gt_dir: Folder of their masks, ``<stem>_mask.*`` or ``<stem>.*``; ``None`` for an image-level dataset.
        strict: A missing mask is a DataError (else the record gets none).
        mask_name: The expected mask name, for the message.
    """
    if gt_dir is None:
        return [SampleRecord(p, None, 1, defect) for p in paths]
    unique_stems(paths, "masks are matched to images by name, so this is ambiguous")
    masks = mask_index(gt_dir)
    records = []
    for path in paths:
        mask = find_mask(masks, path.stem)
        if mask is None and strict:
            raise DataError(
                f"No ground-truth mask for {path}: expected {gt_dir / mask_name.format(stem=path.stem)}. Add the "
                "mask, or set data.masks: none to evaluate image-level metrics only."
            )
        records.append(SampleRecord(path, mask, 1, defect))
    return records


def check_masks_mark_something(records: Sequence[SampleRecord], threshold: float) -> None:
    """A DataError when the records have mask files but none marks a single anomalous pixel.

    Such masks are in a convention nobody meant (or all blank); evaluating them would silently report no pixel
    metrics. Reading stops at the first mask that marks something, so a healthy test set costs one decode.
    """
    masks = [r.mask for r in records if r.mask is not None]
    if not masks or any(mask_has_positive(m, threshold) for m in masks):
        return
    folders = ", ".join(sorted({str(m.parent) for m in masks}))
    raise DataError(
        f"The {len(masks)} ground-truth masks in {folders} mark no anomalous pixel at data.mask_threshold="
        f"{threshold}. Check the masks (0 = normal, nonzero = anomalous), or set data.masks: none to evaluate "
        "image-level metrics only."
    )


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

    Raises:
        DataError: The records have masks, but none of them marks an anomalous pixel.
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
        check_masks_mark_something(self.records, self.mask_threshold)

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

