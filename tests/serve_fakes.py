"""A predictor with the shape of ``reconad.deploy.open_predictor``'s, for the HTTP and page tests."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from reconad.deploy.runtime import DetectorResult  # the real result type: torch-free


class FakeCalibration:
    """(x − median) / (threshold − median), threshold at 1.0; anomalous when score > threshold (as reconad.deploy)."""

    def __init__(self, image_threshold: float = 0.5, lo: float = 0.0):
        self.image_threshold, self.lo = image_threshold, lo
        self.pixel_threshold = image_threshold

    def normalise_score(self, x):
        return (np.asarray(x, np.float64) - self.lo) / (self.image_threshold - self.lo)

    def normalise_map(self, m):
        return self.normalise_score(m).astype(np.float32)

    def label(self, score, threshold=None):
        return "anomalous" if score > (self.image_threshold if threshold is None else threshold) else "normal"

    def to_dict(self):
        return {"image_threshold": self.image_threshold, "source": "fake: validation quantile"}


class FakePredictor:
    """Map = red channel (0..1) resized to ``image_size``; score = its maximum. Records the threads it ran on."""

    def __init__(self, calibrated: bool = True, image_size: int = 16, gate: threading.Event | None = None):
        self.calibration = FakeCalibration() if calibrated else None
        self.image_size, self.gate = image_size, gate
        self.metadata = {"method": "fake", "backbone": "none", "image_size": image_size,
                         "threshold_source": "fake" if calibrated else None, "parity": {"max_abs_diff": 0.0}}
        self.threads: set[int] = set()
        self.batch_sizes: list[int] = []

    def _map(self, image) -> np.ndarray:
        pil = Image.fromarray(np.asarray(image, np.uint8)).resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(pil, np.float32)[..., 0] / 255.0

    def predict_batch(self, images):
        if self.gate is not None:
            self.gate.wait(10)
        self.threads.add(threading.get_ident())
        self.batch_sizes.append(len(images))
        out = []
        for image in images:
            amap = self._map(image)
            score = float(amap.max())
            cal = self.calibration
            if cal is None:
                out.append(DetectorResult(amap, score, None, None, None, None, None))
            else:
                nmap = cal.normalise_map(amap)
                out.append(DetectorResult(amap, score, float(cal.normalise_score(score)), nmap, cal.label(score),
                                      cal.image_threshold, amap > cal.pixel_threshold))
        return out

    def predict(self, image):
        return self.predict_batch([image])[0]


# -- a real trained run (random resnet18, 32 px, 2 iterations), calibrated on 19 generated normals -----------------
_REAL: dict[str, object] = {}


def real_run(base) -> dict:
    """{"run", "uncalibrated", "test"}: a calibrated rd4ad run, a copy without calibration, its test folder."""
    if not _REAL:
        import shutil
        from pathlib import Path

        from reconad.config import make_config
        from reconad.deploy import calibrate_run
        from reconad.engine import fit

        from .conftest import tiny_run_overrides, write_tiny_mvtec

        base = Path(base)
        root = write_tiny_mvtec(base / "data", n_train=8, n_good=2, n_bad=2)
        normals = write_tiny_mvtec(base / "normals", n_train=19, n_good=0, n_bad=0, seed=7) / "stripes/train/good"
        sections = tiny_run_overrides(root, iterations=2)
        sections["eval"] = {"overlays": 2, "plots": False, "examples": 0}
        run = Path(fit(make_config("rd4ad", **sections), base / "run").run_dir)
        shutil.copytree(run, base / "run-uncalibrated")
        calibrate_run(run, normals, far=0.05, pixel_far=0.01)
        _REAL.update(run=run, uncalibrated=base / "run-uncalibrated", test=root / "stripes" / "test")
    return _REAL
