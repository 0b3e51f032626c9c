"""Training-step time and inference throughput per method and backbone; prints a table and writes JSON.

    python benchmarks/speed.py                       # CPU: RD4AD on WRN50-2 and EfficientNet-Lite0, 256 px
    python benchmarks/speed.py --device cuda --precision bf16-mixed

Weights are random (speed does not depend on their values). Each figure is the median of ``--repeats``
timed runs after ``--warmup`` untimed ones; torch's thread count is set explicitly and checked after imports.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from reconad.backbones import create_backbone
from reconad.config import OptimConfig
from reconad.nets.rd import count_parameters
from reconad.registry import create_method, get_method_class

DEFAULT_CASES = ["rd4ad:wide_resnet50_2", "rd4ad:efficientnet_lite0", "recontrast:wide_resnet50_2",
                 "recontrast:efficientnet_lite0", "rdpp:wide_resnet50_2", "rdpp:efficientnet_lite0",
                 "ssl_ae:resnet18", "ulsad:wide_resnet50_2",  # ssl_ae reads pixels: its backbone is a placeholder
                 "gnl:wide_resnet50_2"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def bench_case(method_name: str, backbone_name: str, args, device: torch.device) -> dict:
    cls = get_method_class(method_name)
    torch.manual_seed(0)
    backbone = create_backbone(backbone_name, weights=None, trainable=cls.trainable_backbone)
    method = create_method(method_name, backbone=backbone).to(device)
    optimizer = torch.optim.Adam(method.param_groups(OptimConfig()), lr=1e-4)
    train_images = torch.rand(args.train_batch, 3, args.size, args.size, device=device)
    test_images = torch.rand(args.test_batch, 3, args.size, args.size, device=device)
    batch = method.training_batch(train_images)
    # fitted statistics (ULSAD feature stats, GNL's reference) from one batch, so inference runs as in a real run
    fit_batch = {"image": train_images.cpu(), "path": [f"bench{i}" for i in range(len(train_images))]}
    method.prepare([fit_batch])
    method.calibrate([fit_batch])

    def train_step():
        method.train()
        with autocast(device, args.precision):
            loss = method.loss(batch, 0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        method.eval()
        with autocast(device, args.precision):
            method(test_images)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_times = timed(train_step, device, args.warmup, args.repeats)
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    infer_times = timed(infer, device, args.warmup, args.repeats)
    infer_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step = statistics.median(train_times)
    infer_s = statistics.median(infer_times)
    return {
        "method": method_name, "backbone": backbone_name, "size": args.size, "device": str(device),
        "precision": args.precision, "train_batch": args.train_batch, "test_batch": args.test_batch,
        "trainable_params_M": count_parameters(method, trainable_only=True) / 1e6,
        "train_step_s": step, "train_step_s_all": train_times, "train_images_per_s": args.train_batch / step,
        "infer_batch_s": infer_s, "infer_batch_s_all": infer_times, "infer_images_per_s": args.test_batch / infer_s,
        "train_peak_gib": train_mem, "infer_peak_gib": infer_mem,
    }


def table(rows: list[dict]) -> str:
    head = ("| method | backbone | device | precision | train step (s) @bs | train img/s | infer img/s @bs "
            "| peak GiB train/infer |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mem = (f"{r['train_peak_gib']:.1f} / {r['infer_peak_gib']:.1f}" if r["train_peak_gib"] is not None
               else "–")
        lines.append(f"| {r['method']} | {r['backbone']} | {r['device']} | {r['precision']} "
                     f"| {r['train_step_s']:.3f} @{r['train_batch']} | {r['train_images_per_s']:.2f} "
                     f"| {r['infer_images_per_s']:.2f} @{r['test_batch']} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="method:backbone pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--test-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for case in args.cases:
        method_name, backbone_name = case.split(":")
        torch.set_num_threads(args.threads)  # imports (numba, cv2) can reset it
        assert torch.get_num_threads() == args.threads, torch.get_num_threads()
        rows.append(bench_case(method_name, backbone_name, args, device))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor(), "cuda": torch.cuda.get_device_name(device) if device.type == "cuda"
           else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
