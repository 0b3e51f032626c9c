"""What ``reconad.allocator.tune_cpu_allocator`` (called by the CLI) buys on the CPU; prints a table, writes JSON.

    python benchmarks/allocator.py                      # five methods, EfficientNet-Lite0 128 px, one thread
    python benchmarks/allocator.py --methods recontrast --pairs 8

The allocator is a per-process setting, so each measurement is a fresh process: ``--pairs`` pairs of processes,
glibc's defaults and the tuned thresholds in alternating order (off-on, on-off, ...). Each process times
``--repeats`` eval batches (batch 8) and training steps (batch 4) of the same random-init model and reports their
medians, its peak RSS and a SHA-256 of its maps; the table shows the medians over the pairs, and the maps' hashes
must be equal (the setting changes where memory comes from, never a number).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(method_name: str, tuned: bool, repeats: int, size: int) -> dict:
    """One process's figures (run with ``--child``)."""
    from reconad.allocator import tune_cpu_allocator

    applied = tune_cpu_allocator() if tuned else None
    import torch
    from speed import (  # benchmarks/ is this script's sys.path[0]
        build,
        fit_statistics,
        ours_eval,
        ours_optimizer,
        peak_memory,
        seconds,
        set_threads,
        train_step_fn,
    )

    cpu = torch.device("cpu")
    set_threads(1)
    method = build(method_name, "efficientnet_lite0", cpu)
    g = torch.Generator().manual_seed(1)
    train_images, eval_images = torch.rand(4, 3, size, size, generator=g), torch.rand(8, 3, size, size, generator=g)
    fit_statistics(method, train_images)
    step = train_step_fn(method, ours_optimizer(method), lambda: method.training_batch(train_images), cpu, "32-true")

    def evaluate():
        method.eval()
        return ours_eval(method, eval_images)

    maps = evaluate()  # before any step: the maps of the same weights in every process
    times: dict[str, list[float]] = {"eval": [], "train": []}
    for _ in range(repeats + 1):  # the first of each is a warm-up
        for name, fn in (("eval", evaluate), ("train", step)):
            times[name].append(seconds(fn, cpu))
    return {"tuned": bool(applied), "eval_b8_s": statistics.median(times["eval"][1:]),
            "train_b4_s": statistics.median(times["train"][1:]), "peak_rss_gib": peak_memory(cpu)["peak_rss_gib"],
            "maps_sha256": hashlib.sha256(maps.tobytes()).hexdigest()}


def run_child(method_name: str, tuned: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method_name, "--repeats", str(args.repeats),
           "--size", str(args.size)] + (["--tuned"] if tuned else [])
    from speed import run_json_child

    return run_json_child(cmd)


def bench(method_name: str, args) -> dict:
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for pair in range(args.pairs):
        for tuned in (False, True) if pair % 2 == 0 else (True, False):
            runs[tuned].append(run_child(method_name, tuned, args))
    hashes = {r["maps_sha256"] for rs in runs.values() for r in rs}
    if not all(r["tuned"] for r in runs[True]):
        raise RuntimeError("tune_cpu_allocator set nothing (not glibc?): nothing to compare")

    def med(tuned: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[tuned])

    row = {"method": method_name, "pairs": args.pairs, "maps_identical": len(hashes) == 1}
    for key in ("eval_b8_s", "train_b4_s", "peak_rss_gib"):
        row[f"default_{key}"], row[f"tuned_{key}"] = med(False, key), med(True, key)
    row["eval_speedup"] = row["default_eval_b8_s"] / row["tuned_eval_b8_s"]
    row["train_speedup"] = row["default_train_b4_s"] / row["tuned_train_b4_s"]
    row["runs"] = {"default": runs[False], "tuned": runs[True]}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | eval b8 s default / tuned (×) | train step b4 s default / tuned (×) | peak RSS GiB default / "
             "tuned | maps identical |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['default_eval_b8_s']:.3f} / {r['tuned_eval_b8_s']:.3f} "
                     f"({r['eval_speedup']:.2f}) | {r['default_train_b4_s']:.3f} / {r['tuned_train_b4_s']:.3f} "
                     f"({r['train_speedup']:.2f}) | {r['default_peak_rss_gib']:.2f} / {r['tuned_peak_rss_gib']:.2f} "
                     f"| {'yes' if r['maps_identical'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rd4ad", "recontrast", "rdpp", "gnl", "ulsad"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "allocator_cpu.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tuned, args.repeats, args.size)))
        return
    from speed import write_json

    rows = []
    for name in args.methods:
        rows.append(bench(name, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write_json(args.out, {"rows": rows})
    print("\n" + table(rows))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
