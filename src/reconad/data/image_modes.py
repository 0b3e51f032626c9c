"""Image modes to 8-bit RGB, without torch or OpenCV: shared by the training pipeline (``reconad.data.transforms``)
and the torch-free runtime (``reconad.deploy.runtime``), so both see every input the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from reconad.data.errors import DataError

__all__ = ["MAX_16BIT", "high_depth_to_uint8", "to_rgb"]

MAX_16BIT = 65535


def to_rgb(img: Image.Image, where: str | Path) -> Image.Image:
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
        return Image.fromarray(high_depth_to_uint8(np.asarray(img), where)).convert("RGB")
    return img.convert("RGB")  # RGBA (alpha dropped), CMYK, YCbCr, LAB, HSV


def high_depth_to_uint8(arr: np.ndarray, where: str | Path) -> np.ndarray:
    """Scale a 16-bit (or float [0, 1]) single-channel array onto 0..255 by its type's range, not by clipping."""
    if arr.dtype.kind == "f":
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
            raise DataError(f"Float image {where} has values outside [0, 1]; rescale it to [0, 1] or to 8/16-bit.")
        return np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > MAX_16BIT):
        raise DataError(f"Integer image {where} has values outside the 16-bit range 0..65535; save it as 8- or 16-bit.")
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 257 == 255 exactly
