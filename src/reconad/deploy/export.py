"""Export a trained run (ONNX or TorchScript) with the whole map pipeline inside, and prove it equals eager.

The exported graph takes (B, 3, H, W) float32 RGB images in [0, 1] (dynamic B) and returns the anomaly maps
(B, 1, H, W) and scores (B,): input normalisation, backbone, per-level distances, upsampling, fusion, blur and
score are all in it; thresholds and normalisation are *not* (they are data in ``export.json`` /
``calibration.json``, so changing them needs no re-export). Resizing happens outside, by the recorded rule.

The parity record compares eager PyTorch with the exported model on real images (the run's test images, or the
given ones) at the full batch and at batch 1. Maps must agree to ``tolerance`` (absolute); scores to
``tolerance · max(1, |score|)`` (a score can be a sum over 10⁵ pixels, e.g. ssl_ae).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ReconadError
from ..maps import torch_channel_ops
from .calibration import load_calibration, write_calibration
from .runtime import EXPORT_FILE, ExportError, preprocess, read_export_metadata

__all__ = ["ExportModule", "ExportParityError", "export_run", "verify_export", "write_model"]

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
MAX_PARITY_IMAGES = 8
# (method, format, condition on the method) → (operation, the switch that avoids it); checked before any work
_UNSUPPORTED: list[tuple[str, str, Any, str, str]] = []


class ExportParityError(ExportError):
    """The exported model disagrees with eager PyTorch beyond the tolerance."""


class ExportModule(nn.Module):
    """A Method's forward as a graph-friendly module: [0, 1] images → (maps (B, 1, H, W), scores (B,))."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pred = self.method(images)
        return pred.anomaly_map, pred.score


@contextlib.contextmanager
def _pinned_python_state(method: nn.Module) -> Iterator[None]:
    """Freeze Python-level decisions that would make the captured graph value- or batch-specific.

    - ULSAD's ``calibrated`` property compares buffers (``bool(a != b)``); its value is fixed once the run is
      trained, so it is evaluated eagerly and pinned as a constant while the graph is captured.
    - GNL's ``match_per_image`` loops over the batch in Python (which would fix the batch size); the graph uses
      the batched encoder, and the parity check compares it with the eager per-image result.
    - The per-pixel cosines are torch's own functions (:func:`reconad.maps.torch_channel_ops`), the same values.
    """
    cls, cfg = type(method), method.cfg
    per_image = getattr(cfg, "match_per_image", None)
    if per_image is not None:
        cfg.match_per_image = False
    if isinstance(getattr(cls, "calibrated", None), property):
        value = bool(method.calibrated)
        method.__class__ = type(cls.__name__, (cls,), {"calibrated": property(lambda self: value),
                                                        "__module__": cls.__module__})
    try:
        with torch_channel_ops():  # torch's cosine, not a loop unrolled for this example's shape and device
            yield
    finally:
        method.__class__ = cls
        if per_image is not None:
            cfg.match_per_image = per_image


def _gnl_sorts_unstably(method: nn.Module) -> bool:
    return bool(method.cfg.match and getattr(method, "reference_fitted", False) and not method.cfg.match_stable_sort)


_UNSUPPORTED.append((
    "gnl", "onnx", _gnl_sorts_unstably,
    "test-time feature matching (EFDM) sorts features with torch's default unstable sort (the official setting), "
    "whose order among tied values (post-ReLU zeros) no exported runtime reproduces (ONNX TopK breaks ties by "
    "position, i.e. a stable sort)",
    "export with the stable sort: `reconad export RUN --override match_stable_sort=true` (for thresholds that "
    "match the export exactly, set model.match_stable_sort: true in the run's config.yaml and re-run `reconad "
    "calibrate`), or turn matching off with `--override match=false`"))


def apply_model_overrides(method: nn.Module, overrides: dict[str, Any] | None) -> None:
    """Set test-time fields of ``method.cfg`` (e.g. ``{"match_stable_sort": True}``); unknown fields raise."""
    for key, value in (overrides or {}).items():
        if not hasattr(method.cfg, key):
            raise ExportError(f"--override {key}: {method.name}'s model settings have no field {key!r}")
        setattr(method.cfg, key, value)


