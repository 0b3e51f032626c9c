"""Sanity check of Bauer et al.'s Fig. 9 claim for trained ``ssl_ae`` runs: inside a corrupted patch of a NORMAL
test image, the restoration F(X̂) is closer to the clean image X than the corrupted input X̂ was.

Two corruptions per image, both with fixed seeds: the training generator (elastic patch, soft mask) and the
paper's Fig. 9 setup (a square patch swapped in from another normal image, side √|S| for |S|/N = 5 %).
Prints a table and writes JSON.

    python benchmarks/ssl_ae_fig9.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/ssl_ae_fig9.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from reconad.data import build_datasets
from reconad.engine import load, read_run_config


def swap_patch(image: torch.Tensor, donor: torch.Tensor, fraction: float, rng: np.random.Generator):
    _, h, w = image.shape
    side = max(2, int(round(math.sqrt(fraction * h * w))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out, mask = image.clone(), torch.zeros(1, h, w)
    out[:, top:top + side, left:left + side] = donor[:, top:top + side, left:left + side]
    mask[:, top:top + side, left:left + side] = 1.0
    return out, mask


def patch_errors(method, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(‖M⊙(X̂−X)‖₂, ‖M⊙(F(X̂)−X)‖₂) over the patch."""
    with torch.no_grad():
        recon = method.net(corrupted[None])[0]
    return float((mask * (corrupted - clean)).norm()), float((mask * (recon - clean)).norm())


def check_run(run_dir: Path, seed: int = 0) -> dict:
    cfg = read_run_config(run_dir)
    method = load(run_dir).eval()
    _, _, test = build_datasets(cfg.data)
    normals = [test[i]["image"] for i in range(len(test)) if test[i]["label"] == 0]
    rows = {"generator": [], "swap_5pct": []}
    for i, clean in enumerate(normals):
        rng = np.random.default_rng([seed, i])
        var = float(method.pixel_var_)
        out = method.corrupter(clean, rng, var if var >= 0 else None)
        rows["generator"].append(patch_errors(method, clean, out.image, out.mask))
        donor = normals[(i + 1) % len(normals)]
        swapped, mask = swap_patch(clean, donor, 0.05, rng)
        rows["swap_5pct"].append(patch_errors(method, clean, swapped, mask))
    result = {"run": str(run_dir), "category": cfg.data.category, "n_images": len(normals)}
    for name, pairs in rows.items():
        before, after = np.array(pairs).T
        valid = before > 1e-6
        result[name] = {"closer_fraction": float(np.mean(after[valid] < before[valid])),
                        "median_ratio": float(np.median(after[valid] / before[valid])),
                        "mean_input_error": float(before.mean()), "mean_output_error": float(after.mean())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/ssl_ae_fig9.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [check_run(run) for run in args.runs]
    print("| run | category | corruption | images | output closer | median ‖F(X̂)−X‖/‖X̂−X‖ |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        for name in ("generator", "swap_5pct"):
            print(f"| {Path(r['run']).name} | {r['category']} | {name} | {r['n_images']} | "
                  f"{r[name]['closer_fraction']:.2f} | {r[name]['median_ratio']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
