"""Does ULSAD's global branch react to logical anomalies more than its local branch? (issue #9)

Generates a synthetic MVTec LOCO-layout category (``reconad.data.loco.write_synthetic_loco``: a red square and a
blue disc; logical anomalies = the disc missing or replaced by a second square; structural = dark blobs),
trains ULSAD briefly with the offline EfficientNet-Lite0 stand-in backbone (taps blocks.2 + blocks.4, strides 8
and 16), fits the quantiles on ``validation/good`` and reports, per branch (local / global / combined), the image
AUROC (max of the branch map) on good vs logical and good vs structural, and the mean map value inside the
logical regions relative to good images. Prints a table and writes JSON.

    python benchmarks/ulsad_loco_logical.py --iterations 150 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from reconad.backbones import create_backbone
from reconad.config import DataConfig
from reconad.data.loco import LocoDataset, write_synthetic_loco
from reconad.metrics import image_auroc
from reconad.registry import create_method


def branch_outputs(model, dataset, batch_size: int = 16) -> dict[str, np.ndarray]:
    maps = {"local": [], "global": []}
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            local, glob = model.branch_maps(batch["image"])
            maps["local"].append(local[:, 0].numpy())
            maps["global"].append(glob[:, 0].numpy())
    out = {k: np.concatenate(v) for k, v in maps.items()}
    out["combined"] = 0.5 * out["local"] + 0.5 * out["global"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=76)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/ulsad_loco_logical.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = write_synthetic_loco(Path(tempfile.mkdtemp()) / "loco", n_train=args.n_train, n_validation=8, n_good=12,
                                n_logical=12, n_structural=12, size=args.size, seed=args.seed)
    cfg = DataConfig(root=str(root), category="parts", layout="loco", image_size=args.size)
    train, val, test = (LocoDataset(root, "parts", s, cfg) for s in ("train", "validation", "test"))
    backbone = create_backbone("efficientnet_lite0", taps=("blocks.2", "blocks.4"))
    model = create_method("ulsad", backbone=backbone, feature_dim=args.feature_dim)
    model.prepare(DataLoader(train, batch_size=16))
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=2e-5)
    gen, done, start, history = torch.Generator().manual_seed(args.seed), 0, time.time(), []
    model.train()
    while done < args.iterations:
        for batch in DataLoader(train, batch_size=args.batch, shuffle=True, generator=gen, drop_last=True):
            terms = model.loss(batch, done / args.iterations)
            optim.zero_grad()
            terms["loss"].backward()
            optim.step()
            done += 1
            if done % 25 == 0 or done == args.iterations:
                history.append({"step": done, **{k: round(float(v.detach()), 4) for k, v in terms.items()}})
            if done >= args.iterations:
                break
    train_s = time.time() - start
    model.calibrate(DataLoader(val, batch_size=16))
    maps = branch_outputs(model, test)
    defects = np.array([r.defect for r in test.records])
    labels = np.array(test.labels)
    good = defects == "good"
    logical_mask = np.zeros_like(maps["local"], dtype=bool)
    for i in np.flatnonzero(defects == "logical_anomalies"):
        logical_mask[i] = test[i]["mask"][0].numpy() > 0
    rows = {}
    for branch, m in maps.items():
        scores = m.reshape(len(m), -1).max(1)
        row = {}
        for kind in ("logical_anomalies", "structural_anomalies"):
            sel = good | (defects == kind)
            row[f"{kind.split('_')[0]}_image_auroc"] = image_auroc(scores[sel], labels[sel])
        # mean map inside the logical regions, in units of the good images' pixel std above their mean
        row["logical_region_z"] = float((m[logical_mask].mean() - m[good].mean()) / m[good].std())
        rows[branch] = row
    print(f"ULSAD on synthetic LOCO ({args.size} px, {done} iterations of {args.batch}, lr {args.lr}, "
          f"feature_dim {args.feature_dim}, {args.threads} thread(s), training {train_s:.0f} s)")
    print(f"{'branch':<10}{'logical AUROC':>15}{'structural AUROC':>18}{'logical region z':>18}")
    for branch, row in rows.items():
        print(f"{branch:<10}{row['logical_image_auroc']:>15.3f}{row['structural_image_auroc']:>18.3f}"
              f"{row['logical_region_z']:>18.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "train_seconds": train_s, "branches": rows, "history": history},
                              indent=1))


if __name__ == "__main__":
    main()
