"""``reconad serve`` under load: requests/s and p50/p95 latency at 1 and 8 concurrent clients, on loopback.
Prints a table and writes JSON (benchmarks/results/serve_cpu.json). Never run by the tests.

    python benchmarks/serve.py                      # rd4ad × EfficientNet-Lite0 @ 256 px, 1 and 8 clients
    python benchmarks/serve.py --requests 40 --seconds 30 --threads 1 --maps

A run folder is written by hand (config + weights of a freshly built rd4ad with Lite0's offline ImageNet
weights: speed does not depend on training) and calibrated on its 8 generated texture images, so answers carry
decisions. The app (one model, one batching worker) runs under uvicorn in this process on a free loopback port;
each client is a thread with its own HTTP connection posting one 256 px PNG per request. Every level is bounded
by ``--requests`` per client and ``--seconds`` in all; 2 warm-up requests are not timed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _make_run(folder: Path, size: int, trace: bool = False) -> Path:
    from export import _write_run  # the same hand-written run folder as the export benchmark

    from reconad.deploy import calibrate_run
    from reconad.run import read_run_config, write_config

    run = _write_run("rd4ad", "efficientnet_lite0", size, folder)
    if trace:  # as if fitted with --eval.trace true: the predictor replays its forward as TorchScript traces
        cfg = read_run_config(run)
        cfg.eval.trace = True
        write_config(run, cfg)
    calibrate_run(run, folder / "images", far=0.2, pixel_far=0.05)
    return run


def _png(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _client(base: str, payload: bytes, maps: bool, count: int, deadline: float, out: list[tuple[float, int]]):
    import httpx2 as httpx

    with httpx.Client(base_url=base, timeout=120) as http:
        for _ in range(count):
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            r = http.post("/predict", params={"maps": maps}, files=[("files", ("x.png", payload, "image/png"))])
            out.append((time.perf_counter() - start, r.status_code))


def _level(base: str, payload: bytes, clients: int, requests: int, seconds: float, maps: bool) -> dict:
    results: list[tuple[float, int]] = []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=_client, args=(base, payload, maps, requests, deadline, results))
               for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(lat for lat, status in results if status == 200)
    p95 = statistics.quantiles(ok, n=20, method="inclusive")[18] if len(ok) > 1 else (ok[0] if ok else float("nan"))
    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "errors": {str(s): sum(1 for _, st in results if st == s) for s in {st for _, st in results if st != 200}},
            "wall_s": wall, "requests_per_s": len(ok) / wall, "p50_ms": 1e3 * statistics.median(ok) if ok else None,
            "p95_ms": 1e3 * p95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=25, help="requests per client and level")
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound per level")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8, help="most images per model call")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--maps", action="store_true", help="also encode the map and region PNGs in each answer")
    parser.add_argument("--trace", action="store_true", help="the run's eval.trace on (bit-identical TorchScript)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "serve_cpu.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import httpx2 as httpx
    from speed import cpu_name

    from reconad.serve import app_for_path
    from reconad.serve.live import background_server

    with tempfile.TemporaryDirectory() as tmp:
        run = _make_run(Path(tmp), args.size, args.trace)
        start = time.perf_counter()
        # as `reconad serve` builds it: a traced run records its traces for batch sizes 1..batch here
        app = app_for_path(run, device=args.device, max_batch=args.batch, queue_size=256)
        startup_s = time.perf_counter() - start
        payload = _png(args.size)
        rows = []
        with background_server(app) as base:
            for _ in range(2):  # warm-up: first calls allocate
                httpx.post(base + "/predict", files=[("files", ("x.png", payload, "image/png"))], timeout=120)
            for clients in args.clients:
                before = httpx.get(base + "/health").json()["queue"]["batches_run"]
                row = _level(base, payload, clients, args.requests, args.seconds, args.maps)
                row["model_calls"] = httpx.get(base + "/health").json()["queue"]["batches_run"] - before
                rows.append(row)
    print(f"rd4ad × efficientnet_lite0 @ {args.size} px, {args.device}, torch threads {args.threads}, "
          f"batch ≤ {args.batch}, maps {'on' if args.maps else 'off'}, trace {'on' if args.trace else 'off'}, "
          f"start-up {startup_s:.1f} s")
    print("| clients | requests | ok | req/s | p50 ms | p95 ms | model calls |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['model_calls']} |")
    record = {"benchmark": "serve", "method": "rd4ad", "backbone": "efficientnet_lite0", "image_size": args.size,
              "device": args.device, "torch_threads": args.threads, "max_batch": args.batch, "maps": args.maps,
              "trace": args.trace, "startup_s": startup_s,
              "requests_per_client": args.requests, "seconds_bound": args.seconds, "levels": rows,
              "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
                          "cpus": os.cpu_count(), "torch": torch.__version__}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
