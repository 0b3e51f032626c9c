"""Datasets and transforms on tiny generated folders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reconad.config import DataConfig
from reconad.data import (
    DataError,
    FolderDataset,
    MVTecDataset,
    build_datasets,
    list_categories,
    load_image,
    load_mask,
    resize_image,
)

W, H = 40, 32  # original image size (not square, not the output size)


def _rgb(seed: int, size: tuple[int, int] = (W, H)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def _mask(value: int = 255, size: tuple[int, int] = (W, H)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[8:24, 10:30] = value
    return mask


def make_mvtec(root: Path, category: str = "widget", n_train: int = 8, defects: dict | None = None) -> Path:
    """A tiny MVTec-layout category: n_train train images, 2 good test images, and masks for defects."""
    defects = {"crack": 2, "hole": 1} if defects is None else defects
    cat = root / category
    for i in range(n_train):
        _save(_rgb(i), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _save(_rgb(100 + i), cat / "test" / "good" / f"{i:03d}.png")
    for d, (defect, n) in enumerate(sorted(defects.items())):
        for i in range(n):
            _save(_rgb(200 + 10 * d + i), cat / "test" / defect / f"{i:03d}.png")
            _save(_mask(), cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


def cfg(root: Path | None = None, **kw) -> DataConfig:
    kw.setdefault("image_size", 24)
    return DataConfig(root=str(root) if root else None, category="widget" if root else None, **kw)


# ---------------------------------------------------------------------------------------------- samples


def test_samples_have_the_contracted_shapes_types_and_ranges(mvtec: Path) -> None:
    train = MVTecDataset(mvtec, "widget", "train", cfg())
    test = MVTecDataset(mvtec, "widget", "test", cfg())
    assert len(train) == 8 and len(test) == 5
    for sample in (train[0], test[0], test[len(test) - 1]):
        assert set(sample) == {"image", "mask", "label", "path", "defect"}
        assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
        assert sample["mask"].shape == (1, 24, 24) and sample["mask"].dtype == torch.float32
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert isinstance(sample["label"], int) and isinstance(sample["path"], str)
    first = train[0]
    assert first["label"] == 0 and first["defect"] == "good" and first["mask"].sum() == 0
    assert test.has_masks and not train.has_masks


def test_file_order_labels_and_good_masks(mvtec: Path) -> None:
    train = MVTecDataset(mvtec, "widget", "train", cfg())
    assert [Path(r.path).name for r in train.records] == [f"{i:03d}.png" for i in range(8)]
    test = MVTecDataset(mvtec, "widget", "test", cfg())
    assert [r.defect for r in test.records] == ["crack", "crack", "good", "good", "hole"]
    assert test.labels == [1, 1, 0, 0, 1]
    for i, rec in enumerate(test.records):
        sample = test[i]
        assert sample["defect"] == rec.defect and sample["label"] == rec.label
        assert (sample["mask"].sum() > 0) == (rec.label == 1)


def test_extensions_are_case_insensitive_and_other_files_ignored(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, n_train=1)
    good = root / "widget" / "train" / "good"
    _save(_rgb(7), good / "b.JPG")
    _save(_rgb(8), good / "c.TIFF")
    (good / "notes.txt").write_text("not an image")
    (good / ".hidden.png").write_bytes(b"x")
    names = [r.path.name for r in MVTecDataset(root, "widget", "train", cfg()).records]
    assert names == ["000.png", "b.JPG", "c.TIFF"]


def test_default_collate_batches_sample_dicts(mvtec: Path) -> None:
    batch = next(iter(DataLoader(MVTecDataset(mvtec, "widget", "test", cfg()), batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["mask"].shape == (4, 1, 24, 24)
    assert batch["label"].tolist() == [1, 1, 0, 0] and batch["defect"] == ["crack", "crack", "good", "good"]
    assert isinstance(batch["path"], list) and isinstance(batch["path"][0], str)


def test_crop_size_crops_image_and_mask(mvtec: Path) -> None:
    sample = MVTecDataset(mvtec, "widget", "test", cfg(image_size=24, crop_size=16))[0]
    assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="crop_size"):
        MVTecDataset(mvtec, "widget", "test", cfg(image_size=24, crop_size=32))


# ---------------------------------------------------------------------------------------------- masks


def _soft_mask() -> np.ndarray:
    """An intensity mask (it reaches 255): a faint 100 region and a full 255 block."""
    soft = np.zeros((H, W), np.uint8)
    soft[4:28, 4:36] = 100  # 100/255 ≈ 0.39
    soft[8:20, 10:22] = 255
    return soft


def test_mask_threshold_half_versus_zero(tmp_path: Path) -> None:
    path = _save(_soft_mask(), tmp_path / "m.png")
    resized = np.asarray(Image.open(path).resize((16, 16), Image.BILINEAR), np.float32) / 255.0
    for threshold in (0.5, 0.0):
        expected = torch.from_numpy((resized > threshold).astype(np.float32))[None]
        assert torch.equal(load_mask(path, 16, threshold), expected)
    assert 0 < load_mask(path, 16, 0.5).sum() < load_mask(path, 16, 0.0).sum()
    binary = load_mask(_save(_mask(), tmp_path / "b.png"), 16, 0.5)
    assert binary.shape == (1, 16, 16) and 0 < binary.sum() < 16 * 16


def test_mask_threshold_comes_from_config(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, defects={"crack": 1})
    _save(_soft_mask(), root / "widget" / "ground_truth" / "crack" / "000_mask.png")
    mask_at = {t: MVTecDataset(root, "widget", "test", cfg(mask_threshold=t))[0]["mask"] for t in (0.5, 0.0)}
    assert 0 < mask_at[0.5].sum() < mask_at[0.0].sum()


def test_sixteen_bit_and_label_masks_are_scaled(tmp_path: Path) -> None:
    deep = _save((_mask(1).astype(np.uint16) * 65535), tmp_path / "deep.png")
    labels = _save(_mask(1), tmp_path / "labels.png")  # a 0/1 label image
    full = load_mask(_save(_mask(), tmp_path / "full.png"), 16, 0.5)
    assert torch.equal(load_mask(deep, 16, 0.5), full)
    assert torch.equal(load_mask(labels, 16, 0.5), full)


def test_mask_with_another_size_than_its_image_raises(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, defects={"crack": 1})
    bad = _save(_mask(size=(W + 2, H)), root / "widget" / "ground_truth" / "crack" / "000_mask.png")
    test = MVTecDataset(root, "widget", "test", cfg())
    with pytest.raises(DataError) as err:
        test[0]
    message = str(err.value)
    assert str(bad) in message and str(test.records[0].path) in message
    assert f"{W + 2}x{H}" in message and f"{W}x{H}" in message


# ---------------------------------------------------------------------------------------------- image modes


def test_grayscale_is_replicated_to_three_equal_channels(tmp_path: Path) -> None:
    img = load_image(_save(np.full((H, W), 77, np.uint8), tmp_path / "g.png"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (H, W, 3) and (arr == 77).all()


def test_alpha_is_dropped_without_compositing(tmp_path: Path) -> None:
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = 0  # fully transparent: the stored colour is still what we get
    assert (np.asarray(load_image(_save(rgba, tmp_path / "a.png"))) == (10, 200, 30)).all()
    la = np.stack([np.full((H, W), 90, np.uint8), np.full((H, W), 5, np.uint8)], axis=-1)
    assert (np.asarray(load_image(_save(la, tmp_path / "la.png", "LA"))) == 90).all()


def test_palette_images_use_their_palette(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img.info["transparency"] = 1
    path = tmp_path / "p.png"
    img.save(path, transparency=1)
    arr = np.asarray(load_image(path))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 1]) == (0, 0, 255) and tuple(arr[1, 3]) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32), "I")
    path = tmp_path / ("i16.png" if mode == "I;16" else "i32.tif")  # PNG cannot store mode I
    img.save(path)
    assert Image.open(path).mode == mode
    tensor = resize_image(load_image(path), 4)  # same width, so resizing rows is identity
    row = tensor[0, 0]
    assert row[0] == 0.0 and row[3] == 1.0
    assert abs(row[1].item() - 1 / 255) < 1e-6 and abs(row[2].item() - 0.502) < 1e-3
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_sixteen_bit_big_endian_tiff(tmp_path: Path) -> None:
    img = Image.frombytes("I;16B", (2, 1), np.array([32896, 65535], ">u2").tobytes())
    path = tmp_path / "b.tif"
    img.save(path)
    arr = np.asarray(load_image(path))
    assert arr[0, 0, 0] == 128 and arr[0, 1, 0] == 255


def test_pil_and_cv2_resize_differ_when_downsampling_high_frequencies() -> None:
    noise = np.random.default_rng(0).integers(0, 2, (64, 64, 1), dtype=np.uint8).repeat(3, axis=-1) * 255
    img = Image.fromarray(noise)  # per-pixel noise: PIL averages it away, cv2 INTER_LINEAR keeps sampling it
    pil, cv = resize_image(img, 16, "pil"), resize_image(img, 16, "cv2")
    assert pil.shape == cv.shape == (3, 16, 16) and pil.dtype == cv.dtype == torch.float32
    assert pil.std() < 0.6 * cv.std()
    assert (pil - cv).abs().max() > 0.1
    same = resize_image(img, 64, "cv2")
    assert torch.allclose(same, resize_image(img, 64, "pil"))
    with pytest.raises(ValueError, match="backend"):
        resize_image(img, 16, "nearest")  # type: ignore[arg-type]


def test_resize_matches_the_official_pipelines(tmp_path: Path) -> None:
    import cv2
    from torchvision import transforms
    img = Image.fromarray(_rgb(3, (70, 50)))
    # RD4AD/ReContrast: Resize((S, S)) on PIL, ToTensor, CenterCrop
    ref = transforms.Compose([transforms.Resize((24, 24)), transforms.ToTensor(), transforms.CenterCrop(20)])(img)
    assert torch.equal(resize_image(img, 24, "pil", crop_size=20), ref)
    # RD++: float64 /255, cv2.resize INTER_LINEAR, float32
    ref = torch.from_numpy(cv2.resize(np.asarray(img) / 255.0, (24, 24)).transpose(2, 0, 1).copy()).float()
    assert torch.equal(resize_image(img, 24, "cv2"), ref)
    # masks: Resize on the PIL mask, ToTensor, > threshold
    mask = _save(_mask(size=(70, 50)) // 2 + 60, tmp_path / "m.png")
    ref = transforms.Compose([transforms.Resize((24, 24)), transforms.ToTensor()])(Image.open(mask))
    for threshold in (0.0, 0.5):
        assert torch.equal(load_mask(mask, 24, threshold), (ref > threshold).float())


def test_resize_backend_comes_from_config(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, n_train=1)
    a = MVTecDataset(root, "widget", "train", cfg(resize="pil"))[0]["image"]
    b = MVTecDataset(root, "widget", "train", cfg(resize="cv2"))[0]["image"]
    assert a.shape == b.shape and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- holdout


def _names(dataset) -> list[str]:
    return [r.path.name for r in dataset.records]


def test_holdout_split_sizes_determinism_and_disjointness(mvtec: Path) -> None:
    train, holdout, test = build_datasets(cfg(mvtec, holdout_fraction=0.25, holdout_seed=3), views=lambda x: {})
    assert len(train) == 6 and len(holdout) == 2 and len(test) == 5
    assert set(_names(train)).isdisjoint(_names(holdout))
    assert sorted(_names(train) + _names(holdout)) == [f"{i:03d}.png" for i in range(8)]
    assert holdout.views is None and train.views is not None
    again = build_datasets(cfg(mvtec, holdout_fraction=0.25, holdout_seed=3))[1]
    assert _names(again) == _names(holdout)
    others = {tuple(_names(build_datasets(cfg(mvtec, holdout_fraction=0.25, holdout_seed=s))[1])) for s in range(6)}
    assert len(others) > 1


def test_holdout_keeps_at_least_one_and_leaves_something_to_train(mvtec: Path) -> None:
    train, holdout, _ = build_datasets(cfg(mvtec, holdout_fraction=0.01))
    assert len(holdout) == 1 and len(train) == 7
    assert build_datasets(cfg(mvtec))[1] is None
    with pytest.raises(DataError, match="none to train on"):
        build_datasets(cfg(make_mvtec(mvtec.parent / "one", n_train=1), holdout_fraction=0.5))
    with pytest.raises(DataError, match="holdout_fraction"):
        build_datasets(cfg(mvtec, holdout_fraction=1.0))


# ---------------------------------------------------------------------------------------------- views


def _noisy_views(image: torch.Tensor) -> dict[str, torch.Tensor]:
    # uses all three global RNGs, as method views do
    jitter = random.random() + float(np.random.rand())
    return {"noisy": image + torch.rand_like(image) * jitter, "sentinel": torch.tensor(1.0)}


def test_views_are_added_and_reproducible_per_seed_epoch_index(mvtec: Path) -> None:
    data = MVTecDataset(mvtec, "widget", "train", cfg(), views=_noisy_views, seed=7)
    a = data[1]
    assert set(a) >= {"image", "mask", "noisy", "sentinel"} and a["noisy"].shape == a["image"].shape
    assert torch.equal(data[1]["noisy"], a["noisy"])
    assert not torch.equal(data[2]["noisy"] - data[2]["image"], a["noisy"] - a["image"])
    data.set_epoch(1)
    b = data[1]
    assert not torch.equal(b["noisy"], a["noisy"])
    other = MVTecDataset(mvtec, "widget", "train", cfg(), views=_noisy_views, seed=7)
    other.set_epoch(1)
    assert torch.equal(other[1]["noisy"], b["noisy"])
    other.seed = 8
    assert not torch.equal(other[1]["noisy"], b["noisy"])


def test_views_do_not_disturb_the_global_rngs(mvtec: Path) -> None:
    data = MVTecDataset(mvtec, "widget", "train", cfg(), views=_noisy_views)

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    data[0], data[3]
    assert draws() == expected


def test_views_get_a_copy_of_the_image(mvtec: Path) -> None:
    def in_place(image: torch.Tensor) -> dict[str, torch.Tensor]:
        image.zero_()
        return {}

    data = MVTecDataset(mvtec, "widget", "train", cfg(), views=in_place)
    assert data[0]["image"].sum() > 0


# ---------------------------------------------------------------------------------------------- errors


def test_missing_root_names_it_and_the_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        MVTecDataset(missing, "widget", "train", cfg())
    assert str(missing) in str(err.value) and "train/good" in str(err.value)


def test_missing_category_lists_the_found_ones(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "cable")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["bottle", "cable"]
    with pytest.raises(DataError) as err:
        MVTecDataset(tmp_path, "widget", "train", cfg())
    assert "widget" in str(err.value) and "bottle, cable" in str(err.value) and str(tmp_path) in str(err.value)


def test_empty_train_folder_is_named(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, n_train=0)
    (root / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        MVTecDataset(root, "widget", "train", cfg())
    assert str(root / "widget" / "train" / "good") in str(err.value)


def test_no_test_images(tmp_path: Path) -> None:
    root = tmp_path
    _save(_rgb(0), root / "widget" / "train" / "good" / "0.png")
    (root / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="No test images"):
        MVTecDataset(root, "widget", "test", cfg())


def test_truncated_image_fails_on_load_naming_the_file(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, n_train=2)
    path = root / "widget" / "train" / "good" / "001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dataset = MVTecDataset(root, "widget", "train", cfg())
    dataset[0]
    with pytest.raises(DataError) as err:
        dataset[1]
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match="junk.png"):
        load_image(junk)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    root = make_mvtec(tmp_path / "ds", n_train=2)
    empty = root / "widget" / "train" / "good" / "001.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        MVTecDataset(root, "widget", "train", cfg())  # caught cheaply at construction
    assert str(empty) in str(err.value)


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, defects={"crack": 1})
    (root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError) as err:
        MVTecDataset(root, "widget", "test", cfg())
    assert str(root / "widget" / "ground_truth" / "crack" / "000_mask.png") in str(err.value)
    loose = MVTecDataset(root, "widget", "test", cfg(), require_masks=False)
    assert not loose.has_masks and loose[0]["mask"].sum() == 0 and loose[0]["label"] == 1


def test_masks_named_like_their_image_are_found(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, defects={"bad": 1})
    gt = root / "widget" / "ground_truth" / "bad"
    (gt / "000_mask.png").rename(gt / "000.png")  # prepared VisA-style naming
    test = MVTecDataset(root, "widget", "test", cfg())
    assert test.records[0].mask == gt / "000.png" and test[0]["mask"].sum() > 0


def test_config_errors(tmp_path: Path, mvtec: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        build_datasets(DataConfig())
    with pytest.raises(DataError, match="widget"):
        build_datasets(DataConfig(root=str(mvtec)))  # no category: the message lists the found ones
    with pytest.raises(DataError, match="known layouts: btad, folder, loco, mvtec, visa"):
        DataConfig(root=str(mvtec), category="widget", layout="zip")
    changed = DataConfig(root=str(mvtec), category="widget")
    changed.layout = "zip"  # set after construction: build_datasets checks again
    with pytest.raises(DataError, match="Unknown data.layout 'zip'"):
        build_datasets(changed)


# ---------------------------------------------------------------------------------------------- folder layout


def make_folders(root: Path, masks: str | None = "_mask") -> Path:
    for i in range(5):
        _save(_rgb(i), root / "normal_train" / f"{i}.png")
    for i in range(2):
        _save(_rgb(50 + i), root / "normal_test" / f"n{i}.jpg")
        _save(_rgb(60 + i), root / "defective" / f"a{i}.png")
        if masks is not None:
            _save(_mask(), root / "masks" / f"a{i}{masks}.png")
    return root


def folder_cfg(root: Path, mask_dir: str | None = "masks", **kw) -> DataConfig:
    return DataConfig(
        root=str(root),
        layout="folder",
        train_dir="normal_train",
        normal_dir=str(root / "normal_test"),  # absolute works as well as relative
        anomalous_dir="defective",
        mask_dir=mask_dir,
        image_size=16,
        **kw,
    )


@pytest.mark.parametrize("suffix", ["_mask", ""])
def test_folder_layout_with_masks(tmp_path: Path, suffix: str) -> None:
    root = make_folders(tmp_path, masks=suffix)
    train, holdout, test = build_datasets(folder_cfg(root, holdout_fraction=0.2))
    assert len(train) == 4 and len(holdout) == 1 and len(test) == 4
    assert test.labels == [0, 0, 1, 1] and test.has_masks
    assert [test[i]["defect"] for i in range(4)] == ["good", "good", "defective", "defective"]
    assert test[3]["mask"].sum() > 0 and test[0]["mask"].sum() == 0
    assert isinstance(train, FolderDataset) and train[0]["image"].shape == (3, 16, 16)


def test_folder_layout_without_masks(tmp_path: Path) -> None:
    root = make_folders(tmp_path, masks=None)
    train, _, test = build_datasets(folder_cfg(root, mask_dir=None))
    assert not test.has_masks and test.labels == [0, 0, 1, 1]
    assert all(test[i]["mask"].sum() == 0 for i in range(4))


def test_folder_layout_errors(tmp_path: Path) -> None:
    root = make_folders(tmp_path)
    (root / "masks" / "a1_mask.png").unlink()
    with pytest.raises(DataError) as err:
        build_datasets(folder_cfg(root))
    assert str(root / "defective" / "a1.png") in str(err.value)
    with pytest.raises(DataError, match="train_dir"):
        FolderDataset(root, "train", DataConfig(layout="folder"))
    with pytest.raises(DataError, match=str(root / "nowhere")):
        FolderDataset(root, "train", DataConfig(layout="folder", train_dir="nowhere"))
