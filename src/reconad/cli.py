"""Command line: ``reconad list | demo | fit | test | predict | calibrate | export | serve | study | report``.

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
    from .data import list_layouts

    tables = {"methods": list_methods, "backbones": list_backbones, "presets": list_presets, "layouts": list_layouts}
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
    if result.metrics:  # under DDP only rank 0 holds the metrics; the other ranks stay silent
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

    parser = _simple_parser("reconad predict", "Scores, labels, masks, maps and figures for a folder of images.")
    parser.add_argument("run_dir", type=str, help="a run folder or an ONNX export folder")
    parser.add_argument("inputs", type=str, help="an image file or a folder of images")
    parser.add_argument("--output", type=str, default="predictions")
    parser.add_argument("--device", type=str, default="cpu",
                        help="cpu or cuda; for an ONNX export folder also openvino[:DEVICE]")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threshold", type=float | None, default=None, help="raw image threshold (overrides)")
    parser.add_argument("--far", type=float | None, default=None, help="threshold at this false-alarm rate")
    parser.add_argument("--masks", type=str | None, default=None, help="ground-truth masks, drawn as contours")
    parser.add_argument("--no_figures", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(list(argv))
    summary = predict(args.run_dir, args.inputs, args.output, device=args.device, batch_size=args.batch_size,
                      threshold=args.threshold, far=args.far, masks=args.masks, figures=not args.no_figures,
                      overwrite=args.overwrite)
    print(summary.line())
    return 0


def cmd_calibrate(argv: Sequence[str]) -> int:
    from .api import calibrate

    parser = _simple_parser("reconad calibrate", "Thresholds from normal images only (RUN/calibration.json).")
    parser.add_argument("run_dir", type=str)
    parser.add_argument("--normal", type=str | None, default=None, help="normal images (default: held-out normals)")
    parser.add_argument("--far", type=float, default=0.01, help="image false-alarm rate")
    parser.add_argument("--pixel_far", type=float, default=0.001, help="fraction of normal pixels flagged")
    parser.add_argument("--anomalous", type=str | None, default=None, help="labelled anomalous images (report only)")
    parser.add_argument("--masks", type=str | None, default=None, help="ground-truth masks of --anomalous")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(list(argv))
    cal = calibrate(args.run_dir, args.normal, far=args.far, pixel_far=args.pixel_far, anomalous_dir=args.anomalous,
                    mask_dir=args.masks, device=args.device, batch_size=args.batch_size)
    print(f"{cal.n_images} normal images ({cal.source}): image threshold {cal.image_threshold:.6g} at FAR {cal.far:g}"
          + (f", pixel threshold {cal.pixel_threshold:.6g} at {cal.pixel_far:g}" if cal.pixel_threshold is not None
             else "") + f"; written to {Path(args.run_dir) / 'calibration.json'}")
    if cal.labelled:
        lab = cal.labelled
        print(f"labelled data ({lab['n_anomalous']} anomalous): precision {lab['precision_at_far_threshold']:.3f}, "
              f"recall {lab['recall_at_far_threshold']:.3f} at the FAR threshold; F1-optimal threshold "
              f"{lab['f1_optimal_threshold']:.6g} (F1 {lab['f1_optimal_f1']:.3f}; not used by default)")
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    import yaml

    from .api import export

    parser = _simple_parser("reconad export", "Export a run (model + export.json) after an eager-parity check.")
    parser.add_argument("run_dir", type=str)
    parser.add_argument("--format", type=str, default="onnx", help="onnx or torchscript")
    parser.add_argument("--output", type=str | None, default=None, help="default: RUN/export-FORMAT")
    parser.add_argument("--images", type=str | None, default=None, help="images for the parity check")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--override", nargs="+", type=str, default=[], help="test-time model settings KEY=VALUE")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(list(argv))
    if any("=" not in item for item in args.override):
        raise UsageError("--override takes KEY=VALUE pairs, e.g. --override match_stable_sort=true")
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.override)}
    output = args.output or str(Path(args.run_dir) / f"export-{args.format}")
    meta = export(args.run_dir, output, format=args.format, images=args.images, tolerance=args.tolerance,
                  overwrite=args.overwrite, model_overrides=overrides or None)
    parity = meta["parity"]
    print(f"exported to {output}: max |Δ map| {parity['max_abs_diff_map']:.2g}, max |Δ score| "
          f"{parity['max_abs_diff_score']:.2g} on {parity['n_images']} images (tolerance {parity['tolerance']:g})")
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
    parser.add_argument("--worker", type=bool, default=False,
                        help="take cells from the folder's shared work queue (any number of workers, any machines)")
    parser.add_argument("--cell", type=str | None, default=None, help="run one cell only: run/category/seed")
    parser.add_argument("--order", type=str, default="grid", help="grid | seed | category: the order of the cells")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="--worker: renew the claim every this many seconds (taken over after 4x)")
    argv = list(argv)
    if "--worker" in argv and argv[argv.index("--worker") + 1:][:1] not in (["true"], ["false"]):
        argv.insert(argv.index("--worker") + 1, "true")  # a bare flag, as users type it
    args = parser.parse_args(argv)
    logging.getLogger("reconad.study").setLevel(logging.INFO)  # one line per cell at the default log level
    study = study_from_options(args.study_file, args.presets, args.names, args.data.root, args.categories,
                               args.seeds, args.set, args.baseline)
    rows = run_study(study, args.output, launcher=args.launcher, shard=args.shard, worker=args.worker,
                     cell=args.cell, order=args.order, heartbeat_seconds=args.heartbeat)
    if args.cell:
        mine = [r for r in rows if f"{r['run']}/{r['category']}/{r['seed']}" == args.cell.replace("/seed", "/")]
        print(f"cell {args.cell}: {mine[0]['status'] if mine else 'unknown'}")
        return 0 if mine and mine[0]["status"] == "done" else 1
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


def cmd_serve(argv: Sequence[str]) -> int:
    from .serve import Limits, serve

    parser = _simple_parser("reconad serve", "HTTP service + page for a run or export folder; results page for a "
                                             "study or a folder of runs (docs/serve.md).")
    parser.add_argument("path", type=str, help="a run folder, an export folder, a study folder or a folder of runs")
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", type=str, default="cpu",
                        help="cpu or cuda; for an ONNX export folder also openvino[:DEVICE]")
    parser.add_argument("--max-bytes", type=int, default=Limits.max_bytes, help="largest accepted file (413 beyond)")
    parser.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="most pixels per image (413 beyond)")
    parser.add_argument("--max-files", type=int, default=Limits.max_files, help="most images per request")
    parser.add_argument("--queue", type=int, default=64, help="most images waiting for the model (503 beyond)")
    parser.add_argument("--batch", type=int, default=8, help="most images the model runs at once")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback")
    args = parser.parse_args(list(argv))
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_files=args.max_files)
    serve(args.path, host=args.host, port=args.port, device=args.device, limits=limits, queue_size=args.queue,
          max_batch=args.batch, allow_remote=args.allow_remote)
    return 0


COMMANDS = {"list": cmd_list, "demo": cmd_demo, "fit": cmd_fit, "test": cmd_test, "predict": cmd_predict,
            "calibrate": cmd_calibrate, "export": cmd_export,
            "study": cmd_study, "report": cmd_report, "prepare": cmd_prepare, "shift-eval": cmd_shift_eval,
            "serve": cmd_serve}
USAGE = ("usage: reconad {list,demo,fit,test,predict,calibrate,export,study,report,prepare,shift-eval,serve} "
         "[options]   "
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
    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()  # feature maps reuse heap memory instead of fresh pages each time: same numbers, faster
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
