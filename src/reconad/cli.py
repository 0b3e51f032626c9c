"""Command line: ``reconad list | demo | fit | test | predict | study | report``.

Configuration is parsed by jsonargparse from the typed dataclasses in ``reconad.config`` and each method's
``Config``: ``--config PRESET`` (a preset name such as ``rd4ad`` or a YAML path) plus dotted overrides such as
``--train.epochs 10``. Unknown keys are errors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import list_presets, parse_fit_args
from .errors import ReconadError, UsageError


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
        overwrite = "--overwrite" in argv
        argv = [a for a in argv if a != "--overwrite"]
        run_dir = None
        if "--run_dir" in argv:
            i = argv.index("--run_dir")
            if i + 1 >= len(argv):
                raise UsageError("--run_dir needs a folder")
            run_dir, argv = argv[i + 1], [*argv[:i], *argv[i + 2:]]
        result = api.fit_config(parse_fit_args(argv), run_dir, overwrite=overwrite)
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
    from .api import evaluate

    parser = _simple_parser("reconad test", "Evaluate a trained run on its test set (or another one).")
    parser.add_argument("run_dir", type=str)
    parser.add_argument("--data.root", type=str | None, default=None)
    parser.add_argument("--data.category", type=str | None, default=None)
    parser.add_argument("--device", type=str, default="cpu")
    args = parser.parse_args(list(argv))
    overrides = {k: v for k, v in (("root", args.data.root), ("category", args.data.category)) if v is not None}
    metrics = evaluate(args.run_dir, device=args.device, **overrides)
    print(_metrics_table({Path(args.run_dir).name: metrics}))
    return 0


def cmd_predict(argv: Sequence[str]) -> int:
    from .api import predict

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
    from .api import evaluate_shifts, read_run_config
    from .data.shifts import default_shift_root, resolve_shifts, shift_table
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

    return isinstance(err, (ReconadError, ArgumentError, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
