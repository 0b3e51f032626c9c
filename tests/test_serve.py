"""The HTTP service through FastAPI's TestClient, with a fake predictor of the deploy interface's shape."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reconad.errors import ConfigError
from reconad.serve import Limits, check_host, create_app
from reconad.serve.batching import BatchQueue, QueueFull
from reconad.serve.images import ImageRejected, decode_image

from .serve_fakes import FakePredictor


def png_bytes(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def image(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with a few bytes of data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture
def predictor():
    return FakePredictor()


@pytest.fixture
def client(predictor):
    app = create_app(predictor, limits=Limits(max_bytes=200_000, max_pixels=250_000, max_files=8), queue_size=64)
    with TestClient(app) as c:
        yield c


def expected(predictor: FakePredictor, arrays: list[np.ndarray]) -> list[dict]:
    return [{"score": r.score, "normalised_score": r.normalised_score, "label": r.label, "threshold": r.threshold}
            for r in predictor.predict_batch(arrays)]


def decisions(answer: dict) -> list[dict]:
    keys = ("score", "normalised_score", "label", "threshold")
    return [{k: r[k] for k in keys} for r in answer["results"]]


# -- endpoints ------------------------------------------------------------------------------------------------
def test_health_model_page_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] is True and health["queue"]["capacity"] == 64
    model = client.get("/model").json()
    assert model["calibrated"] is True and model["image_size"] == 16
    assert model["threshold"] == 0.5 and model["normalised_threshold"] == 1.0
    assert model["metadata"]["method"] == "fake" and model["metadata"]["parity"] == {"max_abs_diff": 0.0}
    assert model["calibration"]["source"] == "fake: validation quantile"
    assert len(model["map"]["colorbar"]) == 11 and model["map"]["colorbar"][0].startswith("#")
    page = client.get("/")
    assert page.status_code == 200 and "threshold" in page.text and "/static/predict.js" in page.text
    assert client.get("/static/predict.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_predict_answers_equal_the_predictors_own_output(client, predictor):
    arrays = [image(i) for i in range(3)]
    answer = client.post("/predict", files=files(*((f"im{i}.png", png_bytes(a)) for i, a in enumerate(arrays))))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["calibrated"] is True
    assert [r["filename"] for r in body["results"]] == ["im0.png", "im1.png", "im2.png"]
    assert decisions(body) == expected(predictor, arrays)
    assert body["results"][0]["height"] == 24 and body["results"][0]["width"] == 28
    assert "map" not in body["results"][0]  # maps only on request


def test_predict_maps_are_pngs_of_the_map_and_the_predicted_region(client, predictor):
    array = image(5)
    body = client.post("/predict?maps=true", files=files(("a.png", png_bytes(array)))).json()["results"][0]
    result = predictor.predict(array)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["map"]["png"]))))
    assert heat.shape == (16, 16, 3) and body["map"]["units"] == "normalised"
    assert (body["map"]["vmin"], body["map"]["vmax"]) == (0.0, 2.0)
    from matplotlib import colormaps
    want = colormaps["jet"](np.clip(result.normalised_map.astype(np.float64) / 2, 0, 1))[..., :3] * 255 + 0.5
    np.testing.assert_array_equal(heat, want.astype(np.uint8))
    region = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]["png"]))))
    assert region.shape == (16, 16, 4)
    np.testing.assert_array_equal(region[..., 3] > 0, result.mask)
    assert body["mask_fraction"] == pytest.approx(result.mask.mean())


def test_jpeg_grey_palette_and_rgba_inputs_are_accepted(client, predictor):
    rgb = image(7)
    grey = rgb[..., 0]
    uploads = [("g.png", png_bytes(grey)), ("p.png", png_bytes(np.asarray(Image.fromarray(rgb).quantize(16)))),
               ("a.png", png_bytes(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)]))),
               ("j.jpg", png_bytes(rgb, "JPEG", quality=95))]
    body = client.post("/predict", files=files(*uploads))
    assert body.status_code == 200, body.text
    decoded = [decode_image(n, d, Limits()) for n, d in uploads]
    assert decisions(body.json()) == expected(predictor, decoded)


def test_uncalibrated_model_says_so_and_makes_no_decision():
    app = create_app(FakePredictor(calibrated=False))
    with TestClient(app) as c:
        model = c.get("/model").json()
        assert model["calibrated"] is False and model["threshold"] is None and "no calibration" in model["note"]
        r = c.post("/predict?maps=true", files=files(("a.png", png_bytes(image(1))))).json()
        assert r["calibrated"] is False
        res = r["results"][0]
        assert res["label"] is None and res["threshold"] is None and res["normalised_score"] is None
        assert res["mask"] is None and res["mask_fraction"] is None
        assert res["map"]["units"].startswith("raw") and res["map"]["vmin"] < res["map"]["vmax"]
        assert res["score"] == pytest.approx(res["map"]["vmax"])


# -- bad input --------------------------------------------------------------------------------------------------
def _float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_INPUTS = {
    "not an image": (b"hello, this is text, not pixels" * 4, 400, "not an image"),
    "truncated": (png_bytes(image(3, 64))[:300], 400, "truncated"),
    "zero bytes": (b"", 400, "empty"),
    "too large": (png_bytes(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)), 413,
                  "larger than the limit of 200000 bytes"),
    "too many pixels": (png_header_only(600, 600), 413, "pixels exceeds the limit of 250000"),
    "decompression bomb": (png_header_only(100_000, 100_000), 413, "pixels"),
    "unsupported mode": (_float_tiff(), 415, "mode 'F' is not supported"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(client, predictor, case):
    data, status, words = BAD_INPUTS[case]
    good = png_bytes(image(0))
    r = client.post("/predict", files=files(("ok.png", good), ("bad.bin", data)))
    assert r.status_code == status, r.text
    assert "bad.bin" in r.json()["detail"] and words in r.json()["detail"]
    again = client.post("/predict", files=files(("ok.png", good)))
    assert again.status_code == 200 and decisions(again.json()) == expected(predictor, [image(0)])


def test_request_limits_too_many_files_no_files_and_oversized_body(client):
    many = client.post("/predict", files=files(*((f"{i}.png", png_bytes(image(i, 8))) for i in range(9))))
    assert many.status_code == 413 and "9 files" in many.json()["detail"]
    assert client.post("/predict").status_code == 422  # no file at all: FastAPI's validation answer
    huge = client.post("/predict", content=b"x", headers={"content-length": str(10**9),
                                                         "content-type": "multipart/form-data; boundary=b"})
    assert huge.status_code == 413 and "exceeds" in huge.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_decode_image_rejections_carry_their_status():
    with pytest.raises(ImageRejected) as err:
        decode_image("x.png", b"", Limits())
    assert err.value.status == 400 and "x.png" in str(err.value)


# -- load ---------------------------------------------------------------------------------------------------------
def test_eight_clients_times_25_requests_all_answered_by_one_model_thread(client, predictor):
    arrays = {(t, k): image(100 * t + k, 16) for t in range(8) for k in range(25)}
    payloads = {key: png_bytes(a) for key, a in arrays.items()}
    want = dict(zip(arrays, expected(predictor, list(arrays.values()))))
    predictor.threads.clear()

    def client_thread(t: int) -> list[tuple]:
        out = []
        for k in range(25):
            r = client.post("/predict", files=files((f"{t}_{k}.png", payloads[(t, k)])))
            out.append(((t, k), r.status_code, decisions(r.json())[0] if r.status_code == 200 else r.text))
        return out

    with ThreadPoolExecutor(8) as pool:
        answers = [a for chunk in pool.map(client_thread, range(8)) for a in chunk]
    assert len(answers) == 200
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    assert all(body == want[key] for key, _, body in answers)
    assert len(predictor.threads) == 1  # one model instance, run in one place
    assert client.get("/health").json()["queue"]["waiting"] == 0


def test_a_full_queue_answers_503_at_once():
    gate = threading.Event()
    predictor = FakePredictor(gate=gate)
    app = create_app(predictor, queue_size=2, max_batch=1)
    with TestClient(app) as c:
        queue = app.state.queue
        held = queue.submit([image(0)])  # the worker takes it and blocks on the gate
        for _ in range(100):
            if queue.waiting == 0:
                break
            threading.Event().wait(0.01)
        queued = queue.submit([image(1), image(2)])  # the queue is now full
        r = c.post("/predict", files=files(("a.png", png_bytes(image(3)))))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "waiting" in r.json()["detail"]
        gate.set()
        assert [f.result(10).score for f in held + queued] == [x.score for x in
                                                               predictor.predict_batch([image(i) for i in range(3)])]
        assert c.post("/predict", files=files(("a.png", png_bytes(image(3))))).status_code == 200


def test_batch_queue_keeps_order_batches_and_passes_errors():
    seen = []

    def predict_batch(items):
        seen.append(len(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        return [x * 2 for x in items]

    queue = BatchQueue(predict_batch, capacity=10, max_batch=4)
    with pytest.raises(RuntimeError, match="start"):
        queue.submit([1])
    queue.start()
    assert [f.result(5) for f in queue.submit(list(range(7)))] == [2 * i for i in range(7)]
    assert max(seen) <= 4
    with pytest.raises(QueueFull):
        queue.submit(list(range(11)))
    with pytest.raises(RuntimeError, match="model failed"):
        queue.submit(["boom"])[0].result(5)
    assert queue.submit([5])[0].result(5) == 10  # still serving after a failed batch
    queue.stop()


def test_binding_beyond_loopback_needs_an_explicit_flag():
    check_host("127.0.0.1", False)
    check_host("::1", False)
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    check_host("0.0.0.0", True)


def test_cli_serve_passes_its_options_and_refuses_a_remote_host_without_the_flag(tmp_path, monkeypatch, capsys):
    import reconad.serve as serve_module
    from reconad.cli import main

    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda *a, **kw: calls.append((a, kw)))
    assert main(["serve", str(tmp_path), "--port", "8123", "--max-bytes", "1000", "--max-pixels", "99",
                 "--queue", "5", "--allow-remote", "--host", "0.0.0.0"]) == 0
    (args, kw), = calls
    assert args == (str(tmp_path),) and kw["port"] == 8123 and kw["queue_size"] == 5 and kw["allow_remote"] is True
    assert kw["limits"] == Limits(max_bytes=1000, max_pixels=99, max_files=Limits.max_files)
    monkeypatch.undo()
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
