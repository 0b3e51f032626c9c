"""MVTec LOCO AD: its folder layout, union masks for the pixel metrics, and its own metrics (``extra_metrics``).

Layout of one category::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/*.png
    <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/<image stem>/<k>.png
    <root>/<category>/defects_config.json

Each anomalous image has a ground-truth *folder* with one PNG per defect region ("channel"); the sample mask is
their union (for pixel AUROC / AUPRO), and sPRO uses the channels themselves with the saturation areas of
``defects_config.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from reconad.config import DataConfig
from reconad.data.dataset import ImageDataset, SampleRecord, Views, mask_policy
from reconad.data.files import categories_with, check_nonempty, list_images, list_subdirs, require_dir, select
from reconad.data.layouts import Layout, category_dir, register_layout, require_root
from reconad.data.transforms import DataError, center_crop, opened_image

__all__ = ["LOCO_ANOMALY_TYPES", "LOCO_LAYOUT", "LocoDataset", "make_loco_dataset", "write_synthetic_loco"]

logger = logging.getLogger(__name__)

LOCO_ANOMALY_TYPES = ("structural_anomalies", "logical_anomalies")
_LAYOUT = (
    "<root>/<category>/{train,validation}/good/*.png, <root>/<category>/test/{good,logical_anomalies,"
    "structural_anomalies}/*.png, <root>/<category>/ground_truth/<type>/<stem>/<k>.png and "
    "<root>/<category>/defects_config.json"
)
_SHORT = {"structural_anomalies": "structural", "logical_anomalies": "logical"}


def _good_records(folder: Path) -> list[SampleRecord]:
    require_dir(folder, f"expected the MVTec LOCO layout: {_LAYOUT}")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"No images in {folder}. Expected the MVTec LOCO layout: {_LAYOUT}.")
    return [SampleRecord(p, None, 0, "good") for p in paths]


def _test_records(cat_dir: Path, use_masks: bool) -> tuple[list[SampleRecord], list[Path | None]]:
    """Test images in folder order (good, logical, structural) with their ground-truth folders."""
    test = require_dir(cat_dir / "test", f"the test folder; expected the MVTec LOCO layout: {_LAYOUT}")
    records, gt_dirs = [], []
    for defect_dir in list_subdirs(test):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            if not use_masks:
                records.append(SampleRecord(path, None, int(defect != "good"), defect))
                gt_dirs.append(None)
                continue
            if defect == "good":
                records.append(SampleRecord(path, None, 0, defect))
                gt_dirs.append(None)
                continue
            gt = cat_dir / "ground_truth" / defect / path.stem
            if not gt.is_dir() or not list(gt.glob("*.png")):
                raise DataError(f"No ground-truth folder for {path}: expected {gt}/000.png ... "
                                f"(MVTec LOCO layout: {_LAYOUT}).")
            records.append(SampleRecord(path, None, 1, defect))
            gt_dirs.append(gt)
    if not records:
        raise DataError(f"No test images in {test}. Expected the MVTec LOCO layout: {_LAYOUT}.")
    return records, gt_dirs


class LocoDataset(ImageDataset):
    """One category of MVTec LOCO AD.

    Args:
        root: Dataset root.
        category: Category folder under ``root``.
        split: ``"train"`` (``train/good``), ``"validation"`` (``validation/good``) or ``"test"``.
        cfg: Data settings (size, crop, resize backend, mask threshold, ``loco_spro_fpr_limit``).
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the sorted file list.
        seed: Base seed of ``views``.

    Raises:
        DataError: Missing root, category, folders, images or ground-truth folders.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: Literal["train", "validation", "test"],
        cfg: DataConfig,
        views: Views | None = None,
        indices: Sequence[int] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        cat_dir = category_dir(root, category, LOCO_LAYOUT)
        gt_dirs: list[Path | None]
        if split in ("train", "validation"):
            records = _good_records(cat_dir / split / "good")
            gt_dirs = [None] * len(records)
        elif split == "test":
            records, gt_dirs = _test_records(cat_dir, mask_policy(cfg) != "none")
        else:
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}.")
        records, gt_dirs = select(records, indices), select(gt_dirs, indices)
        check_nonempty([r.path for r in records])
        super().__init__(records, cfg, views, seed=seed, has_masks=any(g is not None for g in gt_dirs))
        self.root, self.category, self.split = Path(root).expanduser(), category, split
        self.gt_dirs = gt_dirs
        self.spro_fpr_limit = cfg.loco_spro_fpr_limit
        config_file = cat_dir / "defects_config.json"
        self.defects = None
        if config_file.is_file() and mask_policy(cfg) != "none":
            from reconad.metrics import load_defects_config

            self.defects = load_defects_config(config_file)
        self._regions: list[list[tuple[np.ndarray, float]]] | None = None

    # -- masks ---------------------------------------------------------------------------------------------------
    def _channels(self, index: int) -> list[tuple[np.ndarray, int]]:
        """(binary mask at the output size, defect pixel value) of each ground-truth channel of one image."""
        gt = self.gt_dirs[index]
        if gt is None:
            return []
        out = []
        for path in sorted(gt.glob("*.png")):
            with opened_image(path, "ground-truth channel", "Restore the LOCO ground_truth folder.") as im:
                raw = np.array(im)
            raw = raw[..., 0] if raw.ndim == 3 else raw
            values = np.unique(raw[raw != 0])
            if values.size != 1:
                raise DataError(f"Ground-truth channel {path} must hold one nonzero defect value, "
                                f"got {values.tolist()}")
            # like load_mask: bilinear resize of the 0/255 channel, then > mask_threshold
            binary = Image.fromarray((raw != 0).astype(np.uint8) * 255)
            arr = np.asarray(binary.resize((self.image_size, self.image_size), Image.BILINEAR), np.float32) / 255.0
            mask = center_crop(torch.from_numpy(arr > self.mask_threshold), self.crop_size).numpy()
            out.append((mask, int(values[0])))
        return out

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.records))[index]
        sample = super().__getitem__(index)
        channels = self._channels(index)
        if channels:
            union = np.logical_or.reduce([m for m, _ in channels])
            sample["mask"] = torch.from_numpy(union.astype(np.float32))[None]  # (1, S, S)
        return sample

    def regions(self, index: int) -> list[tuple[np.ndarray, float]]:
        """sPRO regions of one image at the output size (empty for good images); needs ``defects_config.json``."""
        from reconad.metrics import loco_regions

        if self.defects is None:
            raise DataError(f"sPRO needs {self.root / self.category / 'defects_config.json'}, which is missing.")
        channels = [(m, v) for m, v in self._channels(index) if m.any()]
        if not channels:
            return []
        with opened_image(self.records[index].path, "image", "Check the dataset path.") as im:
            width, height = im.size
        # absolute saturation thresholds are pixel counts at the original resolution
        area_scale = self.image_size * self.image_size / float(width * height)
        return loco_regions([m.astype(np.uint8) * v for m, v in channels], self.defects, area_scale=area_scale)

    # -- metrics -------------------------------------------------------------------------------------------------
    def extra_metrics(self, outputs) -> dict[str, float]:
        """Structural, logical and mean image AUROC, and sPRO (each type scored with the good images).

        Args:
            outputs: ``reconad.engine.EvalOutputs`` of this dataset (maps at the output size).

        Returns:
            ``{structural,logical,mean}_image_auroc`` and, with a defects config, ``{structural,logical,mean}_spro``
            (sPRO integrated up to ``data.loco_spro_fpr_limit``, default 0.05, as the MVTec LOCO papers report).
        """
        from reconad.metrics import image_auroc, spro_auc

        index = {str(r.path): i for i, r in enumerate(self.records)}
        rows = [index[str(p)] for p in outputs.paths]
        defects = np.asarray(outputs.defects)
        metrics: dict[str, float] = {}
        for kind in LOCO_ANOMALY_TYPES:
            sel = np.flatnonzero((defects == "good") | (defects == kind))
            if not (defects[sel] == kind).any() or not (defects[sel] == "good").any():
                continue
            name = _SHORT[kind]
            metrics[f"{name}_image_auroc"] = image_auroc(outputs.scores[sel], outputs.labels[sel])
            if self.defects is not None:
                regions = self._all_regions()
                metrics[f"{name}_spro"] = spro_auc(outputs.maps[sel], [regions[rows[i]] for i in sel],
                                                   fpr_limit=self.spro_fpr_limit)
        for metric in ("image_auroc", "spro"):
            keys = [f"{_SHORT[k]}_{metric}" for k in LOCO_ANOMALY_TYPES]
            values = [metrics[k] for k in keys if k in metrics]
            if len(values) == len(keys):
                metrics[f"mean_{metric}"] = float(np.mean(values))
        return metrics

    def _all_regions(self) -> list[list[tuple[np.ndarray, float]]]:
        if self._regions is None:
            self._regions = [self.regions(i) for i in range(len(self.records))]
        return self._regions


