"""Data: datasets on disk (MVTec layout, plain folders), image/mask transforms and the built-in demo set.

Every sample is a dict ``{"image": (3, H, W) float in [0, 1], "mask": (1, H, W) float in {0, 1},
"label": int, "path": str, "defect": str}``; see :mod:`reconad.data.folder`.
"""

from reconad.data.demo import DEMO_CATEGORIES, ensure_demo_data
from reconad.data.folder import (
    FolderDataset,
    ImageDataset,
    MVTecDataset,
    SampleRecord,
    Views,
    build_datasets,
    list_categories,
    seeded_rngs,
)
from reconad.data.transforms import IMAGE_EXTENSIONS, DataError, load_image, load_mask, resize_image

__all__ = [
    "DEMO_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "FolderDataset",
    "ImageDataset",
    "MVTecDataset",
    "SampleRecord",
    "Views",
    "build_datasets",
    "ensure_demo_data",
    "list_categories",
    "load_image",
    "load_mask",
    "resize_image",
    "seeded_rngs",
]
