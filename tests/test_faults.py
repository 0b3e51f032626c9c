"""Fault injection for runs: kills at random moments, planted pickles, NaN losses, failed evaluations, existing
folders. Each test checks that nothing is lost, nothing foreign is executed and the user gets a one-line error."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from reconad.config import make_config
from reconad.engine import fit, load
from reconad.errors import ReconadError, RunFolderError
from reconad.fileio import load_weights

from .conftest import tiny_run_overrides, write_tiny_mvtec


class _Payload:
    """Unpickling this object creates a marker file: proof that foreign code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(_Payload(marker), fh)


def _quiet(**train) -> dict:
    return {"overlays": 0, "plots": False, "examples": 0}


def _cfg(root: Path, preset: str = "rd4ad", **train):
    sections = tiny_run_overrides(root, **train)
    sections["eval"] = _quiet()
    return make_config(preset, **sections)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "checkpoints" / "model.safetensors")


def _train_losses(history) -> list[float]:
    return [e["loss"] for e in history if e["kind"] == "train"]


# -- every method resumes bit-exactly from a mid-epoch checkpoint ----------------------------------------------
METHOD_PRESETS = {"rd4ad": "rd4ad", "recontrast": "recontrast/full", "rdpp": "rdpp", "gnl": "gnl", "ulsad": "ulsad",
                  "ssl_ae": "ssl_ae"}


def _method_sections(root: Path, method: str) -> dict:
    sections = tiny_run_overrides(root, iterations=5, checkpoint_minutes=None)
    sections["data"]["holdout_fraction"] = 0.25  # ULSAD calibrates and Bauer's objective (4) selects on it
    sections["data"]["image_size"] = 64
    sections["eval"] = _quiet()
    if method == "ssl_ae":
        sections["model"] = {"objective": 4, "val_every": 2, "corruption": {"reference_size": 128}}
    if method == "ulsad":  # a width that fits resnet18's taps (the preset's 384 is for WRN50-2)
        sections["backbone"]["taps"] = ["layer2", "layer3"]
        sections["model"] = {"feature_dim": 16}
    return sections


def test_every_method_is_covered():
    from reconad.registry import list_methods

    assert sorted(METHOD_PRESETS) == list_methods()


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_resume_from_mid_epoch_is_bit_exact_for_every_method(method, tmp_path):
    root = write_tiny_mvtec(tmp_path / "data", size=64)
    cfg = make_config(METHOD_PRESETS[method], **_method_sections(root, method))
    full = fit(cfg, tmp_path / "full")
    fit(cfg, tmp_path / "resumed", stop_after=3)  # 6 training images at batch 4: batch 3 is mid-epoch 2
    resumed = fit(cfg, tmp_path / "resumed", resume=True)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _train_losses(resumed.history) == _train_losses(full.history)
    assert resumed.metrics == full.metrics


def test_model_selection_snapshots_survive_a_resume(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data", size=64)
    cfg = make_config("ssl_ae", **_method_sections(root, "ssl_ae"))
    full = fit(cfg, tmp_path / "full")
    selection = json.loads((full.run_dir / "metrics.json").read_text())["selection"]
    assert [b for b, _ in selection["history"]] == [2, 4, 5]  # snapshots after 2 and 4 batches, and the final
    assert selection["val_loss"] == min(v for _, v in selection["history"])
    fit(cfg, tmp_path / "resumed", stop_after=3)
    resumed = fit(cfg, tmp_path / "resumed", resume=True)
    assert json.loads((resumed.run_dir / "metrics.json").read_text())["selection"] == selection


# -- kill -9 at random moments ---------------------------------------------------------------------------------
def _run_in_child(cfg, run_dir: Path, resume: bool) -> int:
    pid = os.fork()
    if pid == 0:  # the child trains until it is killed (or finishes)
        code = 0
        try:
            torch.set_num_threads(1)
            fit(cfg, run_dir, resume=resume)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    return pid


def test_kill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = _cfg(write_tiny_mvtec(tmp_path / "data"), iterations=8, checkpoint_every=1, checkpoint_minutes=None)
    start = time.monotonic()
    full = fit(cfg, tmp_path / "full")
    duration = time.monotonic() - start  # how long a whole run takes on this machine now
    run_dir, rng, statuses = tmp_path / "killed", random.Random(0), []
    for _ in range(20):
        pid = _run_in_child(cfg, run_dir, resume=(run_dir / "config.yaml").is_file())
        time.sleep(rng.uniform(0.0, 0.8 * duration))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        statuses.append(status)
    assert any(os.WIFSIGNALED(s) for s in statuses)  # most trials really were killed mid-way
    assert all(os.WIFSIGNALED(s) or os.WEXITSTATUS(s) == 0 for s in statuses)  # no trial failed to resume
    resumed = fit(cfg, run_dir, resume=(run_dir / "config.yaml").is_file(), overwrite=True)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _train_losses(resumed.history) == _train_losses(full.history)
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.glob(".checkpoints.*"))


