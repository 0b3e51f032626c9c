"""Dataset layouts: the registry, VisA and BTAD read in place from generated miniatures of their real layouts,
image-level MVTec categories (data.masks), and mask conventions."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reconad.config import DataConfig, make_config
from reconad.data import DataError, build_datasets, list_categories, list_layouts, load_mask
from reconad.data.layouts import Layout, get_layout, register_layout

W, H = 40, 32


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def _region(value: int, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros((H, W), dtype)
    mask[8:24, 10:30] = value
    return mask


# ---------------------------------------------------------------------------------------------- registry


def test_layouts_are_listed_and_unknown_ones_name_the_known() -> None:
    assert list_layouts() == ["btad", "folder", "loco", "mvtec", "visa"]
    assert get_layout("visa").name == "visa"
    with pytest.raises(DataError, match="known layouts: btad, folder, loco, mvtec, visa"):
        get_layout("zip")
    with pytest.raises(DataError, match="known layouts"):
        make_config("rd4ad", data={"layout": "zip"})


def test_a_registered_layout_is_built_by_build_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconad.data import ImageDataset, SampleRecord, registry

    monkeypatch.setattr(registry, "_LAYOUTS", dict(registry._LAYOUTS))  # the test's layout leaves with the test

    images = [_save(_rgb(i), tmp_path / f"{i}.png") for i in range(3)]

    def make(cfg, split, views, indices, seed):
        records = [SampleRecord(p, None, int(split == "test" and i == 2), "good") for i, p in enumerate(images)]
        return ImageDataset(records, cfg, views, seed=seed)

    layout = register_layout(Layout("flat_test", "three images", make, lambda root: []))
    assert register_layout(layout) is layout  # registering the same layout again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_layout(Layout("flat_test", "other", make, lambda root: []))
    assert "flat_test" in list_layouts()
    train, _, test = build_datasets(DataConfig(layout="flat_test", image_size=16))
    assert len(train) == 3 and test.labels == [0, 0, 1]


# ---------------------------------------------------------------------------------------------- VisA


def make_visa(root: Path, mask_values: dict[str, int] | None = None) -> Path:
    """VisA as distributed: two objects, Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png, 1cls.csv."""
    mask_values = mask_values or {"candle": 255, "pcb1": 2}  # 0/255 and class-id masks both occur in VisA
    rows = []
    for obj, n_normal, n_anomaly in (("candle", 5, 2), ("pcb1", 4, 1)):
        for i in range(n_normal):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(_rgb(i), root / rel)
            rows.append([obj, "train" if i < n_normal - 2 else "test", "normal", rel, ""])
        for i in range(n_anomaly):
            rel, mask_rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _save(_rgb(100 + i), root / rel)
            _save(_region(mask_values[obj]), root / mask_rel)
            rows.append([obj, "test", "anomaly", rel, mask_rel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def visa_cfg(root: Path, category: str = "candle", **kw) -> DataConfig:
    return DataConfig(root=str(root), category=category, layout="visa", image_size=16, **kw)


@pytest.mark.parametrize("category,n_train,n_test,labels", [("candle", 3, 4, [0, 0, 1, 1]), ("pcb1", 2, 3, [0, 0, 1])])
def test_visa_split_labels_and_masks_come_from_the_csv(tmp_path: Path, category: str, n_train: int, n_test: int,
                                                       labels: list[int]) -> None:
    root = make_visa(tmp_path / "visa")
    assert list_categories(root, layout="visa") == ["candle", "pcb1"]
    train, holdout, test = build_datasets(visa_cfg(root, category))
    assert holdout is None and len(train) == n_train and len(test) == n_test
    assert all(r.label == 0 and r.path.parent.name == "Normal" for r in train.records)
    assert test.labels == labels and test.has_masks
    assert [r.path.relative_to(root).as_posix() for r in test.records][-1].startswith(f"{category}/Data/Images/Anomaly")
    expected = load_mask(_save(_region(255), tmp_path / "ref.png"), 16)
    for i, rec in enumerate(test.records):
        sample = test[i]
        assert sample["defect"] == ("anomaly" if rec.label else "good")
        assert torch.equal(sample["mask"], expected if rec.label else torch.zeros_like(expected))
    assert all(r.path.is_relative_to(root) for r in train.records + test.records)  # read in place


def test_visa_errors_name_the_csv_and_the_row(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "visa")
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(DataError) as err:
        build_datasets(visa_cfg(root))
    assert "001.png" in str(err.value) and "1cls.csv" in str(err.value) and "line" in str(err.value)
    with pytest.raises(DataError, match="Categories found: candle, pcb1"):
        build_datasets(visa_cfg(root, "capsules"))
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match="split_csv/1cls.csv"):
        build_datasets(visa_cfg(root, "pcb1"))


def test_visa_masks_none_is_image_level(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "visa")
    _, _, test = build_datasets(visa_cfg(root, masks="none"))
    assert not test.has_masks and test.labels == [0, 0, 1, 1] and test[3]["mask"].sum() == 0


# ---------------------------------------------------------------------------------------------- BTAD


def make_btad(root: Path, category: str = "01", image_suffix: str = ".bmp", mask_suffix: str = ".png") -> Path:
    cat = root / category
    for i in range(4):
        _save(_rgb(i), cat / "train" / "ok" / f"{i:04d}{image_suffix}")
    for i in range(2):
        _save(_rgb(50 + i), cat / "test" / "ok" / f"{i:04d}{image_suffix}")
    for i in range(3):
        _save(_rgb(60 + i), cat / "test" / "ko" / f"{i:04d}{image_suffix}")
        _save(_region(255), cat / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}")
    return root


@pytest.mark.parametrize("image_suffix,mask_suffix", [(".bmp", ".png"), (".png", ".png"), (".bmp", ".bmp")])
def test_btad_counts_labels_and_masks(tmp_path: Path, image_suffix: str, mask_suffix: str) -> None:
    root = make_btad(tmp_path / "btad", "01", image_suffix, mask_suffix)
    make_btad(tmp_path / "btad", "03")
    assert list_categories(root, layout="btad") == ["01", "03"]
    train, _, test = build_datasets(DataConfig(root=str(root), category="01", layout="btad", image_size=16))
    assert len(train) == 4 and test.labels == [1, 1, 1, 0, 0] and test.has_masks
    assert [r.defect for r in test.records] == ["ko"] * 3 + ["good"] * 2
    assert all(r.mask is not None and r.mask.stem == r.path.stem and r.mask.suffix == mask_suffix
               for r in test.records if r.label)
    assert test[0]["mask"].sum() > 0 and test[4]["mask"].sum() == 0


def test_btad_missing_mask_and_missing_folder(tmp_path: Path) -> None:
    root = make_btad(tmp_path / "btad")
    (root / "01/ground_truth/ko/0001.png").unlink()
    cfg = DataConfig(root=str(root), category="01", layout="btad", image_size=16)
    with pytest.raises(DataError) as err:
        build_datasets(cfg)
    assert str(root / "01/ground_truth/ko/0001.png") in str(err.value)
    for p in (root / "01/test/ok").iterdir():
        p.unlink()
    (root / "01/test/ok").rmdir()
    with pytest.raises(DataError, match=str(root / "01/test/ok")):
        build_datasets(cfg)


# --------------------------------------------------------------------------- image-level MVTec (data.masks)


def make_mvtec_without_ground_truth(root: Path) -> Path:
    for i in range(4):
        _save(_rgb(i), root / "widget" / "train" / "good" / f"{i}.png")
    _save(_rgb(10), root / "widget" / "test" / "good" / "0.png")
    _save(_rgb(11), root / "widget" / "test" / "crack" / "0.png")
    return root


def test_mvtec_category_without_ground_truth_is_image_level_and_says_so(tmp_path: Path, caplog) -> None:
    root = make_mvtec_without_ground_truth(tmp_path)
    cfg = DataConfig(root=str(root), category="widget", image_size=16)
    with caplog.at_level(logging.INFO, logger="reconad.data"):
        _, _, test = build_datasets(cfg)
    assert not test.has_masks and test.labels == [1, 0]
    assert sum("only image-level metrics" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DataError, match="No ground-truth mask"):
        build_datasets(DataConfig(root=str(root), category="widget", image_size=16, masks="required"))


def test_masks_none_ignores_existing_ground_truth(tmp_path: Path) -> None:
    root = make_mvtec_without_ground_truth(tmp_path)
    _save(_region(255), root / "widget" / "ground_truth" / "crack" / "0_mask.png")
    cfg = DataConfig(root=str(root), category="widget", image_size=16)
    assert build_datasets(cfg)[2].has_masks
    _, _, test = build_datasets(DataConfig(root=str(root), category="widget", image_size=16, masks="none"))
    assert not test.has_masks and test[0]["mask"].sum() == 0


def test_multi_category_works_for_visa(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "visa")
    train, _, test = build_datasets(DataConfig(root=str(root), categories=["candle", "pcb1"], layout="visa",
                                               image_size=16))
    assert len(train) == 5 and len(test) == 7 and test.has_masks


# ---------------------------------------------------------------------------------------------- mask conventions


def _palette_mask(tmp_path: Path) -> Path:
    img = Image.fromarray(_region(1), "L").convert("P")
    img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # VOC style: index 1 is dark red (L ≈ 38)
    path = tmp_path / "palette.png"
    img.save(path)
    return path


CONVENTIONS = {
    "8-bit 0/255": lambda d: _save(_region(255), d / "a.png"),
    "8-bit 0/1": lambda d: _save(_region(1), d / "b.png"),
    "16-bit 0/65535": lambda d: _save(_region(65535, np.uint16), d / "c.png"),
    "16-bit 0/1": lambda d: _save(_region(1, np.uint16), d / "d.png"),
    "16-bit 0/255": lambda d: _save(_region(255, np.uint16), d / "e.png"),
    "class id 3": lambda d: _save(_region(3), d / "f.png"),
    "float 0/1": lambda d: _save(_region(1, np.float32), d / "g.tif"),
    "1-bit": lambda d: _save(_region(1).astype(bool), d / "h.png"),
    "palette": _palette_mask,
    "red on black RGB": lambda d: _save(np.stack([_region(255), _region(0), _region(0)], -1), d / "i.png"),
}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_every_mask_convention_binarises_to_the_same_mask(tmp_path: Path, name: str) -> None:
    reference = load_mask(_save(_region(255), tmp_path / "reference.png"), 16, 0.5)
    assert 0 < reference.sum() < 16 * 16
    path = CONVENTIONS[name](tmp_path)
    for threshold in (0.5, 0.0):
        assert torch.equal(load_mask(path, 16, threshold), load_mask(tmp_path / "reference.png", 16, threshold))


def test_class_id_masks_mark_every_class(tmp_path: Path) -> None:
    ids = np.zeros((H, W), np.uint8)
    ids[8:16, 10:30], ids[16:24, 10:30] = 1, 2
    assert torch.equal(load_mask(_save(ids, tmp_path / "ids.png"), 16),
                       load_mask(_save(_region(255), tmp_path / "ref.png"), 16))


def test_ordinary_masks_follow_the_official_path_bit_for_bit(tmp_path: Path) -> None:
    soft = np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)
    soft[0, 0] = 255
    for name, arr in (("binary", _region(255)), ("soft", soft)):
        path = _save(arr, tmp_path / f"{name}.png")
        for threshold in (0.5, 0.0):
            resized = np.asarray(Image.open(path).resize((24, 24), Image.BILINEAR), np.float32) / 255.0
            official = torch.from_numpy((resized > threshold).astype(np.float32))[None]
            assert torch.equal(load_mask(path, 24, threshold), official)


def test_a_test_set_whose_masks_mark_nothing_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    root = make_btad(tmp_path / "btad")
    gt = root / "01" / "ground_truth" / "ko"
    for path in gt.iterdir():
        _save(np.zeros((H, W), np.uint8), path)
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(root=str(root), category="01", layout="btad", image_size=16))
    assert str(gt) in str(err.value) and "data.masks: none" in str(err.value)
