"""Typed configuration: the single schema behind presets, the CLI and the Python API.

Every field has the official default of RD4AD (the base method); method presets in ``configs/`` override
what differs. Method-specific settings live in each method's own ``Config`` dataclass (``methods/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Where the images are and how they become tensors."""

    root: str | None = None
    """Dataset root. MVTec layout: ``root/<category>/{train,test,ground_truth}``; folder layout: see below."""
    category: str | None = None
    categories: list[str] | None = None
    """MVTec layout only: train one model on the union of these categories (ReContrast's multi-class setting); the
    test set is the union of their test sets. Leave ``category`` unset; evaluate one category afterwards with
    ``categories=None, category=<name>``."""
    layout: Literal["mvtec", "folder", "loco"] = "mvtec"
    normal_dir: str | None = None
    """Folder layout only: folder of normal test images (relative to ``root`` or absolute)."""
    anomalous_dir: str | None = None
    """Folder layout only: folder of anomalous test images."""
    mask_dir: str | None = None
    """Folder layout only: optional masks, named like the anomalous images (``<stem>_mask.png`` or ``<stem>.png``)."""
    train_dir: str | None = None
    """Folder layout only: folder of normal training images."""
    image_size: int = 256
    crop_size: int | None = None
    """Center crop after resizing (ReContrast ISIC: 224); ``None`` keeps the full resized image."""
    resize: Literal["pil", "cv2"] = "pil"
    """``pil``: PIL bilinear with anti-aliasing (RD4AD/ReContrast/GNL); ``cv2``: INTER_LINEAR (RD++/ULSAD)."""
    mask_threshold: float = 0.5
    """Masks are resized bilinearly, scaled to [0, 1] and binarised with ``> mask_threshold`` (ReContrast: 0)."""
    holdout_fraction: float = 0.0
    """Fraction of ``train/good`` kept out of training for calibration (never test data)."""
    holdout_seed: int = 0
    batch_size: int = 16
    eval_batch_size: int = 8
    num_workers: int = 0
    drop_last: bool = False
    loco_spro_fpr_limit: float = 0.05
    """MVTec LOCO layout only: FPR integration limit of the reported sPRO (the LOCO papers report 0.05)."""


@dataclass
class BackboneConfig:
    name: str = "wide_resnet50_2"
    weights: str | None = "imagenet"
    """``"imagenet"`` (the backbone's named default weights), a local file path, or ``None`` (random init)."""
    taps: list[str] | None = None
    """Stages whose outputs are tapped; ``None`` = the backbone's default three (strides 4, 8, 16)."""


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    amsgrad: bool = False
    milestones: list[float] = field(default_factory=list)
    """MultiStepLR milestones as fractions of the total steps (ReContrast multi-class: [0.8])."""
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int | None = 200
    iterations: int | None = None
    """Iteration schedule; when set it wins over ``epochs``."""
    accumulate: int = 1
    """Optimizer step every N batches (RD++: 2)."""
    accumulate_mean: bool = False
    """Divide the loss by ``accumulate`` (False = official RD++: gradients of the N batches are summed)."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["cpu", "cuda", "mps", "auto"] = "auto"
    devices: int | str = 1
    seed: int = 111
    deterministic: bool = True
    eval_every: int | None = None
    """Evaluate on the test set every N optimizer steps (logged only; the final model is reported)."""
    checkpoint_every: int | None = None
    """Write a resumable checkpoint every N optimizer steps (always at the end)."""
    log_every: int = 10
    threads: int | None = None
    """CPU threads for torch (``None`` leaves torch's default)."""


@dataclass
class EvalConfig:
    pixel_metrics: bool = True
    fpr_limit: float = 0.3
    overlays: int = 8
    """How many test overlays (heat maps) to write after the final evaluation."""
    plots: bool = True
    """Render training-curve PNGs from ``log.jsonl`` into ``run_dir/plots/`` after training (``reconad.plots``)."""
    selection: Literal["last", "best_test"] = "last"
    """``last``: report the final model. ``best_test``: ALSO evaluate on the test set after every epoch and report
    the epoch with the best mean of ``selection_metrics`` — the official RD++ / ULSAD rules, i.e. test-set model
    selection (optimistic; for parity runs only). The final-model metrics are kept as well."""
    selection_metrics: list[str] = field(default_factory=lambda: ["pixel_auroc", "image_auroc", "aupro_per_image"])
    """Metrics averaged by ``best_test`` (RD++: these three; ULSAD's official checkpointing: ``[image_auroc]``)."""
    calibrate_on: Literal["holdout", "test_good"] = "holdout"
    """Data for ``Method.calibrate``: held-out training normals (``data.holdout_fraction``), or — official ULSAD
    parity only, test-set leakage — the good images of the test set."""


@dataclass
class RunConfig:
    method: str = "rd4ad"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: Any = None
    """The method's own ``Config`` instance (see ``reconad.methods``)."""
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Category → nested overrides applied when ``data.category`` matches (official per-category settings such
    as RD++'s epoch table or ReContrast's encoder-BN lists live in presets this way)."""
    output_dir: str = "runs"
    name: str | None = None
