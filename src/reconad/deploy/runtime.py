"""The torch-free runtime: ``Detector(export_dir)`` needs onnxruntime (or OpenVINO), numpy and pillow only.

Nothing here imports torch (``tests/test_deploy.py`` imports this module with torch blocked). Preprocessing
repeats the training pipeline (``reconad.data.load_image`` + ``resize_image``) in numpy/PIL; a test checks that
both give the same tensors on odd-sized, grayscale, palette and 16-bit inputs.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.image_modes import high_depth_to_uint8, to_rgb
from ..errors import ReconadError
from .calibration import Calibration, load_calibration

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "EXPORT_FILE", "Detector", "DetectorResult", "ExportError", "ImageInput", "load_rgb",
           "make_result", "make_runner", "preprocess", "resize_rgb", "threshold_source"]

EXPORT_FILE = "export.json"
ENGINES = ("onnxruntime", "openvino")
"""Runtimes that run an ONNX export: onnxruntime (default, CPU or CUDA providers) or OpenVINO (its CPU plugin)."""
ImageInput = Any  # a path, a PIL image or an (H, W[, C]) uint8/uint16 array


class ExportError(ReconadError):
    """An export cannot be made, verified or opened; the message names the step and what to do."""


# -- preprocessing (== reconad.data.transforms, without torch) --------------------------------------------------
def load_rgb(image: ImageInput) -> Image.Image:
    """An 8-bit RGB PIL image from a path, a PIL image, or an array (H×W gray, H×W×3 RGB, H×W×4 RGBA; uint8 or
    uint16, 16-bit scaled by /257 as the training loader does)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img, str(path))
        except FileNotFoundError as err:
            raise ReconadError(f"image not found: {path}") from err
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise ReconadError(f"cannot read image {path}: {err}; re-export or remove the file") from err
    if isinstance(image, Image.Image):
        return to_rgb(image, "(PIL image)")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            arr = high_depth_to_uint8(arr, "(array)")
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        arr = arr.reshape(arr.shape[:2])
        gray = arr if arr.dtype == np.uint8 else high_depth_to_uint8(arr, "(array)")
        return Image.fromarray(gray, "L").convert("RGB")
    raise ReconadError(f"an image array must be H×W, H×W×3 or H×W×4, got shape {arr.shape}")


def _cv2_linear_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of OpenCV's INTER_LINEAR (half-pixel centres, clamped at borders)."""
    scale = src / dst
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    frac[lo < 0] = 0.0
    lo = np.clip(lo, 0, src - 1)
    frac[lo >= src - 1] = 0.0
    return lo, np.minimum(lo + 1, src - 1), frac.astype(np.float64)


def _resize_cv2_like(arr: np.ndarray, size: int) -> np.ndarray:
    """``cv2.resize(arr, (size, size), INTER_LINEAR)`` on a float64 (H, W, 3) array, in numpy."""
    y0, y1, fy = _cv2_linear_weights(arr.shape[0], size)
    x0, x1, fx = _cv2_linear_weights(arr.shape[1], size)
    rows = arr[:, x0] * (1.0 - fx)[None, :, None] + arr[:, x1] * fx[None, :, None]
    return rows[y0] * (1.0 - fy)[:, None, None] + rows[y1] * fy[:, None, None]


