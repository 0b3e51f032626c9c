"""One run over 2 CPU processes (Fabric DDP, gloo), launched as a user would: ``reconad fit --train.devices 2``.

Tolerances: the first batch's loss is the same as one device's to float precision (same images, BatchNorm over
the global batch); after Adam updates the gradients differ in the last bits (the sync-BN variance is a
sum/sum-of-squares reduction, gradients are averaged over ranks). Adam's first steps divide each gradient by its own
magnitude, so a last-bit difference in a near-zero component moves that weight by up to the learning rate: later
losses agree to 2 % for RD4AD (measured: 0.65 % at the third batch on one CPU, under 0.5 % on another); for
ReContrast 3 % (its hard-mining loss takes a quantile over each rank's half batch).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reconad import engine
from reconad.engine.distributed import RankSampler
from reconad.engine.training import EpochSampler, make_loader
from reconad.run import checkpoint_step

from .conftest import write_tiny_mvtec

RECONAD = str(Path(sys.executable).parent / "reconad")
TINY = ["--data.category", "stripes", "--data.image_size", "32", "--data.batch_size", "4",
        "--data.eval_batch_size", "4", "--backbone.name", "resnet18", "--backbone.weights", "null",
        "--train.iterations", "4", "--train.accelerator", "cpu", "--train.log_every", "1", "--train.threads", "1",
        "--eval.overlays", "2", "--eval.plots", "false"]


def _run(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _fit(cwd: Path, preset: str, run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    done = _run([RECONAD, "fit", "--config", preset, "--data.root", str(cwd / "data"), *TINY, *extra,
                 "--run_dir", run_dir], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train_losses(run_dir: Path) -> list[dict[str, float]]:
    entries = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k.startswith("loss")} for e in entries if e["kind"] == "train"]


def _assert_same_losses(ddp: Path, single: Path, rtol: float) -> None:
    a, b = _train_losses(ddp), _train_losses(single)
    assert len(a) == len(b) == 4 and a[0].keys() == b[0].keys()
    assert a[0] == pytest.approx(b[0], rel=1e-6)  # before any update: the same global batch, the same loss
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=rtol)


def _assert_metrics_of_saved_weights(run_dir: Path) -> None:
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert saved == pytest.approx(engine.evaluate(run_dir, write=False), abs=1e-9)  # one evaluation, whole set
    assert saved["image_auroc"] >= 0 and json.loads((run_dir / "metrics.json").read_text())["n_test"] == 6


@pytest.fixture(scope="module")
def ddp_rd4ad(tmp_path_factory) -> Path:
    """One rd4ad run on 2 processes (shared by the tests below: each launch costs ~20 s on 2 shared cores)."""
    cwd = tmp_path_factory.mktemp("ddp")
    write_tiny_mvtec(cwd / "data")
    done = _fit(cwd, "rd4ad", "ddp", "--train.devices", "2", "--train.checkpoint_every", "2")
    assert "Starting with 2 processes" in done.stderr + done.stdout
    return cwd


def test_rank_sampler_splits_each_global_batch_into_disjoint_rank_batches():
    for size in (8, 9):
        one = list(make_loader(range(size), 4, 0, EpochSampler(size, 5, epoch=3)))
        ranks = [list(make_loader(range(size), 2, 0, RankSampler(size, 5, 3, 0, r, 2))) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank runs the same number of steps
        full = len(one) if size % 2 == 0 else len(one) - 1  # 9 images: the last batch is padded on rank 1
        for k in range(full):
            assert sorted(torch.cat([ranks[0][k], ranks[1][k]]).tolist()) == sorted(one[k].tolist())
            assert not set(ranks[0][k].tolist()) & set(ranks[1][k].tolist())


def test_rd4ad_ddp_run_equals_single_process_and_writes_once(ddp_rd4ad):
    cwd = ddp_rd4ad
    _fit(cwd, "rd4ad", "single", "--train.checkpoint_every", "2")
    _assert_same_losses(cwd / "ddp", cwd / "single", rtol=2e-2)
    _assert_metrics_of_saved_weights(cwd / "ddp")
    assert len(list((cwd / "ddp" / "overlays").glob("*.png"))) == 2  # rank 0 only: no duplicates, no races
    log = (cwd / "ddp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["batch"] for x in log if json.loads(x)["kind"] == "train"] == [1, 2, 3, 4]


def test_ddp_resume_continues_exactly(ddp_rd4ad, tmp_path):
    cwd = ddp_rd4ad
    script = tmp_path / "interrupted.py"  # Fabric re-runs this script for rank 1, so it must be a file
    script.write_text("import sys\nfrom reconad.config import parse_fit_args\nfrom reconad.engine import fit\n"
                      "fit(parse_fit_args(sys.argv[2:]), sys.argv[1], stop_after=2)\n")
    args = ["--config", "rd4ad", "--data.root", str(cwd / "data"), *TINY, "--train.devices", "2",
            "--train.checkpoint_every", "2"]
    stopped = _run([sys.executable, str(script), str(tmp_path / "run"), *args], cwd)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists() and checkpoint_step(tmp_path / "run") == 2
    resumed = _run([RECONAD, "fit", "--resume", str(tmp_path / "run")], cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _train_losses(tmp_path / "run") == _train_losses(cwd / "ddp")  # bit for bit: same ranks, same state
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert saved == json.loads((cwd / "ddp" / "metrics.json").read_text())["metrics"]


def test_recontrast_ddp_run_matches_single_process(tmp_path):
    write_tiny_mvtec(tmp_path / "data")
    _fit(tmp_path, "recontrast/full", "ddp", "--train.devices", "2")
    _fit(tmp_path, "recontrast/full", "single")
    _assert_same_losses(tmp_path / "ddp", tmp_path / "single", rtol=3e-2)
    _assert_metrics_of_saved_weights(tmp_path / "ddp")


def test_a_crash_on_one_rank_ends_every_rank_with_the_error(tmp_path):
    write_tiny_mvtec(tmp_path / "data")
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\nfrom reconad.engine import loop\noriginal = loop._TrainLoop.step\n\n\n"
        "def step(self, batch, done):\n    if self.fabric.global_rank == 1 and done == 1:\n"
        "        raise RuntimeError('simulated crash on rank 1')\n    return original(self, batch, done)\n\n\n"
        "loop._TrainLoop.step = step\nfrom reconad.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    start = time.monotonic()
    done = _run([sys.executable, str(script), "fit", "--config", "rd4ad", "--data.root", str(tmp_path / "data"),
                 *TINY, "--train.devices", "2", "--run_dir", "crash"], tmp_path, timeout=100)
    assert done.returncode != 0 and "simulated crash on rank 1" in done.stdout + done.stderr
    assert time.monotonic() - start < 90  # ended, not stuck until the process-group timeout
    assert not (tmp_path / "crash" / "metrics.json").exists()


def test_global_batch_must_split_over_ranks():
    from reconad.engine.distributed import per_rank_batch
    from reconad.errors import ConfigError

    assert per_rank_batch(16, 2) == 8
    with pytest.raises(ConfigError, match="data.batch_size 5 .* train.devices 2"):
        per_rank_batch(5, 2)


def test_an_accelerator_this_machine_lacks_stops_the_run_before_it_writes(tiny_mvtec, tmp_path, monkeypatch):
    from reconad.config import make_config
    from reconad.errors import ConfigError

    from .conftest import tiny_run_overrides

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    # torch.compile's tracer reads the original behind ``__wrapped__``: keep it reachable
    unavailable = functools.wraps(torch.backends.mps.is_available)(lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", unavailable)
    for accelerator in ("cuda", "mps"):
        cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, accelerator=accelerator))
        with pytest.raises(ConfigError, match=f"--train.accelerator {accelerator}: .*--train.accelerator cpu"):
            engine.fit(cfg, tmp_path / accelerator)
        assert not (tmp_path / accelerator).exists()
    for accelerator in ("cpu", "auto"):  # fp16 on the CPU: Lightning would train in bf16 without being asked
        cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, accelerator=accelerator, precision="16-mixed"))
        with pytest.raises(ConfigError, match="--train.precision 16-mixed: .* pass --train.precision bf16-mixed"):
            engine.fit(cfg, tmp_path / f"fp16-{accelerator}")
        assert not (tmp_path / f"fp16-{accelerator}").exists()