def _sort_as_topk(self: Any, stable: bool = False, dim: int = -1, descending: bool = False) -> Any:
    """aten.sort as ONNX TopK over the whole axis (ties in index order: torch's stable sort)."""
    from onnxscript import opset18 as op

    return op.TopK(self, op.Shape(self, start=dim, end=dim + 1) if dim != -1 else op.Shape(self, start=-1),
                   axis=dim, largest=descending, sorted=True)


def _check_exportable(method: nn.Module, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    for name, f, condition, operation, switch in _UNSUPPORTED:
        if method.name == name and f == fmt and condition(method):
            raise ExportError(f"{name} cannot be exported to {fmt}: {operation}; {switch}")


# -- sample images ----------------------------------------------------------------------------------------------
def _run_sample_images(cfg: Any, limit: int = MAX_PARITY_IMAGES) -> list[Path]:
    """Up to ``limit`` test images of the run's dataset, spread evenly over it (normal and anomalous)."""
    from ..data import build_datasets

    try:
        test = build_datasets(cfg.data)[2]
    except ReconadError as err:
        raise ExportError(f"no sample images for the parity check: the run's dataset cannot be read ({err}); "
                          "pass some real images with --images DIR") from err
    picks = sorted(set(np.linspace(0, len(test) - 1, min(limit, len(test))).round().astype(int).tolist()))
    return [Path(test[i]["path"]) for i in picks]


def _sample_paths(images: str | Path | Sequence[str | Path] | None, cfg: Any) -> list[Path]:
    if images is None:
        return _run_sample_images(cfg)
    from .predict import image_files

    return [p for p, _ in image_files(images)][:MAX_PARITY_IMAGES]


# -- exporting --------------------------------------------------------------------------------------------------
def _export_onnx(module: nn.Module, example: Tensor, path: Path, opset: int | None) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                    output_names=["anomaly_map", "score"], dynamic_shapes={"images": {0: batch}},
                                    opset_version=opset, verbose=False, report=False,
                                    custom_translation_table={torch.ops.aten.sort.stable: _sort_as_topk})
    except Exception as err:  # the exporter raises many types; the message names the failing operation
        raise ExportError(f"ONNX export failed: {_first_lines(err)}; try --format torchscript, or report the "
                          "operation") from err
    proto = _float64_convs_as_float32(program.model_proto)
    onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 1_900_000_000)


def _first_lines(err: BaseException, n: int = 3) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:n])[:500] or type(err).__name__


def _float64_convs_as_float32(model: Any) -> Any:
    """Run float64 convolutions (scipy-precision blurs, ssl_ae's box filter) in float32: onnxruntime's CPU provider
    has no float64 Conv. The parity check measures the (≈1e-7 relative) difference."""
    import onnx
    from onnx import TensorProto, helper

    if not any(t.data_type == TensorProto.DOUBLE for t in model.graph.initializer):
        return model  # no float64 weights, so no float64 Conv
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Conv" or types.get(node.input[0]) != TensorProto.DOUBLE:
            nodes.append(node)
            continue
        inputs = []
        for name in node.input:
            if not name:
                inputs.append(name)
                continue
            nodes.append(helper.make_node("Cast", [name], [f"{name}__f32_{node.name}"], to=TensorProto.FLOAT))
            inputs.append(f"{name}__f32_{node.name}")
        out = node.output[0]
        conv = helper.make_node("Conv", inputs, [f"{out}__f32"], name=node.name)
        conv.attribute.extend(node.attribute)
        nodes += [conv, helper.make_node("Cast", [f"{out}__f32"], [out], to=TensorProto.DOUBLE)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _export_torchscript(module: nn.Module, example: Tensor, path: Path) -> None:
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
    except Exception as err:
        raise ExportError(f"TorchScript export failed: {_first_lines(err)}; try --format onnx") from err


# -- running an export ------------------------------------------------------------------------------------------
def _exported_runner(export_dir: Path, metadata: dict[str, Any]) -> Any:
    """``images01 → (maps, scores)`` of an export (the torch-free Detector for ONNX)."""
    if metadata["format"] == "onnx":
        from .runtime import Detector

        return Detector(export_dir, threads=torch.get_num_threads()).run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(export_dir / metadata["model_file"]), map_location="cpu")

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            maps, scores = module(torch.from_numpy(images))
        return maps.numpy(), scores.numpy()

    return run


