"""Turn distributed datasets into one-class anomaly-detection folders (GNL's PACS and MNIST → MNIST-M settings).

One-class protocol (official_code.md §5.5): one model per class, trained on that class only; a test domain's
images of the trained class are normal and the images of every other class are anomalous.

Output, per test domain and class (files are symbolic links to the source, or copies where links fail)::

    <output>/<domain>/<class>/train/       the class's training images (from the training domain)
    <output>/<domain>/<class>/good/        test images of the class in this domain
    <output>/<domain>/<class>/anomalous/   test images of the other classes, named <other_class>_<file>

which the ``folder`` data layout reads with ``train_dir: train, normal_dir: good, anomalous_dir: anomalous``
(the ``gnl_pacs`` and ``gnl_mnist_m`` presets), ``data.root = <output>/<training domain>/<class>``. Evaluate the
other domains with ``reconad shift-eval RUN --shifts <domain>=<output>/<domain>/<class> ...``.
See ``docs/datasets.md`` for how to obtain the sources.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .files import list_images
from .transforms import DataError

__all__ = [
    "MNIST_CLASSES",
    "PACS_CLASSES",
    "PACS_DOMAINS",
    "mnist_idx_to_folders",
    "prepare_mnist_m",
    "prepare_one_class",
    "prepare_pacs",
]

logger = logging.getLogger(__name__)

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PACS_DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
MNIST_CLASSES = tuple(str(d) for d in range(10))


def _images(folder: Path) -> list[Path]:
    return list_images(folder)


def _class_dirs(root: Path, classes: Sequence[str], what: str) -> dict[str, Path]:
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise DataError(f"{what}: class folder(s) {missing} not found in {root} (expected {root}/<class>/*)")
    return {c: root / c for c in classes}


def _place(source: Path, target: Path, copy: bool) -> None:
    if target.exists() or target.is_symlink():
        return
    if not copy:
        try:
            os.symlink(source.resolve(), target)
            return
        except OSError:  # no symlinks here: fall back to copying
            pass
    shutil.copy2(source, target)


def _fill(folder: Path, files: Sequence[tuple[Path, str]], copy: bool) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in files:
        _place(source, folder / name, copy)
    return len(files)


def prepare_one_class(train_root: str | Path, test_roots: Mapping[str, str | Path], output: str | Path,
                      classes: Sequence[str], copy: bool = False) -> dict[str, dict[str, Path]]:
    """Write the one-class folders for every (test domain, class).

    Args:
        train_root: Folder with ``<class>/`` sub-folders of training images (one domain).
        test_roots: Test domain name → folder with ``<class>/`` sub-folders of test images.
        output: Output folder.
        classes: Class folder names.
        copy: Copy files instead of linking them.

    Returns:
        Domain → class → the dataset root to pass as ``data.root``.
    """
    output = Path(output).expanduser()
    train = _class_dirs(Path(train_root).expanduser(), classes, "training set")
    roots: dict[str, dict[str, Path]] = {}
    for domain, test_root in test_roots.items():
        tests = _class_dirs(Path(test_root).expanduser(), classes, f"test domain {domain!r}")
        for cls in classes:
            root = output / domain / cls
            _fill(root / "train", [(p, p.name) for p in _images(train[cls])], copy)
            _fill(root / "good", [(p, p.name) for p in _images(tests[cls])], copy)
            others = [(p, f"{other}_{p.name}") for other in classes if other != cls for p in _images(tests[other])]
            _fill(root / "anomalous", others, copy)
            roots.setdefault(domain, {})[cls] = root
        logger.info("one-class folders of domain %s written to %s", domain, output / domain)
    return roots


def prepare_pacs(source: str | Path, output: str | Path, domains: Sequence[str] = PACS_DOMAINS,
                 classes: Sequence[str] = PACS_CLASSES, copy: bool = False) -> dict[str, dict[str, Path]]:
    """PACS as GNL uses it: train on ``train/photo/<class>``, test on ``val/<domain>/`` (official_code.md §5.5).

    Args:
        source: PACS root holding ``train/<domain>/<class>/`` and ``val/<domain>/<class>/``.
        output: Output folder.
        domains: Test domains (photo is in-distribution).
        classes: Classes, each one a one-class task.
        copy: Copy files instead of linking them.

    Returns:
        Domain → class → dataset root.
    """
    source = Path(source).expanduser()
    if not (source / "train" / "photo").is_dir() or not (source / "val").is_dir():
        raise DataError(f"{source} is not a PACS root with train/photo/<class>/ and val/<domain>/<class>/ "
                        "(see docs/datasets.md)")
    return prepare_one_class(source / "train" / "photo", {d: source / "val" / d for d in domains}, output, classes,
                             copy)


def prepare_mnist_m(mnist: str | Path, mnist_m: str | Path, output: str | Path, train_split: str = "training",
                    test_split: str = "testing", classes: Sequence[str] = MNIST_CLASSES,
                    copy: bool = False) -> dict[str, dict[str, Path]]:
    """MNIST → MNIST-M: train on MNIST ``<train_split>/<digit>``, test on MNIST and MNIST-M ``<test_split>/<digit>``.

    Args:
        mnist: MNIST as image folders (``training/<digit>/*.png``, ``testing/<digit>/*.png``; see
            :func:`mnist_idx_to_folders`).
        mnist_m: MNIST-M in the same folder layout.
        output: Output folder; domains ``mnist`` (in-distribution) and ``mnist_m``.
        train_split: Name of the training split folder.
        test_split: Name of the test split folder.
        classes: Digits.
        copy: Copy files instead of linking them.

    Returns:
        Domain → class → dataset root.
    """
    mnist, mnist_m = Path(mnist).expanduser(), Path(mnist_m).expanduser()
    return prepare_one_class(mnist / train_split, {"mnist": mnist / test_split, "mnist_m": mnist_m / test_split},
                             output, classes, copy)


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_idx_to_folders(raw_dir: str | Path, output: str | Path) -> Path:
    """MNIST's distributed IDX files (as torchvision downloads them into ``MNIST/raw``) → PNG class folders
    ``<output>/{training,testing}/<digit>/<index>.png``.

    Args:
        raw_dir: Folder with ``train-images-idx3-ubyte[.gz]`` etc.
        output: Output folder.

    Returns:
        ``output``.
    """
    raw_dir, output = Path(raw_dir).expanduser(), Path(output).expanduser()
    for split, prefix in (("training", "train"), ("testing", "t10k")):
        found = {kind: next(iter(sorted(raw_dir.glob(f"{prefix}-{kind}-idx*-ubyte*"))), None)
                 for kind in ("images", "labels")}
        if None in found.values():
            raise DataError(f"MNIST IDX files {prefix}-images/labels-idx*-ubyte not found in {raw_dir}")
        images, labels = _read_idx(found["images"]), _read_idx(found["labels"])
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = output / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return output
