"""A whole ``reconad fit`` against an official-style whole run of the same work, in images/s; prints a table and
writes JSON (benchmarks/results/fit_*.json). Never run by the tests.

    python benchmarks/fit.py --threads 1 --epochs 2                       # every method, the demo's tissue category

Ours is ``reconad.api.fit_config`` on the built-in demo data (48 train images, 40 test images with masks, 128 px):
the engine's data loading and per-image views, the feature cache where it applies, checkpoints, calibration, the
final evaluation with every metric, the result files and overlays — everything the command does. The reference is
the same work done the official way, with the same modules (``speed.official_style``): images decoded and given
their views one at a time in a DataLoader, every step computed as the official code computes it, PyTorch's default
Adam, then one test image per forward with the map made in float64 on the CPU (``speed.reference_eval``), image and
pixel AUROC with scikit-learn and the RD family's per-image AUPRO (``metrics_reference.official_per_image_aupro``).
ULSAD's reference keeps the preset width 384 (ours derives 38 from EfficientNet-Lite0's taps) and, as the official
code, calibrates on the good test images (ours too here: ``eval.calibrate_on: test_good``). ssl_ae has no official
code: its row reports ours only.

Ours runs twice: as the command runs by default, and without its figures (``eval.examples: 0``,
``eval.plots: false``, ``eval.overlays: 0``), which the official code does not draw; the difference is their fixed
cost per run. Both sides run in one warm process (the modules ``reconad fit`` imports are imported, and timed,
before the first run: a new ``reconad fit`` process pays that once), with glibc's allocator defaults.

``--processes`` runs every run in a fresh process instead, each as its program runs: ours with the memory-allocator
setting the ``reconad`` command makes before any command (``reconad.allocator``: large feature maps reuse heap
memory instead of fresh zero pages), the reference as a plain Python script with glibc's defaults. Imports are paid
before each process starts its clock; the order alternates as above.

Random-init EfficientNet-Lite0 (speed does not depend on the weights), batch 8, ``--epochs`` epochs, the runs in
alternating order (ours, ours without figures, ref, then reversed, ...); figures are medians. Torch's thread count
is set explicitly and re-checked after imports.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from speed import (  # benchmarks/ is this script's sys.path[0]
    PngImages,
    build,
    cpu_name,
    official_style,
    reference_eval,
    run_json_child,
    set_threads,
    train_step_fn,
    write_json,
)

from reconad.config import OptimConfig

METHODS = ("rd4ad", "recontrast", "rdpp", "gnl", "ulsad", "ssl_ae")
RD_FAMILY = ("rd4ad", "recontrast", "rdpp", "gnl")
CATEGORY = "tissue"
BATCH = 8


def demo_category(base: Path) -> Path:
    from reconad.data.demo import ensure_demo_data

    return ensure_demo_data(base / "demo") / CATEGORY


NO_FIGURES = {"examples": 0, "plots": False, "overlays": 0}


def import_seconds() -> float:
    """Import what ``reconad fit`` imports on its way (timm, Lightning, matplotlib, ...), once, timed."""
    import importlib

    start = time.perf_counter()
    for name in ("timm", "lightning.fabric", "matplotlib.pyplot", "reconad.engine.loop", "reconad.plots",
                 "reconad.visualize", "sklearn.metrics"):
        importlib.import_module(name)
    return time.perf_counter() - start


def ours_config(method_name: str, root: Path, epochs: int, figures: bool = True):
    """The method's preset (its official recipe) at the benchmark's backbone, size, batch and epochs."""
    from reconad.config import make_config

    data = {"root": str(root.parent), "category": root.name, "image_size": 128, "batch_size": BATCH,
            "eval_batch_size": BATCH, "num_workers": 0}
    evaluation: dict[str, Any] = {} if figures else dict(NO_FIGURES)
    if method_name == "ulsad":  # the official calibration set (good test images), as the reference below
        data["holdout_fraction"] = 0.0
        evaluation["calibrate_on"] = "test_good"
    elif method_name != "ssl_ae":
        data["holdout_fraction"] = 0.0
    return make_config(method_name, data=data, backbone={"name": "efficientnet_lite0", "weights": None},
                       train={"epochs": epochs, "iterations": None, "accelerator": "cpu", "devices": 1},
                       eval=evaluation)


def run_ours(method_name: str, root: Path, epochs: int, work: Path, figures: bool = True) -> dict[str, Any]:
    from reconad.api import fit_config

    run_dir = work / f"run-{method_name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = ours_config(method_name, root, epochs, figures)
    start = time.perf_counter()
    result = fit_config(cfg, run_dir)
    seconds = time.perf_counter() - start
    summary = json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": seconds, "n_train": summary["n_train"], "n_test": summary["n_test"],
            "batches": summary["batches"], "metrics": result.metrics}


# -- the official-style whole run -----------------------------------------------------------------------------------
def split_items(dataset) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images in [0, 1], masks, labels) of a split, read by the project's dataset (decode + resize)."""
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([it["image"] for it in items]), torch.cat([it["mask"] for it in items]).numpy() > 0.5,
            np.array([it["label"] for it in items]))


