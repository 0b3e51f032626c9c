"""File helpers shared by every dataset layout: image listing, existence checks, mask lookup.

Folders copied between systems carry files nobody means as data: macOS ``.DS_Store`` and AppleDouble ``._name.png``
files, Windows ``Thumbs.db``/``desktop.ini``, ``__MACOSX`` folders from zip archives, ``.ipynb_checkpoints``.
Listing skips them here, in one place, so every layout treats them alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from reconad.data.transforms import IMAGE_EXTENSIONS, DataError

__all__ = [
    "categories_with",
    "check_nonempty",
    "find_mask",
    "is_hidden",
    "list_images",
    "list_subdirs",
    "mask_index",
    "require_dir",
    "resolve",
    "select",
    "unique_stems",
]

_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

T = TypeVar("T")


def is_hidden(path: Path) -> bool:
    """A dot-file/folder (``.DS_Store``, ``._a.png``, ``.ipynb_checkpoints``) or a system file (``Thumbs.db``)."""
    return path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder; otherwise a DataError saying whether it is missing or a file.

    Args:
        path: The folder.
        what: What the folder is and where it belongs, for the message (e.g. "training folder ... Expected ...").
    """
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{path} is a file, but a folder is expected here ({what}). Move the file away and put a "
                        "folder of that name in its place.")
    raise DataError(f"Missing folder {path} ({what}).")


def _image_files(folder: Path) -> Iterable[Path]:
    for path in folder.iterdir():
        if is_hidden(path) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path} is a broken symbolic link. Point it at its image again or delete it.")
        if path.is_file():
            yield path


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (suffix in ``IMAGE_EXTENSIONS``, any case), sorted by name.

    Hidden and system files are skipped (see the module docstring); a broken symbolic link is a DataError.
    """
    try:
        return sorted(_image_files(folder), key=lambda p: p.name)
    except NotADirectoryError as err:
        raise DataError(f"{folder} is a file, but a folder of images is expected here.") from err
    except PermissionError as err:
        raise DataError(f"Cannot list {folder}: permission denied. Check the folder's permissions.") from err


def list_subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name (hidden and system folders skipped)."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)), key=lambda p: p.name)


def categories_with(root: Path, *markers: str) -> list[str]:
    """Names of the visible sub-folders of ``root`` that hold at least one of the ``markers`` folders, sorted."""
    return [p.name for p in list_subdirs(root) if any((p / m).is_dir() for m in markers)]


def unique_stems(paths: Sequence[Path], why: str) -> dict[str, Path]:
    """Stem → file; two files with one stem (``a.png`` and ``a.jpg``) are a DataError naming both.

    Args:
        paths: Files of one folder.
        why: Why stems must be unique there (appended to the message).
    """
    index: dict[str, Path] = {}
    for path in paths:
        other = index.setdefault(path.stem, path)
        if other is not path:
            raise DataError(f"{other} and {path.name} share the name {path.stem!r}; {why}. Rename or remove one.")
    return index


def mask_index(folder: Path) -> dict[str, Path]:
    """Stem → mask file of the masks in ``folder`` (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    require_dir(folder, "a folder of ground-truth masks")
    return unique_stems(list_images(folder), "masks are matched to images by name, so this is ambiguous")


def find_mask(index: Mapping[str, Path], stem: str) -> Path | None:
    """The mask of image ``stem``: ``<stem>_mask.*`` (MVTec) or else ``<stem>.*`` (BTAD, prepared VisA-style sets)."""
    return index.get(f"{stem}_mask") or index.get(stem)


def check_nonempty(paths: Iterable[Path]) -> None:
    """Cheap validation at construction: every file exists and is not empty (full decoding happens on load)."""
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as err:
            raise DataError(f"Cannot access {path}: {err}. Check the file and its permissions.") from err
        if size == 0:
            raise DataError(f"Empty file: {path}. Re-download or re-export it, or delete it from the dataset.")


def resolve(root: str | Path | None, sub: str | Path) -> Path:
    """``sub`` if absolute (or without a root), else ``root / sub`` (``~`` expanded in both)."""
    sub = Path(sub).expanduser()
    if sub.is_absolute() or root is None:
        return sub
    return Path(root).expanduser() / sub


def select(items: list[T], indices: Sequence[int] | None) -> list[T]:
    """``items`` at ``indices`` in that order (all of them for ``None``)."""
    if indices is None:
        return items
    return [items[int(i)] for i in indices]
