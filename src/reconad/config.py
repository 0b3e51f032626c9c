"""Typed configuration: the single schema behind presets, the CLI and the Python API.

Every field has the official default of RD4AD (the base method); method presets in ``configs/`` override
what differs. Method-specific settings live in each method's own ``Config`` dataclass (``methods/``).

This module is the whole configuration layer: the schema, preset loading with ``base:`` inheritance, per-category
overrides, merging, parsing from a mapping or from argv (jsonargparse), and the one user-error type
(:class:`reconad.errors.ReconadError`). The CLI only hands argv to :func:`parse_fit_args` and prints errors.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, ReconadError, UsageError

__all__ = ["BackboneConfig", "ConfigError", "DataConfig", "EvalConfig", "OptimConfig", "ReconadError", "RunConfig",
           "TrainConfig", "UsageError", "config_from_dict", "config_to_dict", "deep_merge", "list_presets",
           "load_preset", "make_config", "parse_fit_args", "resolve_preset"]


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
    layout: str = "mvtec"
    """Folder structure: ``mvtec``, ``folder``, ``loco``, ``visa``, ``btad`` or a registered one
    (``reconad.data.list_layouts()``; see docs/datasets.md)."""
    masks: Literal["auto", "required", "none"] = "auto"
    """``auto``: use ground-truth masks where the dataset has them; a category without any (MVTec layout: no
    ``ground_truth/``) is evaluated with image-level metrics only. ``required``: every anomalous test image needs a
    mask. ``none``: ignore masks (image-level metrics only)."""
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

    def __post_init__(self) -> None:
        from .data.registry import check_layout_name  # a light module: no layout (and no torch) is imported

        check_layout_name(self.layout)


@dataclass
class BackboneConfig:
    name: str = "wide_resnet50_2"
    weights: str | None = "imagenet"
    """``"imagenet"`` (the backbone's named default weights), a local file path, or ``None`` (random init)."""
    taps: list[str | int] | None = None
    """Stages whose outputs are tapped, by name (``layer2``) or stride (``8``, ``stride8``: the deepest stage at that
    stride, so a preset's taps fit every backbone); ``None`` = the backbone's default three (strides 4, 8, 16)."""


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
    """Training length in BATCHES (data-loader iterations); when set it wins over ``epochs``. With ``accumulate: 2``
    (RD++) 120 iterations are 60 optimizer steps; use ``steps`` to compare methods at equal optimizer steps."""
    steps: int | None = None
    """Training length in OPTIMIZER STEPS (``steps × accumulate`` batches); wins over ``iterations`` and ``epochs``."""
    accumulate: int = 1
    """Optimizer step every N batches (RD++: 2)."""
    accumulate_mean: bool = False
    """Divide the loss by ``accumulate`` (False = official RD++: gradients of the N batches are summed)."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["cpu", "cuda", "mps", "auto"] = "auto"
    devices: int | str = 1
    """Processes (one per GPU, or CPU processes with gloo) training ONE run with DDP (``reconad.engine.distributed``).
    ``data.batch_size`` stays the GLOBAL batch: each of N ranks trains on ``batch_size / N`` disjoint images."""
    strategy: Literal["auto", "ddp"] = "auto"
    """``auto``: DDP when ``devices`` > 1 (a process group with ``ddp_timeout_minutes``), else one device."""
    sync_bn: bool = True
    """Under DDP, BatchNorm layers that train use statistics of the GLOBAL batch, as the official code on one device
    (False: per-rank statistics of ``batch_size / N`` images — faster, not the official behaviour)."""
    ddp_timeout_minutes: float = 10.0
    """A rank waiting longer than this in a collective (another rank crashed or hangs) stops with an error."""
    seed: int = 111
    deterministic: bool = True
    eval_every: int | None = None
    """Evaluate on the test set every N optimizer steps (logged only; the final model is reported)."""
    checkpoint_every: int | None = None
    """Also write a resumable checkpoint every N optimizer steps (always at the end)."""
    checkpoint_minutes: float | None = 5.0
    """Write a resumable checkpoint every this many minutes, and at epoch ends once the last checkpoint is over a
    minute old, so every interrupted run resumes (``null``: only ``checkpoint_every`` and the end)."""
    skip_nonfinite: bool = False
    """Skip batches whose loss is NaN/inf (logged) instead of stopping at the first one with an error."""
    log_every: int = 10
    loggers: list[str] | str = field(default_factory=list)
    """Experiment trackers that also receive every log record and the resolved config (``reconad.trackers``):
    ``tensorboard``, ``mlflow`` (``pip install reconad[track]``), as a list or ``tensorboard,mlflow``;
    ``log.jsonl`` stays the ground truth."""
    threads: int | None = None
    """CPU threads for torch (``None`` leaves torch's default)."""
    feature_cache: Literal["auto", "on", "off"] | bool = "auto"
    """Keep what the method's FROZEN networks compute on each clean training image (RD4AD's teacher taps, the
    ReContrast twin, GNL's clean and gray views, RD++'s clean view, ULSAD's standardised features) from one pass
    before training, instead of recomputing it every epoch (``reconad.engine.cache``): the same numbers, fewer
    MACs; RD4AD then needs no image decoding after that pass. ``auto``: when it fits ``feature_cache_gib``;
    ``on`` (``true``): always (an error if it does not fit); ``off`` (``false``): the official computation."""
    feature_cache_gib: float = 4.0
    """Largest feature cache ``feature_cache: auto`` / ``on`` keeps, in GiB, on the training device."""
    channels_last: bool = False
    """Train with NHWC (``torch.channels_last``) weights and images: a fast switch, off by default because it changes
    the float32 sums in their last bits, which training amplifies (its speed and deviation: docs/performance.md)."""


@dataclass
class EvalConfig:
    far: float = 0.01
    """False-alarm rate of the image threshold that ``fit`` calibrates on held-out normals (``reconad calibrate``
    sets it again at any time; the conformal order statistic needs at least ⌈1/far⌉ − 1 normals)."""
    pixel_far: float = 0.001
    """Fraction of normal pixels above the pixel threshold of predicted masks."""
    normal_dir: str | None = None
    """A folder of normal images (never test images) that ``fit`` calibrates the threshold on at the end, instead of
    the held-out training normals; ``reconad calibrate RUN --normal DIR`` does the same afterwards."""
    pixel_metrics: bool = True
    fpr_limit: float = 0.3
    overlays: int = 8
    """How many test overlays (heat maps) to write after the final evaluation."""
    examples: int = 4
    """How many example panels (input | heat map with colour bar | overlay with ground-truth and predicted-region
    contours, at input and original size) to write into ``examples/`` after the final evaluation."""
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
    # fast inference switches (reconad.acceleration.apply_inference_speedups); each but ``trace`` changes maps
    # slightly, see docs/performance.md for their measured speed and max |Δ| against the float32 path
    fold_bn: bool = False
    """Fold every BatchNorm that follows a conv (encoders, bottleneck, decoder) into it for inference."""
    channels_last: bool = False
    """NHWC memory format for inference (weights and inputs)."""
    rank_safe: bool = True
    """``fold_bn`` and ``channels_last`` leave the modules whose outputs a rank-based step sorts as they are (GNL:
    the encoder up to its last EFDM-matched stage), so their ~1e-7 rounding cannot reorder near-equal values (GNL's
    maps move ≤ 1e-5 instead of ~3e-4); ``false`` folds and converts those too (faster, see docs/performance.md)."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    """Autocast dtype of inference (maps are returned in float32)."""
    compile: bool = False
    """``torch.compile`` the inference forward (first batches pay the compilation)."""
    trace: bool = False
    """Run the inference forward as a TorchScript trace, one per batch shape: the same outputs bit for bit without
    Python's per-operation overhead (faster mostly at small batches); float32 only, not with ``compile``."""


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


# -- presets, merging and parsing ----------------------------------------------------------------------
PRESET_DIR = Path(__file__).parent / "configs"
SECTIONS = {"data": DataConfig, "backbone": BackboneConfig, "optim": OptimConfig, "train": TrainConfig,
            "eval": EvalConfig}


# -- presets and configs ------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or a preset name (``rd4ad``, ``recontrast/config_b``) from the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise UsageError(f"no config file or preset named {str(name_or_path)!r}; presets: {', '.join(list_presets())}")


def load_preset(name_or_path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's mapping; ``base: OTHER`` inherits OTHER (this file's sections are merged over it)."""
    path = resolve_preset(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    base = data.pop("base", None)
    drop_per_category = "per_category" in data and data["per_category"] is None  # `null` drops the base's entries
    if drop_per_category:
        del data["per_category"]
    if base is not None:
        if str(base) in _seen:
            raise UsageError(f"presets inherit in a cycle: {' -> '.join([*_seen, str(base)])}")
        data = deep_merge(load_preset(base, (*_seen, str(base))), data)
    if drop_per_category:
        data["per_category"] = {}
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_parser(method: str, prog: str = "reconad fit"):
    """The parser for one method: every RunConfig section plus the method's own Config under ``model``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .registry import get_method_class

    try:
        cls = get_method_class(method)
    except ValueError as err:
        raise UsageError(str(err)) from err
    parser = ArgumentParser(prog=prog, exit_on_error=False, allow_abbrev=False, description=f"Train {method}.")
    parser.add_argument("--config", action=ActionConfigFile, help="preset name or YAML file")
    parser.add_argument("--method", type=str, default=method)
    for section, schema in SECTIONS.items():
        parser.add_class_arguments(schema, section)
    parser.add_class_arguments(cls.Config, "model")
    parser.add_argument("--output_dir", type=str, default="runs")
    parser.add_argument("--name", type=str | None, default=None)
    parser.add_argument("--per_category", type=dict[str, dict[str, Any]], default={})
    # run-folder flags, read by the CLI before parsing; listed here so that --help shows them
    parser.add_argument("--run_dir", type=str | None, default=None, help="the run folder (default: output_dir/name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--resume", action="store_true", help="reconad fit --resume RUN_DIR: continue a run exactly")
    return parser


def _namespace_to_config(parser, namespace) -> RunConfig:
    from .backbones import list_backbones

    init = parser.instantiate(namespace)
    kwargs = {section: getattr(init, section) for section in SECTIONS}
    # per_category entries are applied before this point (see _apply_per_category); a resolved config has none
    cfg = RunConfig(method=init.method, model=init.model, output_dir=init.output_dir, name=init.name, **kwargs)
    if cfg.backbone.name not in list_backbones():
        raise UsageError(f"unknown backbone {cfg.backbone.name!r} (--backbone.name); known backbones: "
                         f"{', '.join(list_backbones())}")
    return cfg


def _category_overrides(per_category: dict[str, Any], category: str | None) -> dict[str, Any]:
    overrides = per_category.get(category or "", {}) if per_category else {}
    if "method" in overrides or "per_category" in overrides:
        raise UsageError(f"per_category[{category!r}] may not change 'method' or 'per_category'")
    return overrides


def _apply_per_category(data: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset → its per-category overrides for ``data.category`` → ``extra`` (explicit overrides win)."""
    extra = extra or {}
    data = dict(data)
    per_category = {**(data.pop("per_category", None) or {}), **(extra.get("per_category") or {})}
    extra = {k: v for k, v in extra.items() if k != "per_category"}
    category = (extra.get("data") or {}).get("category") or (data.get("data") or {}).get("category")
    return deep_merge(deep_merge(data, _category_overrides(per_category, category)), extra)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a nested mapping (a preset, a saved ``config.yaml``); unknown keys are errors."""
    from jsonargparse import ArgumentError

    data = _apply_per_category(data)
    method = data.get("method", "rd4ad")
    parser = build_parser(method)
    try:
        return _namespace_to_config(parser, parser.parse_object(data))
    except ArgumentError as err:
        raise UsageError(f"invalid configuration: {err}") from err


def make_config(preset: str = "rd4ad", **sections: Any) -> RunConfig:
    """A preset (name or YAML path; a bare method name without preset means its defaults) with overrides.

    ``make_config("rd4ad", data={"root": "...", "category": "bottle"}, train={"epochs": 5})``
    """
    from .registry import list_methods

    try:
        base = load_preset(preset)
    except UsageError:
        if preset not in list_methods():
            raise
        base = {"method": preset}
    return config_from_dict(_apply_per_category(base, sections))


def _method_from_argv(argv: Sequence[str]) -> str:
    method = None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
        if arg.split("=", 1)[0] == "--config" and value:
            method = load_preset(value).get("method", method)
        elif arg.split("=", 1)[0] == "--method" and value:
            method = value
    return method or "rd4ad"


def _expand_preset_args(argv: Sequence[str]) -> list[str]:
    """``--config NAME`` → the preset's resolved mapping (``base:`` inheritance applied) as inline YAML."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = yaml.safe_dump(load_preset(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + yaml.safe_dump(load_preset(arg.split("=", 1)[1]))
    return out


def parse_fit_args(argv: Sequence[str]) -> RunConfig:
    from jsonargparse import ArgumentError

    parser = build_parser(_method_from_argv(argv))
    argv = _expand_preset_args(argv)
    try:
        namespace = parser.parse_args(argv)
        overrides = _category_overrides(namespace.per_category, namespace.data.category)
        if overrides:  # preset < its per-category overrides < the command line
            last_config = max((i for i, a in enumerate(argv) if a == "--config"), default=-2)
            argv = [*argv[:last_config + 2], "--config", yaml.safe_dump(overrides), *argv[last_config + 2:]]
            namespace = parser.parse_args(argv)
        return _namespace_to_config(parser, namespace)
    except ArgumentError as err:
        raise UsageError(f"{err}\n(run `reconad fit --config PRESET --help` for every option)") from err


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A resolved config as plain data (what ``config.yaml`` holds)."""
    data = asdict(cfg)
    data["optim"]["betas"] = list(cfg.optim.betas)
    return data