def make_loco_dataset(
    cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None, seed: int
) -> LocoDataset:
    """``build_datasets`` entry for ``data.layout: loco``."""
    require_root(cfg.root, LOCO_LAYOUT)
    return LocoDataset(cfg.root, cfg.category, split, cfg, views, indices, seed=seed)


def _list_loco_categories(root: Path) -> list[str]:
    return categories_with(root, "train", "test")


LOCO_LAYOUT = register_layout(Layout("loco", _LAYOUT, make_loco_dataset, _list_loco_categories, multi_category=False))


# ------------------------------------------------------------------------------------------- synthetic LOCO set


def _synthetic_scene(rng: np.random.Generator, size: int, parts: Sequence[tuple[str, int, int]]) -> np.ndarray:
    """A noisy light background with the given parts (kind, centre y, centre x) drawn on it; (size, size, 3)."""
    img = np.clip(0.75 + rng.normal(0, 0.02, (size, size, 3)), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    r = size // 8
    for kind, cy, cx in parts:
        if kind == "square":
            img[cy - r:cy + r, cx - r:cx + r] = (0.8, 0.15, 0.1)
        else:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (0.1, 0.2, 0.8)
    return img


def _part_mask(size: int, kind: str, cy: int, cx: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    r = size // 8
    if kind == "square":
        return (abs(yy - cy + 0.5) < r) & (abs(xx - cx + 0.5) < r)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_synthetic_loco(root: str | Path, category: str = "parts", *, n_train: int = 16, n_validation: int = 2,
                         n_good: int = 4, n_logical: int = 4, n_structural: int = 4, size: int = 64,
                         seed: int = 0) -> Path:
    """Write a tiny MVTec LOCO-layout category of generated images (for tests, demos and benchmarks).

    A normal image shows a red square on the left and a blue disc on the right (positions jittered by a few
    pixels). Logical anomalies: the disc is missing (region = where it belongs, pixel value 255) or a second
    square replaces it (region = the extra square, 254): every part looks normal, only the composition is
    wrong. Structural anomalies: one or two dark blobs on the parts (one channel per blob, 253, absolute
    saturation). Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    cat = Path(root) / category
    q = size // 4

    def jitter() -> tuple[int, int, int, int]:
        dy, dx, ey, ex = rng.integers(-2, 3, 4)
        return 2 * q + dy, q + dx, 2 * q + ey, 3 * q + ex

    def save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).round().astype(np.uint8) if arr.dtype != np.uint8 else arr).save(path)

    def normal(path: Path) -> None:
        sy, sx, dy, dx = jitter()
        save(path, _synthetic_scene(rng, size, [("square", sy, sx), ("disc", dy, dx)]))

    for i in range(n_train):
        normal(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_validation):
        normal(cat / "validation" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        normal(cat / "test" / "good" / f"{i:03d}.png")
    for i in range(n_logical):
        sy, sx, dy, dx = jitter()
        name = f"{i:03d}"
        if i % 2 == 0:  # missing disc
            parts, region, value = [("square", sy, sx)], _part_mask(size, "disc", dy, dx), 255
        else:  # a second square where the disc belongs
            parts, region, value = [("square", sy, sx), ("square", dy, dx)], _part_mask(size, "square", dy, dx), 254
        save(cat / "test" / "logical_anomalies" / f"{name}.png", _synthetic_scene(rng, size, parts))
        save(cat / "ground_truth" / "logical_anomalies" / name / "000.png", region.astype(np.uint8) * value)
    for i in range(n_structural):
        sy, sx, dy, dx = jitter()
        img = _synthetic_scene(rng, size, [("square", sy, sx), ("disc", dy, dx)])
        name = f"{i:03d}"
        centres = [(sy, sx), (dy, dx)][: 1 + i % 2]
        for k, (cy, cx) in enumerate(centres):
            blob = _part_mask(size, "disc", cy, cx) & (np.hypot(*np.mgrid[0:size, 0:size] - np.array(
                [cy, cx])[:, None, None]) <= max(2, size // 16))
            img[blob] = (0.05, 0.05, 0.05)
            save(cat / "ground_truth" / "structural_anomalies" / name / f"{k:03d}.png", blob.astype(np.uint8) * 253)
        save(cat / "test" / "structural_anomalies" / f"{name}.png", img)
    defects = [
        {"defect_name": "missing_disc", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "extra_square", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "blob", "pixel_value": 253, "saturation_threshold": 20, "relative_saturation": False},
    ]
    (cat / "defects_config.json").write_text(json.dumps(defects, indent=1))
    return Path(root)
