"""Command line: ``reconad list | demo | fit | test | predict | study | report``.

Configuration is parsed by jsonargparse from the typed dataclasses in ``reconad.config`` and each method's
``Config``: ``--config PRESET`` (a preset name such as ``rd4ad`` or a YAML path) plus dotted overrides such as
``--train.epochs 10``. Unknown keys are errors.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import BackboneConfig, DataConfig, EvalConfig, OptimConfig, RunConfig, TrainConfig

PRESET_DIR = Path(__file__).parent / "configs"
SECTIONS = {"data": DataConfig, "backbone": BackboneConfig, "optim": OptimConfig, "train": TrainConfig,
            "eval": EvalConfig}


class UsageError(ValueError):
    """A command-line or configuration mistake, reported without a traceback."""


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


# -- commands -----------------------------------------------------------------------------------------------
def cmd_list(argv: Sequence[str]) -> int:
    from .backbones import list_backbones
    from .registry import list_methods

    what = argv[0] if argv else "all"
    tables = {"methods": list_methods, "backbones": list_backbones, "presets": list_presets}
    if what != "all" and what not in tables:
        raise UsageError(f"reconad list: expected one of all, {', '.join(tables)}; got {what!r}")
    for name, fn in tables.items():
        if what in ("all", name):
            print(f"{name}: {', '.join(fn())}")
    return 0


def cmd_fit(argv: Sequence[str]) -> int:
    from . import api

    if "--resume" in argv:
        rest = [a for a in argv if a != "--resume"]
        if len(rest) != 1:
            raise UsageError("usage: reconad fit --resume RUN_DIR (the run's config.yaml is reused as it is)")
        result = api.resume(rest[0])
    else:
        run_dir = None
        if "--run_dir" in argv:
            i = argv.index("--run_dir")
            run_dir, argv = argv[i + 1], [*argv[:i], *argv[i + 2:]]
        cfg = parse_fit_args(argv)
        from .engine import fit

        result = fit(cfg, run_dir)
    print(f"run folder: {result.run_dir}")
    print(_metrics_table({cfg_name(result): result.metrics}))
    return 0


def cfg_name(result) -> str:
    return Path(result.run_dir).name


def _metrics_table(per_run: dict[str, dict[str, float]]) -> str:
    from .metrics import results_table, to_markdown

    return to_markdown(results_table(per_run))


def _simple_parser(prog: str, description: str):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False, allow_abbrev=False, description=description)


def cmd_test(argv: Sequence[str]) -> int:
    from .engine import evaluate

    parser = _simple_parser("reconad test", "Evaluate a trained run on its test set (or another one).")
    parser.add_argument("run_dir", type=str)
    parser.add_argument("--data.root", type=str | None, default=None)
    parser.add_argument("--data.category", type=str | None, default=None)
    parser.add_argument("--device", type=str, default="cpu")
    args = parser.parse_args(list(argv))
    overrides = {k: v for k, v in (("root", args.data.root), ("category", args.data.category)) if v is not None}
    metrics = evaluate(args.run_dir, overrides, device=args.device)
    print(_metrics_table({Path(args.run_dir).name: metrics}))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    from .engine import predict

    parser = _simple_parser("reconad predict", "Anomaly maps, overlays and scores for a folder of images.")
    parser.add_argument("run_dir", type=str)
    parser.add_argument("inputs", type=str, help="an image file or a folder of images")
    parser.add_argument("--output", type=str, default="predictions")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(list(argv))
    rows = predict(args.run_dir, args.inputs, args.output, device=args.device, batch_size=args.batch_size)
    print(f"{len(rows)} images scored; maps, overlays and scores.csv in {args.output}")
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    from .api import demo

    parser = _simple_parser("reconad demo", "Train RD4AD (EfficientNet-Lite0, CPU) on the built-in demo data.")
    parser.add_argument("--output_dir", type=str, default="runs/demo")
    parser.add_argument("--categories", type=list[str] | None, default=None)
    parser.add_argument("--threads", type=int | None, default=None)
    args = parser.parse_args(list(argv))
    results = demo(args.output_dir, categories=args.categories, threads=args.threads)
    print(_metrics_table({name: r.metrics for name, r in results.items()}))
    for name, r in results.items():
        print(f"{name}: overlays in {Path(r.run_dir) / 'overlays'}")
    return 0


def cmd_study(argv: Sequence[str]) -> int:
    from .study import run_study, study_from_options

    parser = _simple_parser("reconad study", "Run presets × categories × seeds (resumable), tables and report.")
    parser.add_argument("study_file", nargs="?", type=str | None, default=None, help="study YAML (docs/studies.md)")
    parser.add_argument("--presets", nargs="+", type=str, default=None, help="shorthand: the presets to compare")
    parser.add_argument("--names", nargs="+", type=str, default=None, help="display names of --presets")
    parser.add_argument("--data.root", type=str | None, default=None)
    parser.add_argument("--categories", nargs="+", type=str, default=None, help="names, or 'all'")
    parser.add_argument("--seeds", nargs="+", type=str, default=None, help="a count (3 = 1 11 111) or the seeds")
    parser.add_argument("--set", nargs="+", type=str, default=[], help="overrides for every cell: train.iterations=200")
    parser.add_argument("--baseline", type=str | None, default=None, help="compare every run against this one")
    parser.add_argument("--output", type=str, default="runs/study")
    parser.add_argument("--launcher", type=str, default="sequential", help="sequential | ray")
    parser.add_argument("--shard", type=str | None, default=None, help="k/n or torchrun: run a share of the cells")
    parser.add_argument("--report", type=bool, default=True, help="write report.html / report.md at the end")
    args = parser.parse_args(list(argv))
    study = study_from_options(args.study_file, args.presets, args.names, args.data.root, args.categories,
                               args.seeds, args.set, args.baseline)
    rows = run_study(study, args.output, launcher=args.launcher, shard=args.shard)
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done}/{len(rows)} cells finished; tables in {args.output} (results.csv, summary.csv, paired.csv)")
    for r in rows:
        if r["status"] == "failed":
            print(f"failed: {r['run']} / {r['category']} / seed {r['seed']}: {r['error']}")
    if args.report and args.shard is None:
        from .report import write_report

        print(f"report: {write_report(args.output)}")
    return 0 if done == len(rows) or args.shard is not None else 1


def cmd_report(argv: Sequence[str]) -> int:
    from .report import write_report

    parser = _simple_parser("reconad report", "Write report.html + report.md from saved results (no training).")
    parser.add_argument("path", type=str, help="a study folder, a run folder, or a folder of run folders")
    args = parser.parse_args(list(argv))
    print(f"report: {write_report(args.path)}")
    return 0


PREPARE_USAGE = ("usage: reconad prepare shift --data.root ROOT --corruptions NAME... [--severity 3] [--output DIR]\n"
                 "       reconad prepare pacs --source PACS --output DIR\n"
                 "       reconad prepare mnist_m --mnist MNIST --mnist_m MNIST_M --output DIR\n"
                 "       reconad prepare mnist_idx --raw MNIST/raw --output DIR   (docs/datasets.md)")


def cmd_prepare(argv: Sequence[str]) -> int:
    from .data import prepare, shifts

    what = argv[0] if argv else None
    parser = _simple_parser(f"reconad prepare {what}", "Write derived datasets (shifted test sets, one-class sets).")
    if what == "shift":
        parser.add_argument("--data.root", type=str)
        parser.add_argument("--data.categories", nargs="+", type=str, default=None, help="default: all")
        parser.add_argument("--corruptions", nargs="+", type=str, default=list(shifts.CORRUPTIONS))
        parser.add_argument("--severity", type=int, default=3)
        parser.add_argument("--output", type=str | None, default=None, help="default: <root>_shift_s<severity>")
        parser.add_argument("--seed", type=int, default=0)
        a = parser.parse_args(list(argv[1:]))
        roots = shifts.write_shifted_dataset(a.data.root, a.corruptions, a.severity, a.output, a.data.categories,
                                             a.seed)
    elif what in ("pacs", "mnist_m", "mnist_idx"):
        for name in {"pacs": ("source",), "mnist_m": ("mnist", "mnist_m"), "mnist_idx": ("raw",)}[what]:
            parser.add_argument(f"--{name}", type=str)
        parser.add_argument("--output", type=str)
        parser.add_argument("--copy", type=bool, default=False, help="copy files instead of linking them")
        a = parser.parse_args(list(argv[1:]))
        if what == "mnist_idx":
            roots = {"mnist": prepare.mnist_idx_to_folders(a.raw, a.output)}
        elif what == "pacs":
            roots = {d: Path(a.output) / d for d in prepare.prepare_pacs(a.source, a.output, copy=a.copy)}
        else:
            roots = {d: Path(a.output) / d for d in prepare.prepare_mnist_m(a.mnist, a.mnist_m, a.output,
                                                                             copy=a.copy)}
    else:
        raise UsageError(PREPARE_USAGE)
    for name, root in roots.items():
        print(f"{name}: {root}")
    return 0


def cmd_shift_eval(argv: Sequence[str]) -> int:
    from .data.shifts import default_shift_root, evaluate_shifts, resolve_shifts, shift_table
    from .engine import read_run_config
    from .metrics import to_markdown

    parser = _simple_parser("reconad shift-eval", "Evaluate trained runs on their test set and on shifted test sets.")
    parser.add_argument("runs", nargs="+", type=str)
    parser.add_argument("--shifts", nargs="+", type=str, help="NAME (under --shift_root), NAME=ROOT, or a folder")
    parser.add_argument("--shift_root", type=str | None, default=None, help="default: <data.root>_shift_s<severity>")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--metric", type=str, default="image_auroc")
    parser.add_argument("--device", type=str, default="cpu")
    args = parser.parse_args(list(argv))
    per_run = {}
    for run in args.runs:
        shift_root = args.shift_root or default_shift_root(read_run_config(run).data.root or ".", args.severity)
        per_run[Path(run).name] = evaluate_shifts(run, resolve_shifts(args.shifts, shift_root), args.device)
    print(to_markdown(shift_table(per_run, args.metric), label="run"))
    print(f"({args.metric}; all metrics in <run>/shift_metrics.json)")
    return 0


COMMANDS = {"list": cmd_list, "demo": cmd_demo, "fit": cmd_fit, "test": cmd_test, "predict": cmd_predict,
            "study": cmd_study, "report": cmd_report, "prepare": cmd_prepare, "shift-eval": cmd_shift_eval}
USAGE = ("usage: reconad {list,demo,fit,test,predict,study,report,prepare,shift-eval} [options]   "
         "(reconad COMMAND --help for details)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("RECONAD_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except Exception as err:  # noqa: BLE001 — user-facing errors are printed without a traceback
        if os.environ.get("RECONAD_DEBUG") or not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _is_user_error(err: Exception) -> bool:
    from jsonargparse import ArgumentError

    from .backbones import WeightsUnavailableError
    from .data import DataError

    return isinstance(err, (UsageError, DataError, WeightsUnavailableError, ArgumentError, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
