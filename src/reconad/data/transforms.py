"""Image and mask loading: file → PIL RGB → resized ``[0, 1]`` tensor, exactly as the official loaders do it.

Images are *not* normalised here; each model normalises with its own backbone's statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

__all__ = ["DataError", "IMAGE_EXTENSIONS", "center_crop", "load_image", "load_mask", "resize_image"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes of the image files a dataset picks up (matched case-insensitively)."""

_MAX_16BIT = 65535


class DataError(ValueError):
    """A dataset folder or file cannot be used; the message names the path and says what to do."""


def load_image(path: str | Path) -> Image.Image:
    """Read an image file fully and return it as an 8-bit RGB PIL image.

    Conversions: grayscale (``L``, ``1``) is replicated to three channels; ``LA``/``RGBA``/``PA`` lose their
    alpha channel (the stored colour is kept, it is *not* composited on a background); palette images
    (``P``, with or without transparency) are expanded through their palette; 16-bit images (``I;16*``, or
    ``I`` holding 16-bit values) are scaled by ``value / 257`` so the full 16-bit range maps onto 0..255;
    float images (``F``) must hold values in [0, 1].

    Args:
        path: Image file.

    Returns:
        The decoded RGB image.

    Raises:
        DataError: The file is missing, unreadable, truncated or of an unsupported kind.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now, so truncated files fail here and not inside a model
            return _to_rgb(img, path)
    except FileNotFoundError as err:
        raise DataError(f"Image not found: {path}. Check the dataset path or remove the entry.") from err
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(
            f"Cannot read image {path}: {err}. The file is unreadable or truncated; re-download or re-export it, "
            "or delete it from the dataset."
        ) from err


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see ``load_image`` for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("L", "1"):
        return img.convert("L").convert("RGB")
    if mode == "LA":
        return img.getchannel("L").convert("RGB")
    if mode in ("P", "PA"):
        # via RGBA so palette transparency is understood (and then dropped) without a PIL warning
        return img.convert("RGBA").convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), path)).convert("RGB")
    return img.convert("RGB")  # RGBA (alpha dropped), CMYK, YCbCr, LAB, HSV


def _high_depth_to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scale a 16-bit (or float [0, 1]) single-channel array onto 0..255 by its type's range, not by clipping."""
    if arr.dtype.kind == "f":
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
            raise DataError(f"Float image {path} has values outside [0, 1]; rescale it to [0, 1] or to 8/16-bit.")
        return np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_16BIT):
        raise DataError(f"Integer image {path} has values outside the 16-bit range 0..65535; save it as 8- or 16-bit.")
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 257 == 255 exactly


def center_crop(tensor: torch.Tensor, crop_size: int | None) -> torch.Tensor:
    """Center-crop the last two axes to ``crop_size`` (torchvision ``CenterCrop`` offsets); ``None`` is a no-op."""
    if crop_size is None:
        return tensor
    height, width = tensor.shape[-2:]
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop_size {crop_size} is larger than the resized image ({height}x{width}).")
    top = int(round((height - crop_size) / 2.0))
    left = int(round((width - crop_size) / 2.0))
    return tensor[..., top : top + crop_size, left : left + crop_size]


def resize_image(
    img: Image.Image,
    size: int,
    backend: Literal["pil", "cv2"] = "pil",
    crop_size: int | None = None,
) -> torch.Tensor:
    """Resize an RGB image to ``size × size`` and return a float32 ``(3, S, S)`` tensor in [0, 1].

    Args:
        img: RGB image (as returned by ``load_image``).
        size: Output side before cropping.
        backend: ``"pil"``: PIL bilinear, which anti-aliases when downsampling (torchvision ``Resize`` on PIL,
            as RD4AD, ReContrast and GNL); ``"cv2"``: float64 ``cv2.resize`` with INTER_LINEAR, no
            anti-aliasing (RD++).
        crop_size: Optional center crop after resizing (``S`` becomes ``crop_size``).

    Returns:
        The image tensor, not normalised.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    if backend == "pil":
        # parity: official_code.md §1.1 (Resize((S,S)) on the PIL image, then ToTensor)
        arr = np.asarray(img.resize((size, size), Image.BILINEAR))
        tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)
    elif backend == "cv2":
        # parity: official_code.md §3.2 (RGB /255 as float64, then cv2.resize INTER_LINEAR, then float32)
        arr = np.asarray(img).astype(np.float64) / 255.0
        arr = cv2.resize(arr, (size, size), interpolation=cv2.INTER_LINEAR)
        tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    else:
        raise ValueError(f"Unknown resize backend {backend!r}; use 'pil' or 'cv2'.")
    return center_crop(tensor, crop_size).contiguous()


def load_mask(
    path: str | Path,
    size: int,
    threshold: float = 0.5,
    *,
    crop_size: int | None = None,
    image_size: tuple[int, int] | None = None,
    image_path: str | Path | None = None,
) -> torch.Tensor:
    """Read a ground-truth mask, resize it like the official code and binarise it.

    The mask is made 8-bit grayscale (16-bit masks scaled by ``/257``), resized with PIL bilinear, scaled to
    [0, 1] by ``/255`` and binarised with ``> threshold``: 0.5 for RD4AD/RD++/GNL, 0 for ReContrast (any non-zero
    pixel). A mask stored as 0/1 labels is first promoted to 0/255, since ``/255`` would otherwise erase it.

    Args:
        path: Mask file.
        size: Output side before cropping (the image's ``size``).
        threshold: Binarisation threshold on the [0, 1] mask.
        crop_size: Optional center crop, the same as the image's.
        image_size: Original ``(width, height)`` of the mask's image; a different mask size raises.
        image_path: The image file, named in the size-mismatch error.

    Returns:
        A float32 ``(1, S, S)`` tensor of 0s and 1s.

    Raises:
        DataError: The mask is missing, unreadable, or its size differs from its image's.
    """
    path = Path(path)
    mask = _open_mask(path)
    if image_size is not None and tuple(mask.size) != tuple(image_size):
        raise DataError(
            f"Mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path or '(unknown)'} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have the same size as its image. Fix or re-export it."
        )
    # parity: official_code.md §1.1 (PIL bilinear Resize on the mask, ToTensor, then > 0.5; §2.6: > 0)
    arr = np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    tensor = torch.from_numpy((arr > threshold).astype(np.float32))[None]
    return center_crop(tensor, crop_size).contiguous()


def _open_mask(path: Path) -> Image.Image:
    """Decode a mask file to an 8-bit ``L`` image."""
    try:
        with Image.open(path) as img:
            img.load()
            mask = _mask_to_gray(img, path)
    except FileNotFoundError as err:
        raise DataError(f"Mask not found: {path}. Add the mask or check the ground_truth folder.") from err
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(f"Cannot read mask {path}: {err}. The file is unreadable or truncated; re-export it.") from err
    arr = np.asarray(mask)
    if arr.size and arr.max() == 1:
        # a 0/1 label mask: /255 would turn it into ~0.004 and silently drop every defect
        logger.debug("Mask %s holds 0/1 labels; promoting to 0/255.", path)
        mask = Image.fromarray((arr > 0).astype(np.uint8) * 255)
    return mask


def _mask_to_gray(img: Image.Image, path: Path) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), path))
    if img.mode in ("LA", "PA", "P", "RGBA"):
        return img.convert("RGBA").convert("L") if img.mode != "LA" else img.getchannel("L")
    return img.convert("L")
