"""Eager PyTorch vs the exported ONNX model in onnxruntime: latency, throughput, peak memory and parity.
Prints a table and writes JSON (benchmarks/results/export_cpu.json). Never run by the tests.

    python benchmarks/export.py --threads 1                          # rd4ad, recontrast × Lite0, WRN50-2 @ 256 px
    python benchmarks/export.py --cases rd4ad:efficientnet_lite0:256 --repeats 5

Per case (``method:backbone:size``; EfficientNet-Lite0 with its offline ImageNet weights, WRN50-2 random init:
speed does not depend on the weights): a run folder is written by hand (config + weights), exported with
``reconad.deploy.export_run`` (whose parity record, eager vs exported on 8 generated texture images, is reported),
then each runtime is timed **in a fresh subprocess** so that its peak RSS (``VmHWM``) is its own: eager =
``RunPredictor.run`` (``Method.predict`` under ``no_grad``), onnx = ``Detector.run`` (imports no torch). Latency is
the median of ``--repeats`` calls at batch 1; throughput = 8 / median batch-8 call. Preprocessing is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_CASES = ["rd4ad:efficientnet_lite0:256", "recontrast:efficientnet_lite0:256", "rd4ad:wide_resnet50_2:256",
                 "recontrast:wide_resnet50_2:256"]


def _write_run(method_name: str, backbone: str, size: int, folder: Path) -> Path:
    """A trained-looking run folder: config + weights of a freshly built method, plus 8 texture images."""
    import torch

    from reconad.config import make_config
    from reconad.fileio import save_weights
    from reconad.run import CHECKPOINT_DIR, WEIGHTS_FILE, build_method, write_config

    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    from PIL import Image

    for i in range(8):
        tex = 0.5 + 0.3 * np.sin(2 * np.pi * (xx + 7 * i) / 16)[..., None] * np.array([1.0, 0.8, 0.6])
        arr = np.clip(tex + rng.normal(0, 0.03, (size, size, 3)), 0, 1)
        Image.fromarray((arr * 255).astype(np.uint8)).save(images / f"{i:03d}.png")
    weights = "imagenet" if backbone.startswith("efficientnet_lite") else None
    cfg = make_config(method_name, backbone={"name": backbone, "weights": weights},
                      data={"image_size": size, "root": str(images)})
    torch.manual_seed(0)
    method = build_method(cfg)
    run = folder / "run"
    write_config(run, cfg)
    save_weights(run / CHECKPOINT_DIR / WEIGHTS_FILE, method.state_dict(), {"batches_done": "0"})
    return run


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork + exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(kind: str, path: str, size: int, repeats: int, threads: int) -> dict:
    """Runs in a subprocess: latency at batch 1, throughput at batch 8, peak RSS."""
    images = np.random.default_rng(0).random((8, 3, size, size), dtype=np.float32)
    if kind == "eager":
        import torch

        torch.set_num_threads(threads)
        from reconad.deploy import RunPredictor

        run = RunPredictor(path).run
    else:
        from reconad.deploy.runtime import Detector

        run = Detector(path, threads=threads).run
    out = {}
    for batch in (1, 8):
        run(images[:batch])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(images[:batch])
            times.append(time.perf_counter() - start)
        out[f"batch{batch}_s"] = statistics.median(times)
    out["latency_ms_b1"] = 1000 * out["batch1_s"]
    out["throughput_ips_b8"] = 8 / out["batch8_s"]
    out["peak_rss_mb"] = _peak_rss_mb()
    out["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    return out


def _subprocess(kind: str, path: Path, size: int, repeats: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import export as b; "
            f"print(json.dumps(b._measure({kind!r}, {str(path)!r}, {size}, {repeats}, {threads})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "export_cpu.json")
    args = parser.parse_args()
    os.environ.setdefault("RECONAD_PROGRESS", "off")
    import torch

    torch.set_num_threads(args.threads)
    import onnxruntime

    from reconad.deploy import export_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            method_name, backbone, size = case.split(":")
            size = int(size)
            folder = Path(tmp) / case.replace(":", "-")
            run = _write_run(method_name, backbone, size, folder)
            start = time.perf_counter()
            meta = export_run(run, folder / "export", images=folder / "images")
            export_s = time.perf_counter() - start
            eager = _subprocess("eager", run, size, args.repeats, args.threads)
            onnx = _subprocess("onnx", folder / "export", size, args.repeats, args.threads)
            parity = meta["parity"]
            rows.append({"case": case, "export_s": export_s, "model_mb": (folder / "export" / "model.onnx").stat()
                         .st_size / 2**20, "eager": eager, "onnxruntime": onnx,
                         "parity": {k: parity[k] for k in ("n_images", "batch_sizes", "max_abs_diff_map",
                                                           "max_abs_diff_score", "tolerance", "passed")}})
            print(f"done {case}", file=sys.stderr, flush=True)
    header = (f"{'case':34s} {'eager b1 ms':>11s} {'ort b1 ms':>9s} {'eager b8 img/s':>14s} {'ort b8 img/s':>12s} "
              f"{'eager MB':>8s} {'ort MB':>7s} {'max|Δmap|':>9s} {'max|Δscore|':>11s}")
    print(header)
    for r in rows:
        e, o, p = r["eager"], r["onnxruntime"], r["parity"]
        print(f"{r['case']:34s} {e['latency_ms_b1']:11.1f} {o['latency_ms_b1']:9.1f} {e['throughput_ips_b8']:14.2f} "
              f"{o['throughput_ips_b8']:12.2f} {e['peak_rss_mb']:8.0f} {o['peak_rss_mb']:7.0f} "
              f"{p['max_abs_diff_map']:9.2e} {p['max_abs_diff_score']:11.2e}")
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
              "processor": platform.processor(), "cases": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
