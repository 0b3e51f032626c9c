"""VisA as distributed, read in place (no conversion)::

    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png
    <root>/split_csv/1cls.csv      columns object,split,label,image,mask (paths relative to <root>)

The one-class split file decides which images train and test: ``split`` is ``train`` or ``test``, ``label``
``normal`` or ``anomaly``. Masks hold 0/255 or defect class ids; any nonzero pixel is anomalous
(:func:`reconad.data.transforms.mask_to_gray`). Records keep the order of the split file.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from reconad.config import DataConfig
from reconad.data.dataset import ImageDataset, SampleRecord, Views, mask_policy
from reconad.data.files import check_nonempty, list_subdirs, select
from reconad.data.layouts import Layout, category_dir, register_layout, require_root
from reconad.data.transforms import DataError

__all__ = ["SPLIT_FILE", "VISA_LAYOUT", "VisADataset", "list_visa_categories", "read_split"]

logger = logging.getLogger(__name__)

SPLIT_FILE = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
_DEFECT = "anomaly"  # VisA's one-class split names no defect types
_EXPECTED = (
    "<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG, <root>/<category>/Data/Masks/Anomaly/*.png and "
    "<root>/split_csv/1cls.csv"
)


def read_split(root: Path) -> list[dict[str, str]]:
    """The rows of ``<root>/split_csv/1cls.csv``, each with its line number under ``"line"``.

    Raises:
        DataError: The file is missing, or lacks a column.
    """
    path = root / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"VisA split file not found: {path}. It ships with VisA (split_csv/1cls.csv beside the "
                        f"category folders); the layout is {_EXPECTED}.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"VisA split file {path} lacks the column(s) {', '.join(missing)}; expected the "
                                f"header {','.join(_COLUMNS)}.")
            return [{**row, "line": str(reader.line_num)} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"Cannot read the VisA split file {path}: {err}. Re-download it.") from err


def list_visa_categories(root: Path) -> list[str]:
    """The objects named in the split file (or, without one, the folders holding ``Data/Images``), sorted."""
    if (root / SPLIT_FILE).is_file():
        return sorted({row["object"] for row in read_split(root)})
    return [p.name for p in list_subdirs(root) if (p / "Data" / "Images").is_dir()]


def _row_file(root: Path, row: dict[str, str], column: str) -> Path:
    path = root / row[column].strip()
    if not path.is_file():
        raise DataError(f"{path} (line {row['line']} of {root / SPLIT_FILE}, column {column!r}) is missing. Restore "
                        "it, or use the split file that matches this copy of VisA.")
    return path


def _record(root: Path, row: dict[str, str], use_masks: bool) -> SampleRecord:
    label = _LABELS.get(row["label"].strip())
    if label is None:
        raise DataError(f"Line {row['line']} of {root / SPLIT_FILE} has label {row['label']!r}; expected "
                        "'normal' or 'anomaly'.")
    image = _row_file(root, row, "image")
    if label == 0:
        return SampleRecord(image, None, 0, "good")
    mask = _row_file(root, row, "mask") if use_masks and (row["mask"] or "").strip() else None
    return SampleRecord(image, mask, 1, _DEFECT)


def _split_records(root: Path, category: str, split: str, policy: str) -> list[SampleRecord]:
    rows = [r for r in read_split(root) if r["object"] == category]
    if not rows:
        raise DataError(f"{root / SPLIT_FILE} lists no image of {category!r}; it lists "
                        f"{', '.join(sorted({r['object'] for r in read_split(root)})) or 'nothing'}.")
    rows = [r for r in rows if r["split"].strip() == split]
    if not rows:
        raise DataError(f"{root / SPLIT_FILE} lists no {split} image of {category!r}.")
    anomalies = [r for r in rows if r["label"].strip() == "anomaly"]
    if split == "train" and anomalies:
        raise DataError(f"Line {anomalies[0]['line']} of {root / SPLIT_FILE} puts an anomaly into the training split; "
                        "training images must be normal (use the one-class split 1cls.csv).")
    with_mask = [r for r in anomalies if (r["mask"] or "").strip()]
    use_masks = policy != "none" and (policy == "required" or bool(with_mask))
    if anomalies and not use_masks and policy == "auto":
        logger.info("%s gives no mask for %s: only image-level metrics will be computed (data.masks: auto).",
                    root / SPLIT_FILE, category)
    if use_masks and len(with_mask) < len(anomalies):
        row = next(r for r in anomalies if not (r["mask"] or "").strip())
        raise DataError(f"Line {row['line']} of {root / SPLIT_FILE} gives no mask for {row['image']}. Add it, or set "
                        "data.masks: none to evaluate image-level metrics only.")
    return [_record(root, r, use_masks) for r in rows]


class VisADataset(ImageDataset):
    """One VisA category, read in place with the split of ``split_csv/1cls.csv``.

    Args:
        root: VisA root (holding ``split_csv/`` and the category folders).
        category: Object name (``candle``, ``pcb1``...).
        split: ``"train"`` or ``"test"``.
        cfg: Data settings.
        views: Extra training views, see :class:`ImageDataset`.
        indices: Keep only these positions of the split (in split-file order).
        seed: Base seed of ``views``.

    Raises:
        DataError: A missing split file, column, category or listed file, a bad label, or a missing mask.
    """

    def __init__(self, root: str | Path, category: str, split: str, cfg: DataConfig, views: Views | None = None,
                 indices: Sequence[int] | None = None, *, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        base = require_root(root, VISA_LAYOUT)
        category_dir(base, category, VISA_LAYOUT)
        records = select(_split_records(base, category, split, mask_policy(cfg)), indices)
        check_nonempty([p for r in records for p in (r.path, r.mask) if p is not None])
        super().__init__(records, cfg, views, seed=seed)
        self.root, self.category, self.split = base, category, split


def _make_dataset(cfg: DataConfig, split: str, views: Views | None, indices: Sequence[int] | None,
                  seed: int) -> VisADataset:
    return VisADataset(require_root(cfg.root, VISA_LAYOUT), cfg.category, split, cfg, views, indices, seed=seed)


VISA_LAYOUT = register_layout(Layout("visa", _EXPECTED, _make_dataset, list_visa_categories))
