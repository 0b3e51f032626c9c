"""Shared fixtures: one torch thread, tiny generated MVTec-layout data, small random-init backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth periodic stripe texture with mild noise: easy to learn as 'normal'."""
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.3 * np.sin(2 * np.pi * xx / 8 + phase)[..., None] * np.array([1.0, 0.8, 0.6])
    return np.clip(base + rng.normal(0, 0.03, (size, size, 3)), 0, 1)


def write_tiny_mvtec(root: Path, category: str = "stripes", n_train: int = 8, n_good: int = 3, n_bad: int = 3,
                     size: int = 32, seed: int = 0) -> Path:
    """root/category/{train/good, test/{good,blob}, ground_truth/blob} with square defects and masks."""
    rng = np.random.default_rng(seed)
    cat = root / category
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (cat / sub).mkdir(parents=True, exist_ok=True)

    def save(path: Path, arr: np.ndarray) -> None:
        Image.fromarray((arr * 255).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(cat / "train/good" / f"{i:03d}.png", _texture(rng, size))
    for i in range(n_good):
        save(cat / "test/good" / f"{i:03d}.png", _texture(rng, size))
    for i in range(n_bad):
        img, mask = _texture(rng, size), np.zeros((size, size), np.float64)
        y, x = rng.integers(2, size - 12, 2)
        img[y:y + 8, x:x + 8] = [0.9, 0.1, 0.1]
        mask[y:y + 8, x:x + 8] = 1
        save(cat / "test/blob" / f"{i:03d}.png", img)
        Image.fromarray((mask * 255).astype(np.uint8)).save(cat / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    return write_tiny_mvtec(tmp_path / "data")


@pytest.fixture
def tiny_backbone():
    from reconad.backbones import create_backbone

    def make(name: str = "resnet18", trainable: bool = False):
        torch.manual_seed(0)
        return create_backbone(name, weights=None, trainable=trainable)

    return make


def tiny_run_overrides(root: Path, **train) -> dict:
    """Sections for make_config: tiny data, random resnet18, a few iterations on the CPU."""
    return {
        "data": {"root": str(root), "category": "stripes", "image_size": 32, "batch_size": 4, "eval_batch_size": 4},
        "backbone": {"name": "resnet18", "weights": None},
        "train": {"iterations": 4, "accelerator": "cpu", "log_every": 1, **train},
        "eval": {"overlays": 2, "examples": 0},
    }
