"""Data: datasets on disk (layouts: MVTec AD, plain folders, MVTec LOCO, VisA, BTAD), image/mask transforms and
the built-in demo set.

Every sample is a dict ``{"image": (3, H, W) float in [0, 1], "mask": (1, H, W) float in {0, 1},
"label": int, "path": str, "defect": str}``; see :mod:`reconad.data.dataset`. Names are imported on first use,
so ``import reconad.data`` (or one light submodule such as :mod:`reconad.data.layouts`) does no work up front.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DEMO_CATEGORIES": "reconad.data.demo",
    "ensure_demo_data": "reconad.data.demo",
    "FolderDataset": "reconad.data.folder",
    "MVTecDataset": "reconad.data.mvtec",
    "ImageDataset": "reconad.data.dataset",
    "SampleRecord": "reconad.data.dataset",
    "Views": "reconad.data.dataset",
    "seeded_rngs": "reconad.data.dataset",
    "build_datasets": "reconad.data.layouts",
    "list_categories": "reconad.data.layouts",
    "list_layouts": "reconad.data.registry",
    "IMAGE_EXTENSIONS": "reconad.data.transforms",
    "DataError": "reconad.data.errors",
    "load_image": "reconad.data.transforms",
    "load_mask": "reconad.data.transforms",
    "resize_image": "reconad.data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reconad.data' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cache: later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
