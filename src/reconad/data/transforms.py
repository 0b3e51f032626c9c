"""Image and mask loading: file → PIL RGB → resized ``[0, 1]`` tensor, exactly as the official loaders do it.

Images are *not* normalised here; each model normalises with its own backbone's statistics.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

from reconad.data.errors import DataError
from reconad.data.image_modes import MAX_16BIT, to_rgb

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "center_crop",
    "load_image",
    "load_mask",
    "mask_has_positive",
    "mask_to_gray",
    "resize_image",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes of the image files a dataset picks up (matched case-insensitively)."""


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
    with opened_image(path, "image", "Check the dataset path or remove the entry.") as img:
        return to_rgb(img, path)


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

    The mask is made 8-bit grayscale on the 0..255 scale (:func:`mask_to_gray`: intensity masks of any depth are
    scaled by their range, label masks such as 0/1 or class ids become 0/255), resized with PIL bilinear, scaled to
    [0, 1] by ``/255`` and binarised with ``> threshold``: 0.5 for RD4AD/RD++/GNL, 0 for ReContrast (any non-zero
    pixel). An ordinary 8-bit 0/255 mask goes through exactly the official steps.

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
    """Decode a mask file to an 8-bit ``L`` image whose values mean ``value / 255`` (see ``mask_to_gray``)."""
    with opened_image(path, "mask", "Add the mask or check the ground-truth folder.") as img:
        return mask_to_gray(img, path)


def mask_has_positive(path: str | Path, threshold: float = 0.5) -> bool:
    """Whether a mask file marks any pixel as anomalous at its own resolution (``value / 255 > threshold``)."""
    path = Path(path)
    return bool((np.asarray(_open_mask(path), dtype=np.float32) / 255.0 > threshold).any())


def mask_to_gray(img: Image.Image, path: str | Path) -> Image.Image:
    """Any mask image → 8-bit ``L`` on the official 0..255 scale, reading its values as people mean them.

    The values are taken at the file's own depth (8-bit, 16-bit, 32-bit integer, float; the brightest channel of
    colour masks; the grey levels of a grey palette, else the palette indices) and read by one rule:

    - *Intensity* masks reach at least half their type's range (8-bit 0/255 as in MVTec AD, 16-bit 0/65535,
      float 0/1, soft masks): scaled by the range onto 0..255. An 8-bit ``L`` mask is returned unchanged, so the
      official path (bilinear resize, ``/ 255``, ``> threshold``) stays bit-identical.
    - *Label* masks stay below half their range (0/1, class ids 1, 2, 3, VisA's ids, 16-bit masks holding 0/255)
      or exceed it (float class ids): read as an intensity they would vanish at the default threshold, so every
      nonzero pixel is anomalous (promoted to 255).

    Raises:
        DataError: Negative or NaN values.
    """
    arr, full_range = _mask_values(img)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise DataError(f"Mask {path} holds NaN values; re-export it with 0 for normal and 1 or 255 for anomalous.")
    peak = arr.max() if arr.size else 0
    if arr.size and arr.min() < 0:
        raise DataError(f"Mask {path} holds negative values; re-export it with 0 for normal and 255 for anomalous.")
    if peak == 0:
        return Image.fromarray(np.zeros(arr.shape, np.uint8))
    if full_range / 2 <= peak <= full_range:  # intensity convention
        if arr.dtype == np.uint8:
            return Image.fromarray(arr)  # parity: official_code.md §1.1 (the 8-bit mask as it is)
        return Image.fromarray(np.round(arr.astype(np.float64) * (255.0 / full_range)).astype(np.uint8))
    logger.debug("Mask %s holds labels (max %s); every nonzero pixel is anomalous.", path, peak)
    return Image.fromarray((arr != 0).astype(np.uint8) * 255)


def _mask_values(img: Image.Image) -> tuple[np.ndarray, float]:
    """The mask's values as one 2-D array and the full range of their type (255, 65535 or 1.0)."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img), 255.0
    if mode == "1":
        return np.asarray(img.convert("L")), 255.0
    if mode == "LA":
        return np.asarray(img.getchannel("L")), 255.0
    if mode.startswith("I;16") or mode == "I":
        return np.asarray(img).astype(np.int64), float(MAX_16BIT)
    if mode == "F":
        return np.asarray(img, dtype=np.float64), 1.0
    if mode in ("P", "PA"):
        colours = np.asarray(img.convert("RGB"))
        if (colours[..., 0] == colours[..., 1]).all() and (colours[..., 1] == colours[..., 2]).all():
            return colours[..., 0], 255.0  # a grey palette: an L image stored compactly
        return np.asarray(img.getchannel("P") if mode == "PA" else img).astype(np.int64), 255.0  # indices: labels
    return np.asarray(img.convert("RGB")).max(axis=-1), 255.0  # colour masks: the brightest channel


@contextmanager
def opened_image(path: Path, what: str, missing_advice: str) -> Iterator[Image.Image]:
    """Open and fully decode an image file; every way it can fail becomes a DataError naming the file.

    PIL's decompression-bomb *warning* (more than ``Image.MAX_IMAGE_PIXELS`` pixels) is an error here too: such a
    file is either a mistake or an attack, and decoding it could exhaust memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode everything now, so truncated files fail here and not inside a model
                yield img
    except FileNotFoundError as err:
        raise DataError(f"{what.capitalize()} not found: {path}. {missing_advice}") from err
    except IsADirectoryError as err:
        raise DataError(f"{path} is a folder, but an {what} file is expected; rename or move the folder.") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(
            f"{what.capitalize()} {path} is too large to decode safely ({err}). Downscale it, or, if you trust the "
            "file, raise PIL.Image.MAX_IMAGE_PIXELS before loading."
        ) from err
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(
            f"Cannot read {what} {path}: {err}. The file is not an image, unreadable or truncated; re-download or "
            "re-export it, or delete it from the dataset."
        ) from err
