"""Training, evaluation and prediction on Lightning Fabric: a plain loop, resumable exactly.

A run folder holds ``config.yaml`` (resolved), ``log.jsonl`` (every loss term and eval metric),
``metrics.json`` (final model), ``checkpoints/`` (safetensors weights + training state) and ``overlays/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, load_weights, save_checkpoint, write_json, write_yaml
from .config import RunConfig
from .methods.base import Method

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


# -- building blocks ---------------------------------------------------------------------------------------
def build_method(cfg: RunConfig, *, weights_from_checkpoint: bool = False) -> Method:
    """Backbone + method from a run config. With ``weights_from_checkpoint`` the backbone is built without
    downloading weights, because a checkpoint is about to overwrite every tensor (strictly checked)."""
    from .backbones import create_backbone
    from .registry import get_method_class

    cls = get_method_class(cfg.method)
    weights = None if weights_from_checkpoint else cfg.backbone.weights
    backbone = create_backbone(cfg.backbone.name, taps=cfg.backbone.taps, weights=weights,
                               trainable=cls.trainable_backbone)
    return cls(cfg.model, backbone)


def set_seed(seed: int, deterministic: bool = True) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on (seed, epoch), sharded over ranks, optionally starting mid-epoch.

    This is what makes ``--resume`` exact: the order of epoch ``e`` can be rebuilt and the batches already
    trained on skipped without loading them.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def make_optimizer(method: Method, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = method.param_groups(o)
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay, "eps": o.eps,
              "amsgrad": o.amsgrad}
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return cls(groups, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int):
    if not cfg.optim.milestones:
        return None
    milestones = sorted({max(1, round(f * total_steps)) for f in cfg.optim.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.optim.gamma)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, sampler=None, drop_last: bool = False,
            shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=False, pin_memory=False)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# -- run folder ---------------------------------------------------------------------------------------------
def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["optim"]["betas"] = list(cfg.optim.betas)
    return data


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    category = cfg.data.category or Path(cfg.data.root or "data").name
    return Path(cfg.output_dir) / (cfg.name or f"{cfg.method}-{category}-{stamp}")


class JsonlLog:
    """Append-only JSON-lines log; on resume, entries written after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, batches_done: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("batch", 0) <= batches_done]
        atomic_write(self.path, lambda fh: fh.write(("\n".join(kept) + "\n" if kept else "").encode()))

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# -- evaluation ---------------------------------------------------------------------------------------------
@dataclass
class EvalOutputs:
    maps: np.ndarray  # (N, H, W) float32
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) uint8
    paths: list[str]
    defects: list[str]


