"""The FastAPI application: ``POST /predict``, ``GET /health``, ``GET /model``, the page ``/`` and ``/results``.

The model lives in one :class:`~reconad.serve.batching.BatchQueue` worker thread; request handlers only decode
uploads (in the thread pool), queue the images and await their futures, so a slow model never blocks the event
loop and concurrent requests share batches.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..errors import ReconadError
from .batching import BatchQueue, QueueFull
from .encode import NORMALISED_RANGE, RAW_UNITS, colorbar_stops, result_json
from .images import ImageRejected, Limits, decode_image
from .results import gather_results, served_file

STATIC = resources.files("reconad.serve") / "static"
MULTIPART_OVERHEAD = 1 << 20  # headers and boundaries of a multipart body, on top of the files themselves


def _jsonable(value: Any) -> Any:
    """Metadata as JSON: mappings and sequences kept, numpy scalars and paths made plain."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def model_info(predictor: Any, limits: Limits, queue: BatchQueue) -> dict[str, Any]:
    calibration = predictor.calibration
    info: dict[str, Any] = {"metadata": _jsonable(dict(predictor.metadata)), "image_size": int(predictor.image_size),
                            "calibrated": calibration is not None}
    if calibration is not None:
        threshold = float(calibration.image_threshold)
        info["threshold"] = threshold
        info["normalised_threshold"] = float(calibration.normalise_score(threshold))
        # the sorted normal scores can be thousands of numbers: their count is enough here
        info["calibration"] = _jsonable({k: v for k, v in calibration.to_dict().items() if k != "normal_scores"})
        if getattr(calibration, "pixel_threshold", 0.0) is not None:
            vmin, vmax = getattr(calibration, "map_range", None) or NORMALISED_RANGE
            info["map"] = {"units": "normalised", "vmin": float(vmin), "vmax": float(vmax)}
        else:
            info["map"] = {"units": RAW_UNITS, "vmin": None, "vmax": None}
    else:
        info["threshold"] = info["normalised_threshold"] = None
        info["map"] = {"units": RAW_UNITS, "vmin": None, "vmax": None}
        info["note"] = "this model has no calibration: scores are raw and no decision (label, region) is made"
    info["map"]["colorbar"] = colorbar_stops()
    info["limits"] = {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_files": limits.max_files,
                      "queue": queue.capacity, "max_batch": queue.max_batch}
    return info


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(encoding="utf-8"))


def create_app(predictor: Any = None, *, results_root: str | Path | None = None, limits: Limits | None = None,
               queue_size: int = 64, max_batch: int = 8, title: str = "reconad") -> FastAPI:
    """The service for ``predictor`` (see :func:`reconad.deploy.open_predictor`) and/or the results of a folder.

    Args:
        predictor: ``.predict_batch(list of HxWx3 uint8)`` → results, ``.metadata``, ``.calibration``,
            ``.image_size``; None serves only the results page.
        results_root: a study, run or runs folder browsed at ``/results``.
        limits: per-request upload limits (bytes, pixels, files).
        queue_size: most images waiting for the model; beyond it requests are answered 503 at once.
        max_batch: most images the model runs at once.
    """
    if predictor is None and results_root is None:
        raise ValueError("create_app needs a predictor, a results folder, or both")
    limits = limits or Limits()
    queue = BatchQueue(predictor.predict_batch, queue_size, max_batch) if predictor is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if queue is not None:
            queue.start()
        try:
            yield
        finally:
            if queue is not None:
                queue.stop()

    app = FastAPI(title=f"{title} serve", lifespan=lifespan,
                  description="Anomaly scores, maps and decisions for uploaded images (reconad).")
    app.state.predictor, app.state.queue, app.state.limits = predictor, queue, limits
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(ImageRejected)
    async def _rejected(_: Request, err: ImageRejected) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(QueueFull)
    async def _full(_: Request, err: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ReconadError)
    async def _user_error(_: Request, err: ReconadError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        # refuse an oversized body from its header, before the multipart parser spools it to disk
        length = request.headers.get("content-length")
        bound = limits.max_bytes * limits.max_files + MULTIPART_OVERHEAD
        if request.url.path == "/predict" and length and length.isdigit() and int(length) > bound:
            return JSONResponse({"detail": f"request body of {length} bytes exceeds {bound} bytes "
                                           f"({limits.max_files} files of at most {limits.max_bytes} bytes)"},
                                status_code=413)
        return await call_next(request)

    @app.get("/health", summary="Liveness and queue state")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "model": predictor is not None, "results": results_root is not None}
        if queue is not None:
            out["queue"] = {"waiting": queue.waiting, "capacity": queue.capacity, "batches_run": queue.batches_run}
        return out

    @app.get("/", include_in_schema=False)
    async def index():
        return _page("index.html") if predictor is not None else RedirectResponse("/results")

    if predictor is not None:
        @app.get("/model", summary="Method, backbone, image size, threshold and its source, export parity record")
        async def model() -> dict[str, Any]:
            return model_info(predictor, limits, queue)

        @app.post("/predict", summary="Score one or several images (multipart field `files`)")
        async def predict(
            files: Annotated[list[UploadFile], File(description="one or several image files")],
            maps: Annotated[bool, Query(description="include the heat map and predicted region as base64 PNG")] = False,
        ) -> dict[str, Any]:
            if len(files) > limits.max_files:
                raise ImageRejected(413, f"{len(files)} files in one request; the limit is {limits.max_files}")
            names = [f.filename or f"file {i}" for i, f in enumerate(files)]
            images = []
            for name, upload in zip(names, files):
                if upload.size is not None and upload.size > limits.max_bytes:
                    raise ImageRejected(413, f"{name}: the file is larger than the limit of {limits.max_bytes} "
                                             "bytes (reconad serve --max-bytes)")
                data = await upload.read(limits.max_bytes + 1)
                images.append(await run_in_threadpool(decode_image, name, data, limits))
            futures = queue.submit(images)
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            calibration = predictor.calibration
            answers = await run_in_threadpool(lambda: [result_json(name, image.shape[:2], result, calibration, maps)
                                                       for name, image, result in zip(names, images, results)])
            return {"calibrated": calibration is not None, "results": answers}

    if results_root is not None:
        root = Path(results_root)

        @app.get("/results", include_in_schema=False)
        async def results_page():
            return _page("results.html")

        @app.get("/api/results", summary="Tables, figures and overlays of the served study or run folder")
        async def results_data() -> dict[str, Any]:
            return await run_in_threadpool(gather_results, root)

        @app.get("/files/{path:path}", include_in_schema=False)
        async def results_file(path: str):
            target = served_file(root, path)
            if target is None:
                return JSONResponse({"detail": f"{path}: no such figure or table in the served folder"},
                                    status_code=404)
            return FileResponse(target)

    return app
