"""Shifted test sets: corruption formulas, the shifted-copy writer, shift evaluation, PACS/MNIST preparers."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from reconad.data import shifts
from reconad.data.prepare import mnist_idx_to_folders, prepare_mnist_m, prepare_pacs

from .conftest import tiny_run_overrides


def small_image(seed: int = 0, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_formula(severity):
    image = small_image(severity)
    x = image / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    expected = (np.clip((x - means) * c + means, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(shifts.contrast(image, severity), expected)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_brightness_formula_against_colorsys(severity):
    image = small_image(10 + severity)
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    expected = np.empty_like(image)
    for i, j in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[i, j] / 255.0))
        rgb = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        expected[i, j] = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    diff = np.abs(shifts.brightness(image, severity).astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97  # float rounding at the uint8 truncation only


def test_gaussian_noise_formula():
    image = small_image(20)
    out = shifts.gaussian_noise(image, 3, np.random.default_rng(5))
    noise = np.random.default_rng(5).normal(size=image.shape, scale=0.18)
    np.testing.assert_array_equal(out, (np.clip(image / 255.0 + noise, 0, 1) * 255).astype(np.uint8))
    flat = np.full((64, 64, 3), 128, np.uint8)
    spread = (shifts.gaussian_noise(flat, 3, np.random.default_rng(0)).astype(float) - 128).std()
    assert spread == pytest.approx(0.18 * 255, rel=0.05)


def test_defocus_disk_and_blur():
    # radius 6 (severity 3): aliased disk on a 17x17 grid, normalised, then a 3x3 Gaussian (sigma 0.5) with
    # reflect-101 borders
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= 36).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * 0.5 ** 2))
    g /= g.sum()
    expected_kernel = ndimage.correlate(disk, np.outer(g, g), mode="mirror")
    kernel = shifts.disk_kernel(6, 0.5)
    np.testing.assert_allclose(kernel, expected_kernel, atol=1e-6)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    image = small_image(30, size=40)
    x = image / 255.0
    blurred = np.stack([ndimage.correlate(x[..., c], kernel.astype(np.float64), mode="mirror") for c in range(3)], 2)
    expected = (np.clip(blurred, 0, 1) * 255).astype(np.uint8)
    diff = np.abs(shifts.defocus_blur(image, 3).astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97


def test_corrupt_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown corruption"):
        shifts.corrupt(small_image(), "fog")
    with pytest.raises(ValueError, match="severity"):
        shifts.corrupt(small_image(), "contrast", severity=6)


def test_writer_copies_every_test_folder_with_masks_reused(tiny_mvtec, tmp_path):
    out = tmp_path / "shifted"
    roots = shifts.write_shifted_dataset(tiny_mvtec, ["contrast", "gaussian_noise"], 3, out)
    assert roots == {"contrast": out / "contrast", "gaussian_noise": out / "gaussian_noise"}
    for name in roots:
        cat = out / name / "stripes"
        originals = sorted(p.relative_to(tiny_mvtec / "stripes") for p in (tiny_mvtec / "stripes/test").rglob("*.png"))
        assert sorted(p.relative_to(cat) for p in (cat / "test").rglob("*.png")) == originals
        assert sorted(p.name for p in (cat / "ground_truth/blob").iterdir()) == \
            sorted(p.name for p in (tiny_mvtec / "stripes/ground_truth/blob").iterdir())
        src = np.asarray(Image.open(tiny_mvtec / "stripes/test/blob/000.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(cat / "test/blob/000.png")),
                                      shifts.corrupt(src, name, 3, shifts._file_rng(0, name, "stripes",
                                                                                    "test/blob/000.png")))
    noisy = np.asarray(Image.open(out / "gaussian_noise/stripes/test/good/000.png")).copy()
    (out / "gaussian_noise/stripes/test/good/000.png").unlink()
    shifts.write_shifted_dataset(tiny_mvtec, ["gaussian_noise"], 3, out)  # reruns write the same image
    np.testing.assert_array_equal(np.asarray(Image.open(out / "gaussian_noise/stripes/test/good/000.png")), noisy)


def test_cli_prepare_shift_and_shift_eval_table(tiny_mvtec, tmp_path, capsys):
    from reconad.cli import main
    from reconad.config import make_config
    from reconad.engine import fit

    assert main(["prepare", "shift", "--data.root", str(tiny_mvtec), "--corruptions", "brightness",
                 "defocus_blur", "--severity", "3"]) == 0
    shift_root = shifts.default_shift_root(tiny_mvtec, 3)
    assert (shift_root / "brightness/stripes/test/blob").is_dir()
    fit(make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, iterations=1)), tmp_path / "run")
    capsys.readouterr()
    assert main(["shift-eval", str(tmp_path / "run"), "--shifts", "brightness",
                 f"blur={shift_root / 'defocus_blur'}"]) == 0
    table = capsys.readouterr().out
    assert "| run | clean | brightness | blur |" in table
    saved = json.loads((tmp_path / "run/shift_metrics.json").read_text())
    assert set(saved["metrics"]) == {"clean", "brightness", "blur"}
    assert "pixel_auroc" in saved["metrics"]["blur"]  # masks were reused


def _class_tree(root: Path, classes, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_prepare_pacs_gives_one_class_folder_sets(tmp_path):
    from reconad.config import make_config
    from reconad.data import build_datasets

    classes = ("dog", "house", "person")
    _class_tree(tmp_path / "pacs/train/photo", classes, 3, 0)
    for k, domain in enumerate(("photo", "sketch")):
        _class_tree(tmp_path / "pacs/val" / domain, classes, 2, k + 1)
    roots = prepare_pacs(tmp_path / "pacs", tmp_path / "out", domains=("photo", "sketch"), classes=classes)
    assert roots["sketch"]["dog"] == tmp_path / "out/sketch/dog"
    cfg = make_config("gnl_pacs", data={"root": str(roots["sketch"]["dog"])})
    train, _, test = build_datasets(cfg.data)
    assert len(train) == 3 and Path(train.records[0].path).resolve().parent == (tmp_path / "pacs/train/photo/dog")
    assert test.labels == [0, 0] + [1] * 4 and not test.has_masks
    assert sorted(r.path.name for r in test.records if r.label) == ["house_0.png", "house_1.png", "person_0.png",
                                                                    "person_1.png"]


def test_mnist_idx_to_folders_and_mnist_m(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4")
                                                         .tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes()
                                                         + labels.tobytes())
        if prefix == "train":
            first = imgs[0]
    mnist = mnist_idx_to_folders(raw, tmp_path / "mnist")
    assert len(list((mnist / "training/3").iterdir())) == 2
    np.testing.assert_array_equal(np.asarray(Image.open(mnist / "training/0/00000.png")), first)
    roots = prepare_mnist_m(mnist, mnist, tmp_path / "out")  # MNIST-M has the same folder layout
    assert set(roots) == {"mnist", "mnist_m"}
    assert len(list((roots["mnist_m"]["7"] / "anomalous").iterdir())) == 9