def _parity(method: nn.Module, export_dir: Path, metadata: dict[str, Any], paths: list[Path],
            tolerance: float) -> dict[str, Any]:
    """Eager vs exported on the same preprocessed images, at the full batch and at batch 1."""
    m = metadata
    images = np.stack([preprocess(p, int(m["resize_size"]), m["resize"], m.get("crop_size")) for p in paths])
    device = next(method.parameters()).device
    eager = method.predict(torch.from_numpy(images).to(device))
    eager_maps, eager_scores = eager.anomaly_map.float().cpu().numpy(), eager.score.float().cpu().numpy()
    run = _exported_runner(export_dir, metadata)
    maps, scores = run(images)
    one_map, one_score = run(images[:1])  # the batch axis is dynamic
    map_diff = max(float(np.abs(maps - eager_maps).max()), float(np.abs(one_map - eager_maps[:1]).max()))
    score_diff = np.abs(np.r_[scores - eager_scores, one_score - eager_scores[:1]])
    scale = np.maximum(1.0, np.abs(np.r_[eager_scores, eager_scores[:1]]))
    record = {
        "n_images": len(paths), "images": [str(p) for p in paths], "batch_sizes": [len(paths), 1],
        "max_abs_diff_map": map_diff, "max_abs_diff_score": float(score_diff.max()),
        "max_scaled_diff_score": float((score_diff / scale).max()), "tolerance": tolerance,
        "map_range": [float(eager_maps.min()), float(eager_maps.max())], "passed": None,
    }
    record["passed"] = bool(map_diff <= tolerance and record["max_scaled_diff_score"] <= tolerance)
    return record


def _parity_message(record: dict[str, Any], method_name: str) -> str:
    hint = ""
    if method_name == "gnl":
        hint = (" GNL's test-time matching ranks tied feature values, and sort order among ties differs between "
                "runtimes: set model.match_stable_sort=true (then re-calibrate) or model.match=false")
    return (f"the export disagrees with eager PyTorch on {record['n_images']} images: max |Δ map| "
            f"{record['max_abs_diff_map']:.3g}, max |Δ score| {record['max_abs_diff_score']:.3g} (scaled "
            f"{record['max_scaled_diff_score']:.3g}) > tolerance {record['tolerance']:g}; the export was not "
            f"kept.{hint}")


def _metadata(cfg: Any, fmt: str, calibration: Any, run_dir: Path) -> dict[str, Any]:
    import reconad

    data = cfg.data
    return {
        "format": fmt, "model_file": FORMATS[fmt], "reconad_version": reconad.__version__,
        "torch_version": torch.__version__, "method": cfg.method, "backbone": cfg.backbone.name,
        "image_size": int(data.crop_size or data.image_size), "resize_size": int(data.image_size),
        "resize": data.resize, "crop_size": data.crop_size,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "colour": "RGB",
                  "dynamic_batch": True},
        "outputs": {"anomaly_map": "(B, 1, H, W) float32", "score": "(B,) float32"},
        "calibration": calibration.to_dict() if calibration is not None else None,
        "run_dir": str(run_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "platform": platform.platform(),
    }


def write_model(method: nn.Module, path: Path, format: str, image_size: int, opset: int | None = None) -> None:
    """Write ``method``'s whole inference pipeline (images in [0, 1] → maps, scores; dynamic batch) as one ``format``
    graph at ``path``, without the parity check :func:`export_run` adds (benchmarks measure their own).

    Raises:
        ExportError: The method/format cannot be exported, or the exporter failed.
    """
    _check_exportable(method, format)
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    module = ExportModule(method).eval()
    with _pinned_python_state(method), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constants; the parity check is the judge
        if format == "onnx":
            _export_onnx(module, example, path, opset)
        else:
            _export_torchscript(module, example, path)


