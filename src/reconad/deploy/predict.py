"""Predictions with decisions: a torch predictor for run folders, ``open_predictor`` and ``predict_folder``.

``predict_folder`` streams images in batches and writes, per image, the float map (TIFF), the predicted mask
(PNG), a figure, and a row of ``scores.csv``; no list of maps is kept.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReconadError
from .calibration import Calibration, load_calibration
from .runtime import EXPORT_FILE, DetectorResult, ImageInput, load_rgb, make_result, threshold_source

__all__ = ["PredictSummary", "RunPredictor", "open_predictor", "predict_folder"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
CSV_COLUMNS = ["path", "score", "normalised_score", "label", "threshold", "flagged_pixels"]
NO_THRESHOLD = ("no threshold exists for this run: labels and masks are left empty; make one with "
                "`reconad calibrate RUN [--normal DIR]` or pass --threshold")


class RunPredictor:
    """The trained model of a run folder behind the same interface as the torch-free ``Detector``."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", batch_size: int = 8):
        from ..run import load, read_run_config

        self.run_dir, self.device, self.batch_size = Path(run_dir), device, batch_size
        self.config = read_run_config(run_dir)
        self.method = load(run_dir, device)
        if self.config.eval.trace:
            # the one eval.* switch a predictor takes from the run: it replays the eager forward bit for bit, so the
            # predictions stay the reference the others are checked against (reconad.acceleration.TracedForward)
            from ..acceleration import trace_forward

            trace_forward(self.method.eval())
        self.calibration = load_calibration(run_dir)
        data = self.config.data
        self.image_size = int(data.crop_size or data.image_size)
        self.metadata: dict[str, Any] = {
            "method": self.config.method, "backbone": self.config.backbone.name, "image_size": self.image_size,
            "resize_size": int(data.image_size), "resize": data.resize, "crop_size": data.crop_size,
            "threshold": self.calibration.image_threshold if self.calibration else None,
            "threshold_source": threshold_source(self.calibration), "run_dir": str(run_dir),
            "parity": None,  # eager PyTorch is the reference itself
        }

    @property
    def traced(self) -> bool:
        from ..acceleration import TracedForward

        return isinstance(self.method.forward, TracedForward)

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Record (and check) the trace of every batch size before the first request instead of during it.

        Only a traced run (``eval.trace``) has anything to prepare: its first batch of each size pays a trace and
        two forwards (serve.md). Random images stand in for requests: every method's forward branches on shapes and
        on the model's state only, never on pixel values, so a trace recorded on them is the one real images get.
        """
        if not self.traced:
            return
        import torch

        from ..progress import progress

        sizes = sorted(set(batch_sizes))
        log.info("eval.trace: tracing the forward for batch sizes %s before serving", sizes)
        generator = torch.Generator().manual_seed(0)
        for size in progress(sizes, desc="tracing batch sizes"):
            self.run(torch.rand(size, 3, self.image_size, self.image_size, generator=generator).numpy())

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """The training pipeline's ``load_image`` + ``resize_image`` (paths) or their array/PIL equivalent."""
        from ..data import load_image, resize_image

        d = self.config.data
        rgb = load_image(image) if isinstance(image, (str, Path)) else load_rgb(image)
        return resize_image(rgb, d.image_size, d.resize, d.crop_size).numpy()

    def run(self, images01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        pred = self.method.predict(torch.from_numpy(np.ascontiguousarray(images01, np.float32)).to(self.device))
        return pred.anomaly_map.float().cpu().numpy(), pred.score.float().cpu().numpy()

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[DetectorResult]:
        out: list[DetectorResult] = []
        for start in range(0, len(images), self.batch_size):
            maps, scores = self.run(np.stack([self.preprocess(i) for i in images[start:start + self.batch_size]]))
            out += [make_result(m[0], s, self.calibration, threshold) for m, s in zip(maps, scores)]
        return out

    def predict(self, image: ImageInput, threshold: float | None = None) -> DetectorResult:
        return self.predict_batch([image], threshold)[0]


def open_predictor(path: str | Path, device: str = "cpu", batch_size: int = 8) -> Any:
    """A run folder → :class:`RunPredictor` (torch); an ONNX export folder → the torch-free ``Detector``.

    ``device`` of an export folder: ``cpu`` or ``cuda`` (onnxruntime's providers), or ``openvino`` /
    ``openvino:<device>`` (OpenVINO, its CPU plugin unless a device is named).
    """
    from ..run import CONFIG_FILE

    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        from .runtime import Detector

        return Detector(path, batch_size=batch_size, **export_runtime(str(device)))
    if (path / CONFIG_FILE).is_file():
        if str(device).startswith("openvino"):
            raise ReconadError(f"device {device!r} runs ONNX export folders, and {path} is a run folder; export it "
                               f"first (`reconad export {path} --format onnx --output EXPORT_DIR`) and pass EXPORT_DIR")
        return RunPredictor(path, device, batch_size)
    raise ReconadError(f"{path} is neither a run folder ({CONFIG_FILE}) nor an export folder ({EXPORT_FILE})")


def export_runtime(device: str) -> dict[str, Any]:
    """``Detector`` arguments for ``device``: the engine and where it runs."""
    if device.startswith("openvino"):
        return {"engine": "openvino", "openvino_device": device.partition(":")[2] or "CPU"}
    if device.startswith("cuda"):
        return {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    return {}


# -- folders of images ------------------------------------------------------------------------------------------
def image_files(inputs: str | Path | Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, output name): the path relative to the folder given (suffix kept, so a.png and a.jpg differ)."""
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        root = Path(inputs)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ReconadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {inputs}")
        return [(p, p.relative_to(root).as_posix()) for p in files]
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ReconadError(f"image file(s) not found: {', '.join(missing)}")
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        raise ReconadError("several input files share a file name; pass their common folder instead")
    return list(zip(paths, names))


def find_mask(masks: Path | None, name: str) -> Path | None:
    """The ground-truth mask of ``name`` in ``masks``: same relative path, or ``<stem>_mask.<ext>``, any suffix."""
    if masks is None:
        return None
    rel = Path(name)
    for stem in (rel.with_suffix(""), rel.with_name(rel.stem + "_mask")):
        for suffix in (rel.suffix, ".png", ".bmp", ".tif", ".tiff", ".jpg"):
            candidate = masks / stem.with_suffix(suffix)
            if candidate.is_file():
                return candidate
    return None


@dataclass
class PredictSummary:
    n_images: int
    n_flagged: int | None
    threshold: float | None
    threshold_source: str | None
    output_dir: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        if self.threshold is None:
            return f"{self.n_images} images scored; {NO_THRESHOLD}"
        return (f"{self.n_images} images, {self.n_flagged} flagged anomalous at threshold {self.threshold:.6g} "
                f"({self.threshold_source}); outputs in {self.output_dir}")

    # list-like access keeps ``reconad.predict(...)`` usable as the list of rows it used to return
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ReconadError(f"{output_dir} is a file; choose another --output folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ReconadError(f"{output_dir} already holds files; choose an empty --output folder or pass --overwrite")


def _decision_threshold(calibration: Calibration | None, threshold: float | None, far: float | None
                        ) -> tuple[float | None, str | None]:
    if threshold is not None and far is not None:
        raise ReconadError("pass either --threshold or --far, not both")
    if threshold is not None:
        return float(threshold), "given (--threshold)"
    if far is not None:
        if calibration is None:
            raise ReconadError(f"--far needs a calibration; {NO_THRESHOLD.split(': ', 1)[1]}")
        return calibration.at_far(far).image_threshold, \
            f"conformal FAR {far:g} on {calibration.n_images} normal images ({calibration.source})"
    if calibration is None:
        return None, None
    return calibration.image_threshold, threshold_source(calibration)


def predict_folder(run_dir: str | Path, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
                   device: str = "cpu", batch_size: int = 8, *, threshold: float | None = None,
                   far: float | None = None, masks: str | Path | None = None, figures: bool = True,
                   overwrite: bool = False) -> PredictSummary:
    """Score a folder (or list) of images with a run or an export; write maps, masks, figures and scores.csv.

    Args:
        run_dir: A run folder, or an ONNX export folder (torch-free ``Detector``).
        inputs: An image file, a folder (searched recursively) or a list of files.
        output_dir: New or empty folder (``overwrite=True`` to write into a non-empty one).
        threshold: Raw image threshold overriding the calibration's.
        far: Re-derive the threshold at this false-alarm rate from the stored normal scores.
        masks: Folder of ground-truth masks (same relative names, or ``<stem>_mask.png``), drawn as contours.
        figures: Write ``figures/<name>.png`` (input | normalised heat map | overlay).
    """
    from ..progress import progress

    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    files = image_files(inputs)
    predictor = open_predictor(run_dir, device, batch_size)
    cal = predictor.calibration
    limit, source = _decision_threshold(cal, threshold, far)
    if limit is None:
        log.warning(NO_THRESHOLD)
    masks = Path(masks) if masks is not None else None
    rows: list[dict[str, Any]] = []
    n_flagged = 0
    for start in progress(range(0, len(files), batch_size), desc="predict"):
        chunk = files[start:start + batch_size]
        images = np.stack([predictor.preprocess(p) for p, _ in chunk])
        maps, scores = predictor.run(images)
        for (path, name), image, amap, score in zip(chunk, images, maps, scores):
            result = make_result(amap[0], score, cal, limit)
            n_flagged += result.label == "anomalous"
            rows.append(_write_outputs(output_dir, path, name, image, result, cal, find_mask(masks, name),
                                       predictor.metadata, figures))
    _write_csv(output_dir / "scores.csv", rows)
    summary = PredictSummary(len(rows), n_flagged if limit is not None else None, limit, source, str(output_dir), rows)
    log.info(summary.line())
    return summary


def _write_outputs(output_dir: Path, path: Path, name: str, image: np.ndarray, result: DetectorResult,
                   cal: Calibration | None, mask_path: Path | None, metadata: dict[str, Any], figures: bool
                   ) -> dict[str, Any]:
    from ..visualize import save_float_map, save_png

    save_float_map(output_dir / "maps" / f"{name}.tiff", result.anomaly_map)
    if result.mask is not None:
        save_png(output_dir / "masks" / f"{name}.png", result.mask.astype(np.uint8) * 255)
    if figures:
        truth = load_truth(mask_path, metadata) if mask_path is not None else None
        from .figures import save_prediction_figure

        save_prediction_figure(output_dir / "figures" / f"{name}.png", image.transpose(1, 2, 0), result, cal, truth)
    return {"path": str(path), "score": result.score, "normalised_score": result.normalised_score,
            "label": result.label, "threshold": result.threshold,
            "flagged_pixels": int(result.mask.sum()) if result.mask is not None else None}


def load_truth(mask_path: Path, metadata: dict[str, Any]) -> np.ndarray:
    """A ground-truth mask resized and binarised as the training pipeline does (``reconad.data.load_mask``)."""
    from ..data import load_mask

    return load_mask(mask_path, int(metadata["resize_size"]), crop_size=metadata.get("crop_size")).numpy()[0] > 0


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..fileio import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    atomic_write(path, lambda fh: fh.write(buffer.getvalue().encode()))