def run_reference(method_name: str, root: Path, epochs: int, ours_width: int | None) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from reconad.data.layouts import build_datasets
    from reconad.metrics_reference import official_per_image_aupro

    start = time.perf_counter()
    cpu = torch.device("cpu")
    model = {"feature_dim": 384} if method_name == "ulsad" and ours_width != 384 else {}
    ref = build(method_name, "efficientnet_lite0", cpu, **model)
    train_set, _, test_set = build_datasets(ours_config(method_name, root, epochs).data)
    files = [record.path for record in train_set.records]
    data = PngImages.from_files(files, ref)  # decoded and given their views one at a time, as the official loaders
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)  # official: shuffle, no drop_last
    ref.prepare({"image": b["image"]} for b in loader)
    optimizer = torch.optim.Adam(ref.param_groups(OptimConfig()), lr=1e-4)
    step = train_step_fn(ref, optimizer, lambda: next(batches), cpu, "32-true")
    with official_style(ref):
        for _ in range(epochs):
            batches = iter(loader)
            for _ in range(len(loader)):
                step()
    images, masks, labels = split_items(test_set)
    ref.eval()
    if method_name == "ulsad":  # official: quantiles on the good test images
        ref.calibrate([{"image": images[labels == 0]}])
    # the RD family's official test loops take one image per forward; ULSAD's anomalib evaluation batches of 32
    per_forward = 1 if method_name in RD_FAMILY else 32
    maps = np.concatenate([reference_eval(ref, images[i:i + per_forward])
                           for i in range(0, len(images), per_forward)])[:, 0]
    scores = maps.reshape(len(maps), -1).max(axis=1)
    metrics = {"image_auroc": roc_auc_score(labels, scores), "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel())}
    if method_name in RD_FAMILY:
        metrics["aupro_per_image"] = official_per_image_aupro(maps, masks, labels)
    return {"seconds": time.perf_counter() - start, "n_train": len(files), "n_test": len(images),
            "batches": epochs * len(loader), "metrics": metrics}


# -- one variant in a fresh process (--processes) --------------------------------------------------------------------
def run_variant(variant: str, method_name: str, root: Path, epochs: int, work: Path,
                ours_width: int | None) -> dict[str, Any]:
    if variant == "ref":
        return run_reference(method_name, root, epochs, ours_width)
    return run_ours(method_name, root, epochs, work, figures=variant == "ours")


def child(args) -> dict[str, Any]:
    """One variant as its program runs: ours as the ``reconad`` command does (allocator tuned before anything
    else), the reference as a plain Python script (glibc's defaults); imports are paid before the clock starts."""
    tuned = None
    if args.child != "ref":
        from reconad.allocator import tune_cpu_allocator

        tuned = tune_cpu_allocator()
    import_seconds()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_variant(args.child, args.methods[0], Path(args.root), args.epochs, Path(tmp), args.ours_width)
    return {**out, "allocator_tuned": bool(tuned)}


def run_child(variant: str, method_name: str, root: Path, args, ours_width: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--methods", method_name, "--epochs", str(args.epochs),
           "--threads", str(args.threads), "--root", str(root)]
    if ours_width is not None:
        cmd += ["--ours-width", str(ours_width)]
    return run_json_child(cmd)


# -- the table ------------------------------------------------------------------------------------------------------
def bench_method(method_name: str, root: Path, args, work: Path) -> dict[str, Any]:
    ours_width = None
    if method_name == "ulsad":
        ours_width = build("ulsad", "efficientnet_lite0", torch.device("cpu")).feature_dim
    names = ("ours", "ours_no_figures", "ref")
    if args.processes:
        variants = {name: lambda name=name: run_child(name, method_name, root, args, ours_width) for name in names}
    else:
        variants = {name: lambda name=name: run_variant(name, method_name, root, args.epochs, work, ours_width)
                    for name in names}
    if method_name == "ssl_ae":  # no official code
        del variants["ref"]
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    order = list(variants)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            set_threads(args.threads)
            runs[name].append(variants[name]())
    row: dict[str, Any] = {"method": method_name, "epochs": args.epochs, "processes": args.processes}
    for name, done in runs.items():
        seconds = statistics.median(r["seconds"] for r in done)
        images = done[0]["n_train"] * args.epochs + done[0]["n_test"]
        row[name] = {"seconds": seconds, "images_per_s": images / seconds, "n_train": done[0]["n_train"],
                     "n_test": done[0]["n_test"], "batches": done[0]["batches"],
                     "all_seconds": [r["seconds"] for r in done], "metrics": done[-1]["metrics"],
                     "allocator_tuned": done[0].get("allocator_tuned", False)}
    if "ref" in row:
        row["speedup"] = row["ref"]["seconds"] / row["ours"]["seconds"]
        row["speedup_no_figures"] = row["ref"]["seconds"] / row["ours_no_figures"]["seconds"]
    if ours_width is not None:
        row["feature_dim"], row["reference_feature_dim"] = ours_width, 384
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | work: train images × epochs + test images | batches ours / ref | ours s (img/s) "
             "| ours without figures s (img/s) | ref s (img/s) | ×ref | ×ref without figures |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, n, f = r["ours"], r["ours_no_figures"], r.get("ref")
        cells = [r["method"], f"{o['n_train']} × {r['epochs']} + {o['n_test']}",
                 f"{o['batches']} / {f['batches'] if f else '–'}", f"{o['seconds']:.1f} ({o['images_per_s']:.2f})",
                 f"{n['seconds']:.1f} ({n['images_per_s']:.2f})",
                 f"{f['seconds']:.1f} ({f['images_per_s']:.2f})" if f else "–",
                 f"{r['speedup']:.2f}" if f else "–", f"{r['speedup_no_figures']:.2f}" if f else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/fit_effnet128_cpu.json")
    parser.add_argument("--processes", action="store_true",
                        help="each run in a fresh process, as the programs run: ours with the CLI's allocator "
                             "setting (reconad.allocator), the reference with glibc's defaults")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ours-width", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args), default=float))
        return
    imports = import_seconds()
    set_threads(args.threads)
    result: dict[str, Any] = {"env": {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_name(),
                                      "machine": platform.machine(), "python": sys.version.split()[0],
                                      "argv": sys.argv[1:]}, "import_seconds": imports, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = demo_category(work)
        for method_name in args.methods:
            result["results"].append(bench_method(method_name, root, args, work))
            print(table(result["results"][-1:]).splitlines()[-1], flush=True)
    print()
    print(table(result["results"]))
    print(f"\nimports before the first run (paid once per `reconad fit` process): {imports:.1f} s")
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
