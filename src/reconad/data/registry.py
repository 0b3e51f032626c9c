"""The dataset-layout registry: names → :class:`Layout`. Light on purpose (no torch, no layout imported), since
``DataConfig`` checks ``data.layout`` through it when a config is made.

A layout is one module that builds a :class:`Layout` and calls :func:`register_layout` on it, plus its line in
:data:`BUILTIN_LAYOUT_MODULES` (built-in layouts are imported by name on first use, like methods in
``reconad.registry``). See docs/datasets.md, "How to add a layout".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconad.data.errors import DataError

if TYPE_CHECKING:
    from reconad.config import DataConfig
    from reconad.data.dataset import ImageDataset, Views

__all__ = ["BUILTIN_LAYOUT_MODULES", "Layout", "check_layout_name", "get_layout", "list_layouts", "register_layout"]

MakeDataset = Callable[["DataConfig", str, "Views | None", "Sequence[int] | None", int], "ImageDataset"]


@dataclass(frozen=True)
class Layout:
    """How one folder structure becomes datasets."""

    name: str
    """The ``data.layout`` value."""
    expected: str
    """The folder structure in one line, quoted by error messages."""
    make_dataset: MakeDataset
    """``(cfg, split, views, indices, seed) -> ImageDataset`` for ``split`` ``"train"`` or ``"test"``; ``indices``
    keeps those positions of the full, deterministically ordered split."""
    list_categories: Callable[[Path], list[str]]
    """The categories under an existing dataset root, sorted."""
    multi_category: bool = True
    """Whether ``data.categories`` (one model on several categories) concatenates per-category datasets."""


BUILTIN_LAYOUT_MODULES: dict[str, str] = {
    "mvtec": "reconad.data.mvtec",
    "folder": "reconad.data.folder",
    "loco": "reconad.data.loco",
    "visa": "reconad.data.visa",
    "btad": "reconad.data.btad",
}

_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` available as ``data.layout: <layout.name>``; a name taken by another layout is an error."""
    known = _LAYOUTS.get(layout.name)
    if known is not None and known is not layout:
        raise ValueError(f"dataset layout {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout
    return layout


def list_layouts() -> list[str]:
    """Names of every layout (built-in and registered), sorted."""
    return sorted(set(BUILTIN_LAYOUT_MODULES) | set(_LAYOUTS))


def check_layout_name(name: str) -> None:
    """A DataError listing the known layouts when ``name`` is none of them (no layout module is imported)."""
    if name not in BUILTIN_LAYOUT_MODULES and name not in _LAYOUTS:
        raise DataError(f"Unknown data.layout {name!r}; known layouts: {', '.join(list_layouts())}.")


def get_layout(name: str) -> Layout:
    """The layout called ``name``, importing its built-in module on first use."""
    check_layout_name(name)
    if name not in _LAYOUTS:
        from importlib import import_module

        import_module(BUILTIN_LAYOUT_MODULES[name])
    return _LAYOUTS[name]
