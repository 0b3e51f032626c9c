"""Uploaded bytes → an RGB array, or a rejection that names the problem (and the HTTP status it deserves).

Pillow reads only the header when an image is opened, so the pixel count is checked before any pixel is
decoded: a small file that claims 50 000 × 50 000 pixels (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ReconadError

# Modes with 8 bits per channel that convert to RGB without guessing a value range; 16/32-bit integer and float
# images (I;16, I, F) and colour spaces such as CMYK or LAB are refused instead of silently rescaled.
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


@dataclass(frozen=True)
class Limits:
    """What one request may carry; every limit answers a 4xx naming it."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 32


class ImageRejected(ReconadError):
    """An uploaded file the service will not decode; ``status`` is the HTTP status of the answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_size(name: str, size: int, limits: Limits) -> None:
    if size == 0:
        raise ImageRejected(400, f"{name}: the file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageRejected(413, f"{name}: the file is larger than the limit of {limits.max_bytes} bytes "
                                 "(reconad serve --max-bytes)")


def decode_image(name: str, data: bytes, limits: Limits) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the bytes of an image file; :class:`ImageRejected` for anything else."""
    check_size(name, len(data), limits)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2× its own limit raises) for huge images; the explicit check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRejected(413, f"{name}: too many pixels ({err}); the limit is {limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageRejected(400, f"{name}: not an image file that Pillow can read (PNG, JPEG, BMP, TIFF, ...)") \
            from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageRejected(413, f"{name}: {width}×{height} = {width * height} pixels exceeds the limit of "
                                     f"{limits.max_pixels} (reconad serve --max-pixels)")
        if image.mode not in SUPPORTED_MODES:
            raise ImageRejected(415, f"{name}: image mode {image.mode!r} is not supported; send 8-bit grey, "
                                     f"palette, RGB or RGBA ({', '.join(SUPPORTED_MODES)})")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageRejected(400, f"{name}: the image data is truncated or corrupt ({err})") from None
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