def test_a_kill_between_the_two_renames_of_a_checkpoint_keeps_the_previous_one(tiny_mvtec, tmp_path):
    from reconad.run import CHECKPOINT_DIR, checkpoint_step, load_checkpoint

    cfg = _cfg(tiny_mvtec, iterations=4)
    fit(cfg, tmp_path / "run", stop_after=2)
    run = tmp_path / "run"
    os.replace(run / CHECKPOINT_DIR, run / ".checkpoints.old")  # the state right after the first rename
    (run / ".checkpoints.new").mkdir()
    (run / ".checkpoints.new" / "model.safetensors").write_bytes(b"half")
    assert checkpoint_step(run) == 2
    weights, state = load_checkpoint(run)
    assert state["batches_done"] == 2 and weights
    assert (run / CHECKPOINT_DIR).is_dir() and not (run / ".checkpoints.new").exists()


# -- nothing read with code execution --------------------------------------------------------------------------
def test_a_planted_pickle_never_runs_on_resume_or_load(tiny_mvtec, tmp_path):
    cfg = _cfg(tiny_mvtec, iterations=4)
    fit(cfg, tmp_path / "run", stop_after=2)
    run, marker = tmp_path / "run", tmp_path / "pwned"
    plant_pickle(run / "checkpoints" / "state.pt", marker)  # the old format's file: never read
    resumed = fit(cfg, run, resume=True)
    assert "image_auroc" in resumed.metrics and not marker.exists()
    for name in ("model.safetensors", "state.safetensors"):
        plant_pickle(run / "checkpoints" / name, marker)
        with pytest.raises(RunFolderError, match="cannot be read|damaged"):
            fit(cfg, run, resume=True)
        with pytest.raises(RunFolderError):
            load(run) if name == "model.safetensors" else fit(cfg, run, resume=True)
        assert not marker.exists()
    (run / "checkpoints" / "state.json").write_text('{"__reduce__": "os.system"}')
    with pytest.raises(RunFolderError):
        fit(cfg, run, resume=True)
    assert not marker.exists()


def test_training_state_round_trips_without_pickle():
    from collections import Counter

    import numpy as np

    from reconad.run import decode_state, encode_state, rng_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.1)
    state = {"batches_done": 7, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "counter": Counter({3: 1})}
    tensors, data = encode_state(state)
    back = decode_state(tensors, json.loads(json.dumps(data)))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["scheduler"]["milestones"] == Counter({3: 1, 5: 1}) and back["counter"] == Counter({3: 1})
    assert back["rng"]["python"] == state["rng"]["python"]
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    optimizer.load_state_dict(back["optimizer"])
    scheduler.load_state_dict(back["scheduler"])


# -- trained work is never thrown away -------------------------------------------------------------------------
def test_a_failed_final_evaluation_keeps_the_trained_model_and_test_can_redo_it(tmp_path):
    from reconad.engine.evaluation import EvaluationError
    from reconad.run import read_metrics

    root = write_tiny_mvtec(tmp_path / "data")
    blob = root / "stripes" / "test" / "blob"
    aside = tmp_path / "aside"
    os.replace(blob, aside)  # a test set without anomalies: AUROC is undefined
    cfg = _cfg(root, iterations=2)
    with pytest.raises(EvaluationError, match="model is saved") as err:
        fit(cfg, tmp_path / "run")
    assert "reconad test" in str(err.value)
    run = tmp_path / "run"
    assert load(run) is not None and not (run / "metrics.json").exists()
    os.replace(aside, blob)
    from reconad.engine import evaluate

    metrics = evaluate(run)
    saved = read_metrics(run)
    assert saved["metrics"] == metrics and saved["batches"] == 2 and saved["backbone_weights"] == "random"


