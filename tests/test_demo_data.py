"""The built-in demo dataset: layout, masks, caching, atomicity and determinism."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconad.config import DataConfig
from reconad.data import DEMO_CATEGORIES, DataError, MVTecDataset, ensure_demo_data, list_categories
from reconad.data import demo as demo_module


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    np.random.seed(1)  # generation must not depend on the global RNGs (checked in the determinism test)
    random.seed(1)
    return ensure_demo_data(tmp_path_factory.mktemp("cache") / "demo-v1")


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_for_every_category(demo_root: Path) -> None:
    assert list_categories(demo_root) == sorted(DEMO_CATEGORIES)
    for category in DEMO_CATEGORIES:
        cat = demo_root / category
        assert len(list((cat / "train" / "good").glob("*.png"))) == 48
        assert len(list((cat / "test" / "good").glob("*.png"))) == 16
        defects = sorted(p.name for p in (cat / "test").iterdir() if p.name != "good")
        assert 2 <= len(defects) <= 3
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == defects
        assert sum(len(list((cat / "test" / d).glob("*.png"))) for d in defects) in range(16, 25)


def test_masks_match_images_and_cover_one_to_eight_percent(demo_root: Path) -> None:
    for category in DEMO_CATEGORIES:
        for image_path in sorted((demo_root / category / "test").glob("*/*.png")):
            defect = image_path.parent.name
            image = Image.open(image_path)
            assert image.size == (128, 128)
            if defect == "good":
                continue
            mask = np.asarray(
                Image.open(demo_root / category / "ground_truth" / defect / f"{image_path.stem}_mask.png")
            )
            assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}
            assert 0.01 <= (mask > 0).mean() <= 0.08, image_path


def test_defects_change_the_masked_pixels(demo_root: Path) -> None:
    cat = demo_root / "tissue"
    changes = []
    for mask_path in sorted((cat / "ground_truth").glob("*/*_mask.png")):
        image = np.asarray(Image.open(cat / "test" / mask_path.parent.name / f"{mask_path.stem[:-5]}.png"), float)
        mask = np.asarray(Image.open(mask_path)) > 0
        ring = np.zeros_like(mask)  # the pixels just outside the mask, as a local reference
        ys, xs = np.nonzero(mask)
        ring[max(ys.min() - 6, 0) : ys.max() + 7, max(xs.min() - 6, 0) : xs.max() + 7] = True
        ring &= ~mask
        changes.append(np.abs(image[mask].mean(0) - image[ring].mean(0)).max())
    assert np.median(changes) > 15  # gray levels: visibly different from the surroundings


def test_second_call_returns_without_rewriting(demo_root: Path) -> None:
    files = [demo_root / "reconad_demo.json", demo_root / "cup" / "train" / "good" / "000.png"]
    before = [p.stat().st_mtime_ns for p in files]
    start = time.perf_counter()
    assert ensure_demo_data(demo_root) == demo_root
    assert time.perf_counter() - start < 0.5
    assert [p.stat().st_mtime_ns for p in files] == before


def test_generation_is_deterministic(demo_root: Path, tmp_path: Path) -> None:
    np.random.seed(2)
    random.seed(2)
    other = ensure_demo_data(tmp_path / "again")
    assert _files(other) == _files(demo_root)
    for rel in _files(demo_root):
        assert (other / rel).read_bytes() == (demo_root / rel).read_bytes(), rel


def test_loads_through_mvtec_dataset(demo_root: Path) -> None:
    cfg = DataConfig(root=str(demo_root), category="lunar", image_size=64)
    test = MVTecDataset(demo_root, "lunar", "test", cfg)
    assert len(test) == 40 and test.has_masks and sum(test.labels) == 24
    sample = test[len(test) - 1]
    assert sample["image"].shape == (3, 64, 64) and sample["label"] == 1 and sample["mask"].sum() > 0
    assert len(MVTecDataset(demo_root, "lunar", "train", cfg)) == 48


# ---------------------------------------------------------------------------------------------- small sets


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the dataset so that the cache tests below stay fast."""
    monkeypatch.setattr(demo_module, "_N_TRAIN", 2)
    monkeypatch.setattr(demo_module, "_N_TEST_GOOD", 1)
    monkeypatch.setattr(demo_module, "_N_PER_DEFECT", 1)


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    small: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = demo_module._write_category

    def crash_on_last(recipe, index, out):
        if index == len(DEMO_CATEGORIES) - 1:
            raise KeyboardInterrupt
        return real(recipe, index, out)

    monkeypatch.setattr(demo_module, "_write_category", crash_on_last)
    root = tmp_path / "demo-v1"
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(root)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(demo_module, "_write_category", real)
    assert ensure_demo_data(root) == root and (root / "reconad_demo.json").is_file()


def test_overwrite_and_outdated_versions_regenerate(small: None, tmp_path: Path) -> None:
    root = ensure_demo_data(tmp_path / "demo")
    stale = root / "cup" / "train" / "good" / "stale.png"
    stale.write_bytes(b"x")
    ensure_demo_data(root, overwrite=True)
    assert not stale.exists() and (root / "cup" / "train" / "good" / "000.png").is_file()
    marker = root / "reconad_demo.json"
    marker.write_text(marker.read_text().replace("demo-v1", "demo-v0"))
    ensure_demo_data(root)
    assert "demo-v1" in marker.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folders left


def test_refuses_to_overwrite_a_foreign_folder(small: None, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a reconad demo dataset"):
        ensure_demo_data(foreign, overwrite=True)
    assert (foreign / "important.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_demo_data(empty) / "reconad_demo.json").is_file()


def test_default_root_follows_reconad_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECONAD_CACHE", str(tmp_path))
    assert demo_module.default_demo_root() == tmp_path / "demo-v1"
    monkeypatch.delenv("RECONAD_CACHE")
    assert demo_module.default_demo_root() == Path.home() / ".cache" / "reconad" / "demo-v1"
