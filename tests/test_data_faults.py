"""Faults in dataset files: each bad input is generated, and gives a DataError naming the file (or is handled as
users expect: hidden files ignored, odd image modes converted)."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from reconad.config import DataConfig
from reconad.data import DataError, MVTecDataset, build_datasets, load_image, load_mask
from reconad.errors import ReconadError

W, H = 40, 32


def _save(arr: np.ndarray, path: Path, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path, **kw)
    return path


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 10:30] = 255
    return mask


def make_mvtec(root: Path) -> Path:
    cat = root / "widget"
    for i in range(3):
        _save(_rgb(i), cat / "train" / "good" / f"{i:03d}.png")
    _save(_rgb(10), cat / "test" / "good" / "000.png")
    _save(_rgb(20), cat / "test" / "crack" / "000.png")
    _save(_mask(), cat / "ground_truth" / "crack" / "000_mask.png")
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), category="widget", image_size=16, **kw)


def _names_file(err: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(err.value, ReconadError)
    assert str(path) in str(err.value), str(err.value)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_the_file_on_load(root: Path, suffix: str) -> None:
    path = _save(_rgb(5), root / "widget" / "train" / "good" / f"003{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    dataset = MVTecDataset(root, "widget", "train", cfg(root))
    with pytest.raises(DataError) as err:
        next(iter(DataLoader(dataset, batch_size=4)))
    _names_file(err, path)
    assert "re-download or re-export" in str(err.value)


def test_zero_byte_file_is_caught_at_construction(root: Path) -> None:
    empty = root / "widget" / "test" / "crack" / "001.png"
    empty.write_bytes(b"")
    _save(_mask(), root / "widget" / "ground_truth" / "crack" / "001_mask.png")
    with pytest.raises(DataError, match="Empty file") as err:
        build_datasets(cfg(root))
    _names_file(err, empty)


def test_zero_byte_mask_is_caught_at_construction(root: Path) -> None:
    mask = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    mask.write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(root))
    _names_file(err, mask)


@pytest.mark.parametrize("content", [b"<html>not found</html>", b"\x89PNG\r\n\x1a\n garbage", b"GIF89a"])
def test_a_non_image_with_an_image_suffix(root: Path, content: bytes) -> None:
    fake = root / "widget" / "train" / "good" / "zzz.png"
    fake.write_bytes(content)
    dataset = MVTecDataset(root, "widget", "train", cfg(root))
    with pytest.raises(DataError, match="not an image") as err:
        dataset[3]
    _names_file(err, fake)


def test_a_mask_that_is_not_an_image(root: Path) -> None:
    mask = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    mask.write_text("P1 nonsense")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(root))  # the construction-time check that masks mark something decodes it
    _names_file(err, mask)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` grey pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(40_000, 40_000))  # 1.6 gigapixels in 100 bytes
    with pytest.raises(DataError, match="too large to decode safely") as err:
        load_image(bomb)
    _names_file(err, bomb)
    with pytest.raises(DataError, match="too large") as err:
        load_mask(bomb, 16)
    _names_file(err, bomb)


def test_pil_bomb_warning_is_an_error_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_rgb(0), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H - 1)  # over the limit, under twice it: PIL only warns
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS") as err:
        load_image(path)
    _names_file(err, path)


def test_a_folder_with_an_image_name(tmp_path: Path) -> None:
    (tmp_path / "x.png").mkdir()
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "x.png")
    _names_file(err, tmp_path / "x.png")


def test_a_broken_link_is_named(root: Path) -> None:
    link = root / "widget" / "train" / "good" / "linked.png"
    link.symlink_to(root / "nowhere.png")
    with pytest.raises(DataError, match="broken symbolic link") as err:
        MVTecDataset(root, "widget", "train", cfg(root))
    _names_file(err, link)


# ---------------------------------------------------------------------------------------------- odd modes


def _cmyk(path: Path) -> Path:
    Image.new("CMYK", (W, H), (0, 255, 0, 0)).save(path)  # full magenta ink
    return path


ODD_MODES = {
    "CMYK": (lambda d: _cmyk(d / "cmyk.jpg"), None),
    "I;16": (lambda d: _save(np.full((H, W), 65535, np.uint16), d / "i16.png"), (255, 255, 255)),
    "I": (lambda d: _save(np.full((H, W), 32896, np.int32), d / "i32.tif", "I"), (128, 128, 128)),
    "F": (lambda d: _save(np.full((H, W), 0.5, np.float32), d / "f.tif"), (128, 128, 128)),
    "LA": (lambda d: _save(np.dstack([np.full((H, W), 90, np.uint8)] * 2), d / "la.png", "LA"), (90, 90, 90)),
    "1": (lambda d: _save(np.ones((H, W), bool), d / "one.png"), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", sorted(ODD_MODES))
def test_odd_modes_load_as_rgb(tmp_path: Path, mode: str) -> None:
    make, expected = ODD_MODES[mode]
    path = make(tmp_path)
    assert Image.open(path).mode == mode
    arr = np.asarray(load_image(path))
    assert arr.shape == (H, W, 3) and arr.dtype == np.uint8
    if expected is not None:
        assert (arr == expected).all()
    else:  # magenta ink on white paper
        assert arr[..., 0].min() > 200 and arr[..., 1].max() < 60 and arr[..., 2].min() > 200


def test_palette_with_transparency_loads_its_colours(tmp_path: Path) -> None:
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = tmp_path / "p.png"
    img.save(path, transparency=1)
    assert (np.asarray(load_image(path)) == (10, 200, 30)).all()


def test_out_of_range_float_and_32_bit_images_are_named(tmp_path: Path) -> None:
    float_path = _save(np.full((H, W), 3.0, np.float32), tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"\[0, 1\]") as err:
        load_image(float_path)
    _names_file(err, float_path)
    deep = _save(np.full((H, W), 70000, np.int32), tmp_path / "deep.tif", "I")
    with pytest.raises(DataError, match="16-bit") as err:
        load_image(deep)
    _names_file(err, deep)


def test_a_mask_with_nan_or_negative_values_is_named(tmp_path: Path) -> None:
    nan = _save(np.full((H, W), np.nan, np.float32), tmp_path / "nan.tif")
    with pytest.raises(DataError, match="NaN") as err:
        load_mask(nan, 16)
    _names_file(err, nan)
    negative = _save(np.full((H, W), -1, np.int32), tmp_path / "neg.tif", "I")
    with pytest.raises(DataError, match="negative") as err:
        load_mask(negative, 16)
    _names_file(err, negative)


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicate_stems_among_anomalous_images_are_an_error(root: Path) -> None:
    twin = _save(_rgb(21), root / "widget" / "test" / "crack" / "000.jpg")
    with pytest.raises(DataError, match="share the name '000'") as err:
        build_datasets(cfg(root))
    _names_file(err, twin.parent)
    assert "000.png" in str(err.value) and "000.jpg" in str(err.value)


def test_duplicate_stems_among_masks_are_an_error(root: Path) -> None:
    _save(_mask(), root / "widget" / "ground_truth" / "crack" / "000_mask.bmp")
    with pytest.raises(DataError, match="ambiguous") as err:
        build_datasets(cfg(root))
    assert "000_mask.bmp" in str(err.value) and "000_mask.png" in str(err.value)


def test_duplicate_stems_in_training_images_are_both_used(root: Path) -> None:
    _save(_rgb(30), root / "widget" / "train" / "good" / "000.jpg")
    names = [r.path.name for r in MVTecDataset(root, "widget", "train", cfg(root)).records]
    assert names == ["000.jpg", "000.png", "001.png", "002.png"]


# ---------------------------------------------------------------------------------------------- copied folders


def test_hidden_and_system_files_are_ignored(root: Path) -> None:
    cat = root / "widget"
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "train" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (cat / "train" / "good" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (cat / "test" / "crack" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    (cat / "ground_truth" / "crack" / "._000_mask.png").write_bytes(b"\x00\x05\x16\x07")
    (cat / "test" / ".ipynb_checkpoints").mkdir()
    _save(_rgb(40), cat / "test" / "__MACOSX" / "000.png")
    (cat / "test" / "README.txt").write_text("a stray file in test/ is not a defect folder")
    (root / ".DS_Store").write_bytes(b"\x00")
    train, _, test = build_datasets(cfg(root))
    assert [r.path.name for r in train.records] == ["000.png", "001.png", "002.png"]
    assert [(r.defect, r.path.name) for r in test.records] == [("crack", "000.png"), ("good", "000.png")]
    assert test.has_masks and test[0]["mask"].sum() > 0


def test_a_file_where_a_folder_is_expected(tmp_path: Path) -> None:
    def replaced_by_a_file(folder: Path) -> Path:
        shutil.rmtree(folder)
        folder.write_text("oops")
        return folder

    root = make_mvtec(tmp_path / "a")
    good = replaced_by_a_file(root / "widget" / "train" / "good")
    with pytest.raises(DataError, match="is a file, but a folder is expected") as err:
        build_datasets(cfg(root))
    _names_file(err, good)

    root = make_mvtec(tmp_path / "b")
    gt = replaced_by_a_file(root / "widget" / "ground_truth" / "crack")
    with pytest.raises(DataError, match="is a file") as err:
        build_datasets(cfg(root))
    _names_file(err, gt)

    as_file = tmp_path / "root.txt"
    as_file.write_text("not a folder")
    with pytest.raises(DataError, match="is a file") as err:
        build_datasets(cfg(as_file))
    _names_file(err, as_file)
