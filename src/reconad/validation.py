"""Up-front checks of a run configuration: every number, the backbone, its taps and the network's size rules.

:func:`validate_run_config` runs BEFORE any folder is written or any weights are read or downloaded: it needs no
weights (tap channels and strides come from :func:`reconad.backbones.tap_info`) and builds no model. Every problem
found is reported at once, in one line, as a :class:`reconad.errors.ConfigError` naming the setting
(``--data.image_size``) and what to do. :func:`validate_study_cells` does the same for every cell of a study, so
no cell trains while another one is misconfigured.

The image-size rules were found by running every method at every side from 8 to 136 px on ResNet18 and
EfficientNet-Lite0 (tests/test_validation.py repeats this on a smaller range): a side is accepted exactly when
the network runs and every reconstruction has the shape of its target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backbones import TapInfo, tap_info
from .config import RunConfig
from .errors import ConfigError
from .methods.base import Method, MethodConfig, SizeRule, is_int, is_number

__all__ = ["config_problems", "size_rule", "validate_run_config", "validate_study_cells"]

Problems = list[str]


def validate_run_config(cfg: RunConfig) -> None:
    """Check a resolved run configuration before anything is written, read or downloaded.

    Raises:
        ConfigError: One line listing every problem, each naming its setting and what to do.
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}")


def validate_study_cells(cfgs: Iterable[RunConfig] | Mapping[str, RunConfig]) -> None:
    """Check every cell of a study before any cell trains.

    Args:
        cfgs: The cells' resolved configs, or a mapping cell label → config (labels are used in the message).

    Raises:
        ConfigError: One line naming every invalid cell and its problems (nothing has been trained or written).
    """
    cells = list(cfgs.items()) if isinstance(cfgs, Mapping) else [(_cell_label(c), c) for c in cfgs]
    failed = [(label, problems) for label, cfg in cells if (problems := config_problems(cfg))]
    if failed:
        details = " | ".join(f"cell {label}: {'; '.join(problems)}" for label, problems in failed)
        raise ConfigError(f"{len(failed)} of {len(cells)} study cells are invalid, so no cell was started: {details}")


def config_problems(cfg: RunConfig) -> Problems:
    """Every problem of ``cfg`` as a message naming its setting; empty when the config is valid."""
    problems = _data_problems(cfg) + _optim_problems(cfg) + _train_problems(cfg) + _eval_problems(cfg)
    return problems + _network_problems(cfg)


def _cell_label(cfg: RunConfig) -> str:
    what = cfg.data.category or (",".join(cfg.data.categories) if cfg.data.categories else None)
    return cfg.name or f"{cfg.method}/{cfg.backbone.name}" + (f"/{what}" if what else "")


# -- numbers --------------------------------------------------------------------------------------------------
def _hint(hint: str) -> str:
    return f": {hint}" if hint else ""


