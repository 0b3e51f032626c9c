"""One study of 4 small cells (rd4ad, random resnet18, 32 px, CPU), run sequentially vs by 2 `--worker` processes.

Prints a table and the speed-up, writes benchmarks/results/study_workers.json. Each process uses one thread, so
on a machine with 2 free cores the ideal ratio is 2×.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_workers.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import write_tiny_mvtec  # noqa: E402

RECONAD = str(Path(sys.executable).parent / "reconad")
SETS = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=4", "backbone.name=resnet18",
        "backbone.weights=null", "train.accelerator=cpu", "train.threads=1", "eval.overlays=0", "eval.plots=false"]


def study_command(root: Path, output: Path, iterations: int) -> list[str]:
    return [RECONAD, "study", "--presets", "rd4ad", "--data.root", str(root), "--seeds", "1", "2",
            "--set", f"train.iterations={iterations}", *SETS, "--output", str(output), "--report", "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_tiny_mvtec(write_tiny_mvtec(tmp / "data", "one", n_train=16), "two", n_train=16, seed=1)
        start = time.perf_counter()
        subprocess.run(study_command(root, tmp / "seq", args.iterations), env=env, check=True, capture_output=True)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        workers = [subprocess.Popen([*study_command(root, tmp / "workers", args.iterations), "--worker"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        if any(w.wait() for w in workers):
            raise SystemExit("a worker failed")
        parallel = time.perf_counter() - start
    result = {"cells": 4, "iterations": args.iterations, "sequential_s": sequential, "two_workers_s": parallel,
              "speedup": sequential / parallel, "cpus": os.cpu_count()}
    print("| mode | wall time (s) |\n|---|---:|")
    print(f"| sequential | {sequential:.1f} |\n| 2 workers | {parallel:.1f} |")
    print(f"speed-up: {result['speedup']:.2f}x on {result['cpus']} CPUs")
    out = Path(__file__).parent / "results" / "study_workers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