def test_fit_refuses_an_existing_run_folder_unless_asked(tiny_mvtec, tmp_path):
    cfg = _cfg(tiny_mvtec, iterations=1)
    first = fit(cfg, tmp_path / "run")
    before = _weights(first.run_dir)
    with pytest.raises(RunFolderError, match="--overwrite"):
        fit(cfg, tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in _weights(first.run_dir).items())
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        fit(cfg, tmp_path / "file")
    again = fit(cfg, tmp_path / "run", overwrite=True)
    assert len(_train_losses(again.history)) == 1  # a fresh log, not appended to the old one


def test_a_nan_loss_stops_at_once_with_the_batch_and_terms(tiny_mvtec, tmp_path, monkeypatch):
    from reconad.engine.services import NonFiniteLossError
    from reconad.methods.rd4ad import RD4AD

    original, calls = RD4AD.loss, []

    def sometimes_nan(self, batch, progress):
        calls.append(1)
        terms = original(self, batch, progress)
        return {**terms, "loss": terms["loss"] * float("nan")} if len(calls) == 3 else terms

    monkeypatch.setattr(RD4AD, "loss", sometimes_nan)
    cfg = _cfg(tiny_mvtec, iterations=6, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="batch 3") as err:
        fit(cfg, tmp_path / "run")
    assert "loss nan" in str(err.value) and isinstance(err.value, ReconadError)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["batch"] for e in log] == [1, 2]  # valid JSON, no NaN written
    calls.clear()
    cfg = _cfg(tiny_mvtec, iterations=6, skip_nonfinite=True)
    result = fit(cfg, tmp_path / "skipping")
    assert result.metrics and result.history[-2]["skipped_batches"] == 1


def test_host_terms_are_exactly_what_float_gives_for_every_dtype():
    from reconad.engine.services import host_terms

    terms = {"loss": torch.tensor(1 / 3), "wide": torch.tensor(1 / 3, dtype=torch.float64),
             "half": torch.tensor(0.1, dtype=torch.bfloat16), "one_element": torch.tensor([2.5]),
             "count": torch.tensor(7)}
    values = host_terms(terms)
    assert values == {k: float(v) for k, v in terms.items()}
    assert values["wide"] == 1 / 3 and values["loss"] != 1 / 3  # float64 kept, float32 as float32 rounds it
    assert list(values) == list(terms) and host_terms({}) == {}


def test_stacked_terms_join_the_loss_device_and_keep_the_widest_dtype():
    from reconad.engine.services import stack_terms

    # "meta" stands in for an accelerator: a host-made term (ReContrast's alpha) must follow the loss there
    terms = {"loss": torch.zeros((), device="meta"), "alpha": torch.tensor(1.0, dtype=torch.float64)}
    stacked = stack_terms(terms)
    assert stacked.device.type == "meta" and stacked.dtype == torch.float64 and stacked.shape == (2,)
    assert stack_terms({"a": torch.tensor(1, dtype=torch.int64)}).dtype == torch.float32


@pytest.mark.parametrize("skip", [False, True])
def test_a_training_batch_reads_its_terms_off_the_device_once(tiny_mvtec, tmp_path, monkeypatch, skip):
    import reconad.engine.loop as loop

    reads = {"stacked": 0, "single": 0, "batches": 0}
    in_step = [False]
    tolist, to_float, step = torch.Tensor.tolist, torch.Tensor.__float__, loop._TrainLoop.step

    def counted(kind, fn):
        def read(t, *a):
            reads[kind] += in_step[0]
            return fn(t, *a)
        return read

    def counted_step(self, batch, done):
        reads["batches"] += 1
        in_step[0] = True
        try:
            return step(self, batch, done)
        finally:
            in_step[0] = False

    monkeypatch.setattr(torch.Tensor, "tolist", counted("stacked", tolist))
    monkeypatch.setattr(torch.Tensor, "__float__", counted("single", to_float))
    monkeypatch.setattr(loop._TrainLoop, "step", counted_step)
    result = fit(_cfg(tiny_mvtec, iterations=3, skip_nonfinite=skip), tmp_path / "run")
    assert reads == {"stacked": 3, "single": 0, "batches": 3}
    assert all(math.isfinite(v) for v in _train_losses(result.history))


