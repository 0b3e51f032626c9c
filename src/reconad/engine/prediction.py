"""Prediction on a folder of images (superseded by ``reconad.deploy`` predictions with decisions)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write
from ..progress import progress
from ..run import load, read_run_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _image_files(inputs: str | Path | Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(file, output name without suffix): relative to the folder given, else the file name."""
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        root = Path(inputs)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {inputs}")
        return [(p, p.relative_to(root).with_suffix("")) for p in files]
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    names = [Path(p.stem) for p in paths]
    if len(set(names)) < len(names):
        raise ValueError("several input files share a name; pass their common folder instead")
    return list(zip(paths, names))


def predict(run_dir: str | Path, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
            device: str = "cpu", batch_size: int = 8) -> list[dict[str, Any]]:
    """Anomaly maps (float TIFF), heat-map overlays (PNG) and ``scores.csv`` for a folder or list of images."""
    from ..data.transforms import load_image, resize_image
    from ..visualize import heatmap_overlay, save_float_map, save_png

    cfg = read_run_config(run_dir)
    method = load(run_dir, device)
    files, output_dir = _image_files(inputs), Path(output_dir)
    rows, results = [], []
    for start in progress(range(0, len(files), batch_size), desc="predict"):
        chunk = files[start:start + batch_size]
        images = torch.stack([resize_image(load_image(p), cfg.data.image_size, cfg.data.resize,
                                           cfg.data.crop_size) for p, _ in chunk])
        pred = method.predict(images.to(device))
        for (path, name), image, amap, score in zip(chunk, images, pred.anomaly_map, pred.score):
            results.append((path, name, image.permute(1, 2, 0).numpy(), amap[0].float().cpu().numpy(), float(score)))
    vmin = float(np.percentile(np.stack([r[3] for r in results]), 1))
    vmax = float(max(r[3].max() for r in results))
    for path, name, image, amap, score in results:
        save_float_map(output_dir / "maps" / f"{name}.tiff", amap)
        save_png(output_dir / "overlays" / f"{name}.png", heatmap_overlay(image, amap, vmin, vmax))
        rows.append({"path": str(path), "score": score})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "score"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output_dir / "scores.csv", lambda fh: fh.write(buffer.getvalue().encode()))
    return rows