def _at_least(problems: Problems, setting: str, value: Any, low: int, hint: str = "", optional: bool = False) -> None:
    """An integer ``>= low`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value < low:
        unset = " (or null)" if optional else ""
        problems.append(f"--{setting} must be an integer >= {low}{unset}, got {value!r}" + _hint(hint))


def _in_range(problems: Problems, setting: str, value: Any, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False, hint: str = "") -> None:
    """A finite number in the interval given by ``low``/``high`` (open or closed ends)."""
    ok = is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        problems.append(f"--{setting} must be a number in {interval}, got {value!r}" + _hint(hint))


def _positive(problems: Problems, setting: str, value: Any, hint: str = "", optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_number(value) or value <= 0:
        problems.append(f"--{setting} must be a number > 0, got {value!r}" + _hint(hint))


def _data_problems(cfg: RunConfig) -> Problems:
    data, problems = cfg.data, []
    _at_least(problems, "data.batch_size", data.batch_size, 1, "e.g. --data.batch_size 16")
    _at_least(problems, "data.eval_batch_size", data.eval_batch_size, 1, "e.g. --data.eval_batch_size 8")
    _at_least(problems, "data.image_size", data.image_size, 1, "e.g. --data.image_size 256")
    _at_least(problems, "data.crop_size", data.crop_size, 1, optional=True)
    if is_int(data.crop_size) and is_int(data.image_size) and data.crop_size > data.image_size:
        problems.append(f"--data.crop_size ({data.crop_size}) must be <= --data.image_size ({data.image_size}): the "
                        "crop is taken from the resized image; lower the crop or raise the image size")
    _at_least(problems, "data.num_workers", data.num_workers, 0)
    _in_range(problems, "data.holdout_fraction", data.holdout_fraction, 0, 1, high_open=True,
              hint="the fraction of train images held out for calibration (0 = none)")
    _in_range(problems, "data.mask_threshold", data.mask_threshold, 0, 1, high_open=True,
              hint="masks in [0, 1] are binarised with > threshold")
    _in_range(problems, "data.loco_spro_fpr_limit", data.loco_spro_fpr_limit, 0, 1, low_open=True)
    return problems


def _optim_problems(cfg: RunConfig) -> Problems:
    optim, problems = cfg.optim, []
    _positive(problems, "optim.lr", optim.lr, "the learning rate, e.g. --optim.lr 0.005")
    _in_range(problems, "optim.weight_decay", optim.weight_decay, 0, math.inf)
    _positive(problems, "optim.eps", optim.eps)
    betas = list(optim.betas) if isinstance(optim.betas, (list, tuple)) else [optim.betas]
    if len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        problems.append(f"--optim.betas must be two numbers in [0, 1), got {optim.betas!r}")
    milestones = list(optim.milestones or [])
    if not all(is_number(m) and 0 < m <= 1 for m in milestones) or milestones != sorted(milestones):
        problems.append(f"--optim.milestones must be increasing fractions of the training in (0, 1], got "
                        f"{optim.milestones!r}: e.g. [0.8]")
    _positive(problems, "optim.gamma", optim.gamma)
    return problems


def _train_problems(cfg: RunConfig) -> Problems:
    train, problems = cfg.train, []
    _at_least(problems, "train.epochs", train.epochs, 1, optional=True)
    _at_least(problems, "train.iterations", train.iterations, 1, optional=True,
              hint="0 does not mean 'train by epochs'; leave it unset to train for --train.epochs")
    _at_least(problems, "train.steps", train.steps, 1, optional=True)
    if train.epochs is None and train.iterations is None and train.steps is None:
        problems.append("no training length: set --train.epochs, --train.iterations (batches) or --train.steps "
                        "(optimizer steps)")
    _at_least(problems, "train.accumulate", train.accumulate, 1, "optimizer step every N batches (1 = every batch)")
    _at_least(problems, "train.log_every", train.log_every, 1, "log every N batches")
    _at_least(problems, "train.checkpoint_every", train.checkpoint_every, 1, optional=True)
    _positive(problems, "train.checkpoint_minutes", train.checkpoint_minutes, optional=True,
              hint="set null to checkpoint only by --train.checkpoint_every and at the end")
    _at_least(problems, "train.eval_every", train.eval_every, 1, optional=True)
    _at_least(problems, "train.threads", train.threads, 1, optional=True)
    _positive(problems, "train.feature_cache_gib", train.feature_cache_gib,
              hint="the largest feature cache in GiB, e.g. 4; --train.feature_cache off turns it off")
    return problems


def _eval_problems(cfg: RunConfig) -> Problems:
    ev, problems = cfg.eval, []
    _in_range(problems, "eval.fpr_limit", ev.fpr_limit, 0, 1, low_open=True,
              hint="the FPR integration limit of AUPRO, e.g. 0.3")
    _at_least(problems, "eval.overlays", ev.overlays, 0)
    _at_least(problems, "eval.examples", ev.examples, 0)
    _in_range(problems, "eval.far", ev.far, 0, 1, low_open=True, high_open=True, hint="e.g. 0.01")
    _in_range(problems, "eval.pixel_far", ev.pixel_far, 0, 1, low_open=True, high_open=True, hint="e.g. 0.001")
    if ev.normal_dir and not Path(ev.normal_dir).expanduser().is_dir():
        problems.append(f"--eval.normal_dir {ev.normal_dir!r} is not a folder: pass a folder of normal images "
                        "(never test images) to calibrate the threshold on")
    if ev.selection == "best_test" and not ev.selection_metrics:
        problems.append("--eval.selection_metrics is empty but --eval.selection is best_test: name the metrics to "
                        "select on, e.g. [image_auroc]")
    return problems


# -- backbone, taps and the network's rules --------------------------------------------------------------------
def _network_problems(cfg: RunConfig) -> Problems:
    from .registry import get_method_class

    try:
        cls = get_method_class(cfg.method)
    except ValueError as err:
        return [f"--method: {err}"]
    problems = _weights_problems(cfg)
    try:
        info = tap_info(cfg.backbone.name, cfg.backbone.taps)
    except ConfigError as err:
        return [*problems, str(err)]  # unknown backbone or taps: the network cannot be judged
    model_cfg = cfg.model if cfg.model is not None else cls.Config()
    problems += cls.config_problems(cfg, model_cfg, info)
    if problems:  # a size rule is only meaningful for taps the method accepts
        return problems
    rule = size_rule(cls, model_cfg, info)
    side, setting = (cfg.data.crop_size, "data.crop_size") if cfg.data.crop_size else (cfg.data.image_size,
                                                                                        "data.image_size")
    if rule is not None and is_int(side) and side >= 1 and not rule.accepts(side):
        low, high = rule.suggestions(side)
        nearest = f"{low}" if low == high else f"{low} or {high}"
        problems.append(f"--{setting} {side} does not fit {cfg.method} on {cfg.backbone.name} (taps "
                        f"{', '.join(f'{t.name}/{t.stride}' for t in info)}): {rule.reason}, so ceil(side / "
                        f"{rule.stride}) must be a multiple of {rule.multiple}; use a multiple of "
                        f"{rule.stride * rule.multiple}, e.g. {nearest}")
    return problems


def _weights_problems(cfg: RunConfig) -> Problems:
    weights = cfg.backbone.weights
    if weights is None or weights == "imagenet":
        return []
    if not Path(weights).expanduser().is_file():
        return [f"--backbone.weights {weights!r} is neither 'imagenet', null (random init) nor an existing file: "
                "pass the path of a .safetensors (or weights-only .pth) state dict"]
    return []


def size_rule(method: type[Method], model_cfg: MethodConfig, info: Sequence[TapInfo]) -> SizeRule | None:
    """The image-side rule of ``method`` with these taps (its :meth:`Method.input_size_rule`); ``None``: any side."""
    return method.input_size_rule(model_cfg, info)