@torch.no_grad()
def predict_dataset(method: Method, dataset: Dataset, batch_size: int, device: torch.device,
                    num_workers: int = 0, autocast=None, desc: str = "eval") -> EvalOutputs:
    """Run a model over a labelled dataset and collect maps, scores, masks and labels on the CPU."""
    was_training = method.training
    method.eval()
    maps, scores, labels, masks, paths, defects = [], [], [], [], [], []
    loader = _loader(dataset, batch_size, num_workers)
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        with autocast() if autocast else nullcontext():
            pred = method(images)
        maps.append(pred.anomaly_map.float().squeeze(1).cpu().numpy())
        scores.append(pred.score.float().cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"].squeeze(1).numpy().astype(np.uint8))
        paths += list(batch["path"])
        defects += list(batch["defect"])
    method.train(was_training)
    return EvalOutputs(np.concatenate(maps), np.concatenate(scores), np.concatenate(labels),
                       np.concatenate(masks), paths, defects)


def score_outputs(out: EvalOutputs, cfg: RunConfig, dataset: Dataset | None = None) -> dict[str, float]:
    """The standard metrics of one test set, plus whatever the dataset adds.

    A dataset may define ``extra_metrics(outputs: EvalOutputs) -> dict[str, float]`` (e.g. MVTec LOCO's
    structural/logical AUROC and sPRO) and ``has_masks`` (False: image-level metrics only).
    """
    from .metrics import compute_metrics

    has_masks = getattr(dataset, "has_masks", True)
    if cfg.eval.pixel_metrics and has_masks and out.masks.any():
        names = ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image")
        metrics = compute_metrics(out.scores, out.labels, out.maps, out.masks, metrics=names,
                                  mask_threshold=0.5, fpr_limit=cfg.eval.fpr_limit)
    else:
        metrics = compute_metrics(out.scores, out.labels, metrics=("image_auroc",))
    if hasattr(dataset, "extra_metrics"):
        metrics.update(dataset.extra_metrics(out))
    return metrics


def write_test_results(out: EvalOutputs, folder: Path, pixel_curves: bool = True) -> None:
    """``test_scores.csv`` (one row per test image) and ``curves.json`` (image ROC; PRO curve when masks exist),
    so that reports can be drawn later without the model or the data."""
    from sklearn.metrics import roc_curve

    from .metrics import pro_curve

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "defect", "label", "score"])
    writer.writerows(zip(out.paths, out.defects, out.labels.tolist(), out.scores.tolist()))
    atomic_write(folder / "test_scores.csv", lambda fh: fh.write(buffer.getvalue().encode()))
    curves: dict[str, Any] = {}
    if len(set(out.labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(out.labels, out.scores)
        curves["image_roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if pixel_curves and out.masks.any() and not out.masks.all():
        fpr, pro, _ = pro_curve(out.maps, out.masks, num_thresholds=256)
        curves["pro"] = {"fpr": fpr.tolist(), "pro": pro.tolist()}
    write_json(folder / "curves.json", curves)


def write_overlays(out: EvalOutputs, dataset: Dataset, folder: Path, count: int) -> list[Path]:
    """Overlays for up to ``count`` test images spread over the score ranking (highest, lowest, between)."""
    from .visualize import heatmap_overlay, save_png

    if count <= 0 or len(out.scores) == 0:
        return []
    order = np.argsort(-out.scores, kind="stable")
    picks = sorted(set(order[np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)].tolist()))
    vmin, vmax = float(np.percentile(out.maps, 1)), float(out.maps.max())
    written = []
    for i in picks:
        image = dataset[i]["image"].permute(1, 2, 0).numpy()
        rgb = heatmap_overlay(image, out.maps[i], vmin, vmax, out.masks[i])
        path = folder / f"{i:04d}_{out.defects[i]}_{Path(out.paths[i]).stem}_score{out.scores[i]:.4f}.png"
        save_png(path, rgb)
        written.append(path)
    return written


# -- training -----------------------------------------------------------------------------------------------
def _fabric(cfg: RunConfig):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=cfg.train.accelerator, devices=cfg.train.devices, precision=cfg.train.precision)
    fabric.launch()
    return fabric


def _schedule(cfg: RunConfig, batches_per_epoch: int) -> int:
    if batches_per_epoch == 0:
        raise ValueError(f"the training set gives no batch (batch_size {cfg.data.batch_size}, "
                         f"drop_last {cfg.data.drop_last}); lower data.batch_size")
    if cfg.train.iterations:
        return int(cfg.train.iterations)
    if not cfg.train.epochs:
        raise ValueError("set train.epochs or train.iterations")
    return int(cfg.train.epochs) * batches_per_epoch


def fit(cfg: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        stop_after: int | None = None) -> RunResult:
    """Train ``cfg.method`` on ``cfg.data``, evaluate the final model, write the run folder.

    Args:
        cfg: the resolved run configuration.
        run_dir: where to write; default ``output_dir/<method>-<category>-<time>``.
        resume: continue the run in ``run_dir`` from its last checkpoint, exactly.
        stop_after: stop (after checkpointing) once this many batches are done — simulates an interrupted run.
    """
    from .data import build_datasets

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    fabric = _fabric(cfg)
    set_seed(cfg.train.seed, cfg.train.deterministic)
    method = build_method(cfg)
    train_set, holdout_set, test_set = build_datasets(cfg.data, views=method.train_views, seed=cfg.train.seed)
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(run_dir / CONFIG_FILE, config_to_dict(cfg))
    jsonl = JsonlLog(run_dir / LOG_FILE, enabled=fabric.is_global_zero)

    method.prepare(_loader(train_set, cfg.data.eval_batch_size, cfg.data.num_workers))
    optimizer = make_optimizer(method, cfg)
    model, optimizer = fabric.setup(method, optimizer)
    model.mark_forward_method("loss")
    batch_size, world = cfg.data.batch_size, fabric.world_size
    per_rank = math.ceil(len(train_set) / world)
    batches_per_epoch = per_rank // batch_size if cfg.data.drop_last else math.ceil(per_rank / batch_size)
    total = _schedule(cfg, batches_per_epoch)
    accumulate = max(1, cfg.train.accumulate)
    scheduler = make_scheduler(optimizer, cfg, total // accumulate)

    done = 0
    if resume:
        done = _restore(run_dir, method, optimizer, scheduler)
        jsonl.truncate_after(done)
        log.info("resumed %s at batch %d/%d", run_dir, done, total)

    loop = _TrainLoop(cfg, fabric, model, method, optimizer, scheduler, train_set, test_set, run_dir, jsonl,
                      total, batches_per_epoch, accumulate)
    done = loop.run(done, stop_after)
    if done < total:
        return RunResult(run_dir, {}, jsonl.read())

    calibration = _calibrate(method, cfg, holdout_set, test_set)
    out = predict_dataset(method, test_set, cfg.data.eval_batch_size, fabric.device, cfg.data.num_workers,
                          fabric.autocast, desc="test")
    metrics = score_outputs(out, cfg, test_set)
    if fabric.is_global_zero:
        loop.checkpoint(done)
        final = {"batches": done, "kind": "final", **metrics}
        jsonl.write(final)
        selected = {}
        if cfg.eval.selection == "best_test":
            selected = _select_best_test(jsonl.read(), metrics, done, batches_per_epoch, cfg.eval.selection_metrics)
            jsonl.write({"batch": done, "kind": "selected", **selected})
        write_json(run_dir / METRICS_FILE, {"metrics": metrics, **selected, **calibration, "method": cfg.method,
                                            "category": cfg.data.category, "batches": done,
                                            "n_train": len(train_set), "n_test": len(test_set)})
        write_test_results(out, run_dir, cfg.eval.pixel_metrics and getattr(test_set, "has_masks", True))
        write_overlays(out, test_set, run_dir / "overlays", cfg.eval.overlays)
        if cfg.eval.plots:
            from .plots import plot_run

            plot_run(run_dir)
    return RunResult(run_dir, metrics, jsonl.read())


def _calibrate(method: Method, cfg: RunConfig, holdout_set: Dataset | None, test_set: Dataset) -> dict[str, Any]:
    """Run ``method.calibrate`` on held-out normals, or (parity only) on the test set's good images."""
    if cfg.eval.calibrate_on == "test_good":
        labels = getattr(test_set, "labels", None) or [test_set[i]["label"] for i in range(len(test_set))]
        good = torch.utils.data.Subset(test_set, [i for i, label in enumerate(labels) if label == 0])
        method.calibrate(_loader(good, cfg.data.eval_batch_size, cfg.data.num_workers))
        return {"calibration": {"data": "test_good", "images": len(good),
                                "label": "calibrated on good TEST images (official parity; test-set leakage)"}}
    if holdout_set is not None:
        method.calibrate(_loader(holdout_set, cfg.data.eval_batch_size, cfg.data.num_workers))
        return {"calibration": {"data": "holdout", "images": len(holdout_set)}}
    return {}


def _select_best_test(history: list[dict[str, Any]], final: dict[str, float], done: int, batches_per_epoch: int,
                      keys: Sequence[str] = ("pixel_auroc", "image_auroc", "aupro_per_image")) -> dict[str, Any]:
    """The official RD++ / ULSAD rule: the epoch-end evaluation (or the final model) with the best mean of ``keys``
    on the TEST set; the first best wins, as the official strict ``>``."""
    candidates = [e for e in history if e.get("kind") == "eval" and e.get("epoch_end")]
    candidates.append({"batch": done, "epoch": (done - 1) // batches_per_epoch, **final})
    best, best_score = candidates[-1], -math.inf
    for entry in candidates:
        values = [entry[k] for k in keys if k in entry]
        score = float(np.mean(values)) if values else -math.inf
        if score > best_score:
            best, best_score = entry, score
    metrics = {k: v for k, v in best.items() if k not in ("batch", "epoch", "kind", "epoch_end")}
    return {"selected_metrics": metrics, "selection": {
        "rule": "best_test", "label": "test-set model selection (official rule; optimistic, parity only)",
        "batch": best["batch"], "epoch": best["epoch"], "score": best_score, "keys": list(keys)}}


def _restore(run_dir: Path, method: Method, optimizer, scheduler) -> int:
    weights, state = load_checkpoint(run_dir / CHECKPOINT_DIR)
    method.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    from .checkpoint import set_rng_state

    set_rng_state(state["rng"])
    return int(state["batches_done"])


class _TrainLoop:
    """The loop itself, split out of :func:`fit` so each piece stays short."""

    def __init__(self, cfg, fabric, model, method, optimizer, scheduler, train_set, test_set, run_dir, jsonl,
                 total, batches_per_epoch, accumulate):
        self.cfg, self.fabric, self.model, self.method = cfg, fabric, model, method
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_set, self.test_set, self.run_dir, self.jsonl = train_set, test_set, run_dir, jsonl
        self.total, self.per_epoch, self.accumulate = total, batches_per_epoch, accumulate
        self.window: dict[str, list[float]] = {}

    def batches(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg, done = self.cfg, start
        while done < self.total:
            epoch, offset = divmod(done, self.per_epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            sampler = EpochSampler(len(self.train_set), cfg.train.seed, epoch, offset * cfg.data.batch_size,
                                   self.fabric.global_rank, self.fabric.world_size)
            loader = _loader(self.train_set, cfg.data.batch_size, cfg.data.num_workers, sampler, cfg.data.drop_last)
            for batch in loader:
                yield epoch, batch
                done += 1
                if done >= self.total:
                    return

    def run(self, done: int, stop_after: int | None) -> int:
        cfg = self.cfg
        self.method.train()
        bar = tqdm(total=self.total, initial=done, desc=f"fit {cfg.method}", dynamic_ncols=True,
                   disable=not self.fabric.is_global_zero)
        for epoch, batch in self.batches(done):
            terms = self.step(batch, done)
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            self.record(terms, done, epoch)
            epoch_end = cfg.eval.selection == "best_test" and done % self.per_epoch == 0
            if done < self.total and (epoch_end or (cfg.train.eval_every and done % cfg.train.eval_every == 0)):
                self.evaluate(done, epoch, epoch_end)
            if self._should_checkpoint(done, stop_after):
                self.checkpoint(done)
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        return done

    def step(self, batch: dict[str, Any], done: int) -> dict[str, float]:
        batch = _to_device(batch, self.fabric.device)
        progress = done / self.total
        terms = self.model.loss(batch, progress)
        self.fabric.backward(terms["loss"] / self.accumulate if self.cfg.train.accumulate_mean else terms["loss"])
        if (done + 1) % self.accumulate == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def record(self, terms: dict[str, float], done: int, epoch: int) -> None:
        for key, value in terms.items():
            self.window.setdefault(key, []).append(value)
        if done % max(1, self.cfg.train.log_every) == 0 or done == self.total:
            entry = {"batch": done, "epoch": epoch, "kind": "train",
                     "lr": [g["lr"] for g in self.optimizer.param_groups]}
            entry.update({k: float(np.mean(v)) for k, v in self.window.items()})
            self.jsonl.write(entry)
            self.window = {}

    def evaluate(self, done: int, epoch: int, epoch_end: bool = False) -> None:
        out = predict_dataset(self.method, self.test_set, self.cfg.data.eval_batch_size, self.fabric.device,
                              self.cfg.data.num_workers, self.fabric.autocast, desc=f"eval@{done}")
        metrics = score_outputs(out, self.cfg, self.test_set)
        self.jsonl.write({"batch": done, "epoch": epoch, "kind": "eval", **({"epoch_end": True} if epoch_end else {}),
                          **metrics})
        log.info("batch %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _should_checkpoint(self, done: int, stop_after: int | None) -> bool:
        if done % self.accumulate:  # never save with gradients pending: they could not be restored
            return False
        every = self.cfg.train.checkpoint_every
        return bool(every and done % every == 0) or (stop_after is not None and done >= stop_after)

    def checkpoint(self, done: int) -> None:
        if not self.fabric.is_global_zero:
            return
        from .checkpoint import rng_state

        state = {"batches_done": done, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "rng": rng_state()}
        save_checkpoint(self.run_dir / CHECKPOINT_DIR, self.method.state_dict(), state)


# -- loading, testing, predicting --------------------------------------------------------------------------
def read_run_config(run_dir: str | Path) -> RunConfig:
    from .cli import config_from_dict

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a reconad run folder (no {CONFIG_FILE})")
    import yaml

    return config_from_dict(yaml.safe_load(path.read_text()))


def load(run_dir: str | Path, map_location: str | torch.device = "cpu") -> Method:
    """The trained model of a run folder, in eval mode."""
    cfg = read_run_config(run_dir)
    method = build_method(cfg, weights_from_checkpoint=True)
    method.load_state_dict(load_weights(Path(run_dir) / CHECKPOINT_DIR / "model.safetensors"), strict=True)
    return method.to(map_location).eval()


def evaluate(run_dir: str | Path, data_overrides: dict[str, Any] | None = None, device: str = "cpu",
             write: bool = True) -> dict[str, float]:
    """Evaluate a trained run on its (or another) test set; writes ``test_metrics.json`` and overlays."""
    from dataclasses import replace

    from .data import build_datasets

    cfg = read_run_config(run_dir)
    if data_overrides:
        cfg.data = replace(cfg.data, **data_overrides)
    method = load(run_dir, device)
    _, _, test_set = build_datasets(cfg.data)
    out = predict_dataset(method, test_set, cfg.data.eval_batch_size, torch.device(device), cfg.data.num_workers)
    metrics = score_outputs(out, cfg, test_set)
    if write:
        write_json(Path(run_dir) / "test_metrics.json", {"metrics": metrics, "data": asdict(cfg.data)})
        write_overlays(out, test_set, Path(run_dir) / "test_overlays", cfg.eval.overlays)
    return metrics


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _image_files(inputs: str | Path | Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(file, output name without suffix): relative to the folder given, else the file name."""
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        root = Path(inputs)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {inputs}")
        return [(p, p.relative_to(root).with_suffix("")) for p in files]
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    names = [Path(p.stem) for p in paths]
    if len(set(names)) < len(names):
        raise ValueError("several input files share a name; pass their common folder instead")
    return list(zip(paths, names))


def predict(run_dir: str | Path, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
            device: str = "cpu", batch_size: int = 8) -> list[dict[str, Any]]:
    """Anomaly maps (float TIFF), heat-map overlays (PNG) and ``scores.csv`` for a folder or list of images."""
    from .data.transforms import load_image, resize_image
    from .visualize import heatmap_overlay, save_float_map, save_png

    cfg = read_run_config(run_dir)
    method = load(run_dir, device)
    files, output_dir = _image_files(inputs), Path(output_dir)
    rows, results = [], []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", dynamic_ncols=True):
        chunk = files[start:start + batch_size]
        images = torch.stack([resize_image(load_image(p), cfg.data.image_size, cfg.data.resize,
                                           cfg.data.crop_size) for p, _ in chunk])
        pred = method.predict(images.to(device))
        for (path, name), image, amap, score in zip(chunk, images, pred.anomaly_map, pred.score):
            results.append((path, name, image.permute(1, 2, 0).numpy(), amap[0].float().cpu().numpy(), float(score)))
    vmin = float(np.percentile(np.stack([r[3] for r in results]), 1))
    vmax = float(max(r[3].max() for r in results))
    for path, name, image, amap, score in results:
        save_float_map(output_dir / "maps" / f"{name}.tiff", amap)
        save_png(output_dir / "overlays" / f"{name}.png", heatmap_overlay(image, amap, vmin, vmax))
        rows.append({"path": str(path), "score": score})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "score"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output_dir / "scores.csv", lambda fh: fh.write(buffer.getvalue().encode()))
    return rows