def export_run(run_dir: str | Path, output_dir: str | Path, format: str = "onnx",
               images: str | Path | Sequence[str | Path] | None = None, tolerance: float = 1e-4,
               opset: int | None = None, overwrite: bool = False,
               model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a run folder to ``output_dir`` (model + ``export.json`` + ``calibration.json``) after a parity check.

    Args:
        run_dir: A trained run folder.
        output_dir: New or empty folder (``overwrite=True`` replaces an existing export once the new one passed).
        format: ``"onnx"`` (runs in the torch-free ``Detector``) or ``"torchscript"``.
        images: Real images for the parity check (a folder or files); default: the run's test images.
        tolerance: Largest accepted |Δ| of maps (and of scores relative to max(1, |score|)).
        opset: ONNX opset (default: the exporter's).
        model_overrides: Test-time model settings changed for the export and its eager reference (recorded in
            ``export.json``), e.g. ``{"match_stable_sort": True}`` for GNL.

    Returns:
        The export metadata (``export.json``), parity record included.

    Raises:
        ExportError: The method/format cannot be exported (up front), or the folder is not empty.
        ExportParityError: Exported and eager outputs differ beyond ``tolerance``; nothing is written.
    """
    from ..run import load, read_run_config

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise ExportError(f"{output_dir} already holds files; choose an empty --output folder or pass --overwrite")
    cfg = read_run_config(run_dir)
    method = load(run_dir, "cpu")
    apply_model_overrides(method, model_overrides)
    _check_exportable(method, format)
    paths = _sample_paths(images, cfg)
    calibration = load_calibration(run_dir)
    if calibration is not None and model_overrides:
        log.warning("the run's calibration was made without %s; re-calibrate for exact thresholds", model_overrides)
    metadata = _metadata(cfg, format, calibration, run_dir)
    metadata["model_overrides"] = dict(model_overrides or {})
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        write_model(method, staging / FORMATS[format], format, metadata["image_size"], opset)
        _write_metadata(staging, metadata)  # the runtime reads it for the parity run
        metadata["parity"] = record = _parity(method, staging, metadata, paths, tolerance)
        if not record["passed"]:
            raise ExportParityError(_parity_message(record, cfg.method))
        _write_metadata(staging, metadata)
        if calibration is not None:
            write_calibration(staging, calibration)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.chmod(0o755)  # mkdtemp's 0700 is for the half-written state only
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s (max |Δ map| %.2g on %d images)", run_dir, output_dir,
             record["max_abs_diff_map"], record["n_images"])
    return metadata


def _write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    from ..fileio import write_json

    write_json(folder / EXPORT_FILE, metadata)


def verify_export(export_dir: str | Path, run_dir: str | Path | None = None,
                  images: str | Path | Sequence[str | Path] | None = None,
                  tolerance: float | None = None) -> dict[str, Any]:
    """Re-check an existing export against its run (e.g. after copying it): the parity record, or raise.

    Raises:
        ExportParityError: The exported model no longer equals the run's eager model.
    """
    from ..run import load, read_run_config

    export_dir = Path(export_dir)
    metadata = read_export_metadata(export_dir)
    run_dir = Path(run_dir or metadata["run_dir"])
    cfg = read_run_config(run_dir)
    tolerance = tolerance if tolerance is not None else metadata.get("parity", {}).get("tolerance", 1e-4)
    method = load(run_dir, "cpu")
    apply_model_overrides(method, metadata.get("model_overrides"))
    record = _parity(method, export_dir, metadata, _sample_paths(images, cfg), tolerance)
    if not record["passed"]:
        raise ExportParityError(_parity_message(record, cfg.method).replace("the export was not kept.", "").strip())
    return record