def _center_crop(arr: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None:
        return arr
    h, w = arr.shape[-2:]
    if crop > h or crop > w:
        raise ReconadError(f"crop_size {crop} is larger than the resized image ({h}x{w})")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return arr[..., top:top + crop, left:left + crop]


def resize_rgb(img: Image.Image, size: int, resize: str = "pil", crop_size: int | None = None) -> np.ndarray:
    """float32 (3, S, S) in [0, 1], as ``reconad.data.resize_image`` (``"pil"``: PIL bilinear; ``"cv2"``: OpenCV
    INTER_LINEAR on float64, reproduced in numpy)."""
    if resize == "pil":
        arr = np.asarray(img.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1).astype(np.float32) / 255.0
    elif resize == "cv2":
        arr = _resize_cv2_like(np.asarray(img).astype(np.float64) / 255.0, size).transpose(2, 0, 1)
        arr = arr.astype(np.float32)
    else:
        raise ReconadError(f"unknown resize rule {resize!r} in the export metadata; use 'pil' or 'cv2'")
    return np.ascontiguousarray(_center_crop(arr, crop_size))


def preprocess(image: ImageInput, size: int, resize: str = "pil", crop_size: int | None = None) -> np.ndarray:
    return resize_rgb(load_rgb(image), size, resize, crop_size)


# -- results ----------------------------------------------------------------------------------------------------
@dataclass
class DetectorResult:
    """One image's prediction. Without calibration the decision fields are ``None`` (never invented)."""

    anomaly_map: np.ndarray
    """(H, W) float32 at the model's input size."""
    score: float
    normalised_score: float | None
    normalised_map: np.ndarray | None
    label: str | None
    threshold: float | None
    mask: np.ndarray | None
    """(H, W) bool: pixels above the pixel threshold."""


def make_result(anomaly_map: np.ndarray, score: float, calibration: Calibration | None,
                threshold: float | None = None) -> DetectorResult:
    """A :class:`DetectorResult`; ``threshold`` overrides the calibration's image threshold (a raw score)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    score = float(score)
    if calibration is None and threshold is None:
        return DetectorResult(amap, score, None, None, None, None, None)
    limit = threshold if threshold is not None else calibration.image_threshold
    label = "anomalous" if score > limit else "normal"
    if calibration is None:
        return DetectorResult(amap, score, None, None, label, limit, None)
    nmap = mask = None
    if calibration.pixel_threshold is not None:
        nmap = calibration.normalise_map(amap)
        mask = amap > calibration.pixel_threshold
    return DetectorResult(amap, score, float(calibration.normalise_score(score)), nmap, label, limit, mask)


def read_export_metadata(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / EXPORT_FILE
    if not path.is_file():
        raise ExportError(f"{export_dir} is not a reconad export (no {EXPORT_FILE}); make one with "
                          "`reconad export RUN --output DIR`")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path} is not valid JSON ({err}); export the run again") from err


def export_calibration(export_dir: str | Path, metadata: dict[str, Any]) -> Calibration | None:
    """``calibration.json`` in the export folder when present (a changed threshold), else export.json's copy."""
    calibration = load_calibration(export_dir)
    if calibration is None and metadata.get("calibration"):
        calibration = Calibration.from_dict(metadata["calibration"])
    return calibration


class Detector:
    """An ONNX export run by onnxruntime or OpenVINO: ``predict(image)`` → :class:`DetectorResult`. No torch needed.

    Args:
        export_dir: A folder written by ``reconad export RUN --format onnx``.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads of the runtime (default: its own choice).
        batch_size: Images per model call in :meth:`predict_batch`.
        engine: ``"onnxruntime"`` or ``"openvino"`` (``pip install 'reconad[openvino]'``).
        openvino_device: OpenVINO device name (``"CPU"``, ``"GPU"``, ...), for ``engine="openvino"``.
    """

    def __init__(self, export_dir: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 batch_size: int = 8, engine: str = "onnxruntime", openvino_device: str = "CPU"):
        self.export_dir = Path(export_dir)
        self.metadata = read_export_metadata(self.export_dir)
        if self.metadata.get("format") != "onnx":
            raise ExportError(f"{export_dir} holds a {self.metadata.get('format')} export; Detector runs ONNX "
                              "exports (`reconad export RUN --format onnx`)")
        self.calibration = export_calibration(self.export_dir, self.metadata)
        self.metadata["threshold"] = self.calibration.image_threshold if self.calibration else None
        self.metadata["threshold_source"] = threshold_source(self.calibration)
        self.image_size = int(self.metadata["image_size"])
        self.batch_size = batch_size
        self.engine = engine
        self._infer = make_runner(self.export_dir / self.metadata["model_file"], engine, providers=providers,
                                  threads=threads, openvino_device=openvino_device)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        m = self.metadata
        return preprocess(image, int(m["resize_size"]), m["resize"], m.get("crop_size"))

    def run(self, images01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw model call: (B, 3, H, W) float32 in [0, 1] → maps (B, 1, H, W), scores (B,)."""
        return self._infer(np.ascontiguousarray(images01, np.float32))

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[DetectorResult]:
        out: list[DetectorResult] = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self.preprocess(img) for img in images[start:start + self.batch_size]])
            maps, scores = self.run(batch)
            out += [make_result(m[0], s, self.calibration, threshold) for m, s in zip(maps, scores)]
        return out

    def predict(self, image: ImageInput, threshold: float | None = None) -> DetectorResult:
        return self.predict_batch([image], threshold)[0]


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(B, 3, H, W) float32 images in [0, 1] → (maps, scores), the exported graph's two outputs."""


def make_runner(model: Path, engine: str = "onnxruntime", *, providers: Sequence[str] | None = None,
                threads: int | None = None, openvino_device: str = "CPU") -> Runner:
    """The ONNX graph at ``model`` run by ``engine`` (one of :data:`ENGINES`)."""
    if engine not in ENGINES:
        raise ExportError(f"unknown runtime engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if providers and engine != "onnxruntime":
        raise ExportError(f"providers are onnxruntime's; engine {engine!r} takes openvino_device instead")
    if engine == "openvino":
        return _openvino_runner(model, threads, openvino_device)
    return _onnxruntime_runner(model, providers, threads)


def _onnxruntime_runner(model: Path, providers: Sequence[str] | None, threads: int | None) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ExportError("the runtime needs onnxruntime: pip install 'reconad[deploy]'") from err
    available = ort.get_available_providers()
    missing = [p for p in providers or () if p not in available]
    if missing:
        # onnxruntime would fall back to the next provider (the CPU) without saying so
        raise ExportError(f"onnxruntime {ort.__version__} cannot run {', '.join(missing)} here (available: "
                          f"{', '.join(available)}); for --device cuda install onnxruntime-gpu on a machine with an "
                          "NVIDIA GPU, or use --device cpu")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=list(providers or ["CPUExecutionProvider"]))
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(None, {name: images})
        return maps, scores

    return run


def _openvino_runner(model: Path, threads: int | None, device: str) -> Runner:
    """OpenVINO's compiled graph in float32. Its CPU plugin would otherwise run bf16 where the CPU has bf16
    instructions, a silent change of the maps; the precision is pinned so both engines compute the same maps."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError("engine 'openvino' needs OpenVINO: pip install 'reconad[openvino]'") from err
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    try:
        compiled = core.compile_model(_ties_by_position(core.read_model(str(model))), device, config)
    except RuntimeError as err:  # OpenVINO's message ends with the cause (e.g. a device name it does not know)
        cause = [line for line in str(err).splitlines() if line.strip()][-1]
        devices = ", ".join(core.available_devices)
        raise ExportError(f"OpenVINO cannot run {model} on device {device!r} (devices here: {devices}; virtual "
                          f"ones such as AUTO also work): {cause}") from err
    request = compiled.create_infer_request()
    maps_port, score_port = compiled.output("anomaly_map"), compiled.output("score")
    lock = threading.Lock()  # one infer request: calls from several threads take turns

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with lock:
            out = request.infer({0: images})  # copies the outputs (share_outputs=False)
            return np.asarray(out[maps_port]), np.asarray(out[score_port])

    return run


def _ties_by_position(model: Any) -> Any:
    """ONNX's TopK orders equal values by position (the spec's tie-break, = torch's stable sort); OpenVINO's ONNX
    reader maps it to a TopK with ``stable=False``, whose order among ties differs, and GNL's feature matching sorts
    values with many ties (ReLU zeros): its maps moved by 6e-3. Marking every TopK stable restores the spec."""
    marked = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "TopK" and "stable" in op.get_attributes():
            op.set_attribute("stable", True)
            marked += 1
    if marked:
        # measured (docs/performance.md): GNL's Lite0 graph at batch 8, 15.8 img/s stable vs 135 unstable vs 156
        # in ONNX Runtime, which is stable by the spec
        log.warning("this graph sorts (%d TopK, e.g. GNL's feature matching): OpenVINO's stable TopK runs it several "
                    "times slower than ONNX Runtime, which gives the same maps; engine='onnxruntime' (--device cpu) "
                    "is the faster choice for it", marked)
    return model


def threshold_source(calibration: Calibration | None) -> str | None:
    if calibration is None:
        return None
    far = f"{calibration.far:g}" if calibration.far is not None and math.isfinite(calibration.far) else "?"
    return f"conformal FAR {far} on {calibration.n_images} normal images ({calibration.source})"