def test_steps_count_optimizer_steps_and_the_log_says_both(tiny_mvtec, tmp_path):
    cfg = _cfg(tiny_mvtec, steps=2, accumulate=2)
    result = fit(cfg, tmp_path / "run")
    train = [e for e in result.history if e["kind"] == "train"]
    assert [(e["batch"], e["step"]) for e in train] == [(1, 0), (2, 1), (3, 1), (4, 2)]
    assert json.loads((result.run_dir / "metrics.json").read_text())["steps"] == 2


# -- the command line: one line, status 2, no traceback, nothing lost ------------------------------------------
def _cli(args, capsys) -> tuple[int, str]:
    from reconad.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _tiny_fit_args(root: Path, out: Path, *extra) -> list:
    from .test_cli import fit_args

    return fit_args(root, out, "--eval.plots", "false", "--eval.overlays", "0", *extra)


def _assert_one_line_error(code: int, text: str, *fragments: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_cli_fit_into_an_existing_run_is_refused_then_overwritten_on_request(tiny_mvtec, tmp_path, capsys):
    args = _tiny_fit_args(tiny_mvtec, tmp_path / "runs")
    assert _cli(args, capsys)[0] == 0
    run = tmp_path / "runs" / "run"
    before = (run / "metrics.json").read_bytes()
    code, text = _cli(args, capsys)
    _assert_one_line_error(code, text, str(run), "--resume", "--overwrite")
    assert (run / "metrics.json").read_bytes() == before
    assert _cli([*args, "--overwrite"], capsys)[0] == 0


def test_cli_resume_and_test_of_damaged_or_foreign_folders(tiny_mvtec, tmp_path, capsys):
    code, text = _cli(["test", tmp_path], capsys)
    _assert_one_line_error(code, text, str(tmp_path), "config.yaml")
    code, text = _cli(["fit", "--resume", tmp_path / "nowhere"], capsys)
    _assert_one_line_error(code, text, "nowhere")
    args = _tiny_fit_args(tiny_mvtec, tmp_path / "runs")
    assert _cli(args, capsys)[0] == 0
    run = tmp_path / "runs" / "run"
    marker = tmp_path / "pwned"
    plant_pickle(run / "checkpoints" / "model.safetensors", marker)
    code, text = _cli(["test", run], capsys)
    _assert_one_line_error(code, text, "model.safetensors")
    code, text = _cli(["fit", "--resume", run], capsys)
    _assert_one_line_error(code, text, "checkpoint")
    assert not marker.exists()


def test_cli_study_validates_every_cell_before_any_trains(tiny_mvtec, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--presets", "rd4ad", "--data.root", tiny_mvtec, "--categories", "stripes", "--seeds", "1",
            "--set", "backbone.name=resnet18", "backbone.weights=null", "data.image_size=70", "train.iterations=1",
            "--output", out]
    code, text = _cli(args, capsys)
    _assert_one_line_error(code, text, "--data.image_size 70", "stripes")
    assert not list(out.rglob("config.yaml"))  # no cell was started


def test_cli_predict_into_a_file_or_a_used_folder_is_refused(tiny_mvtec, tmp_path, capsys):
    assert _cli(_tiny_fit_args(tiny_mvtec, tmp_path / "runs"), capsys)[0] == 0
    run, images = tmp_path / "runs" / "run", tiny_mvtec / "stripes" / "test" / "good"
    (tmp_path / "a_file").write_text("keep me")
    code, text = _cli(["predict", run, images, "--output", tmp_path / "a_file"], capsys)
    _assert_one_line_error(code, text, "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert _cli(["predict", run, images, "--output", tmp_path / "pred"], capsys)[0] == 0
    code, text = _cli(["predict", run, images, "--output", tmp_path / "pred"], capsys)
    _assert_one_line_error(code, text, "--overwrite")
