"""Experiment trackers: what reaches a real TensorBoard event file and a real MLflow file store, read back."""

from __future__ import annotations

import json

import pytest

from reconad.errors import ConfigError
from reconad.trackers import entry_metrics, entry_step, logger_names, open_trackers

CONFIG = {"method": "rdpp", "name": None, "data": {"category": "stripes", "image_size": 32},
          "train": {"accumulate": 2, "seed": 11, "loggers": ["tensorboard", "mlflow"]}, "eval": {"fpr_limit": 0.3}}
# what log.jsonl holds for an RD++ run (accumulate 2): no "step" key in old logs, batch // 2 is the step
ENTRIES = [
    {"batch": 2, "epoch": 0, "kind": "train", "lr": [0.005, 0.001], "loss": 1.5, "distill": 1.2, "ssot": 0.25},
    {"batch": 4, "epoch": 0, "kind": "train", "lr": [0.005, 0.001], "loss": 1.0, "distill": 0.8, "ssot": 0.2},
    {"batch": 4, "epoch": 0, "kind": "eval", "image_auroc": 0.75, "pixel_auroc": 0.9},
    {"batch": 6, "step": 3, "epoch": 1, "kind": "train", "lr": [0.0005, 0.0001], "loss": 0.5, "distill": 0.4,
     "ssot": float("nan")},
    {"batches": 6, "kind": "final", "image_auroc": 0.875},
]


def _log(tmp_path, names="tensorboard,mlflow"):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open_trackers(names, run_dir, CONFIG) as trackers:
        for entry in ENTRIES:
            trackers.log_entry(entry)
    return run_dir


def test_record_keys_and_steps():
    assert entry_step(ENTRIES[0], 2) == 1 and entry_step(ENTRIES[3], 2) == 3 and entry_step(ENTRIES[4], 2) == 3
    assert entry_metrics(ENTRIES[0]) == {"train/lr/0": 0.005, "train/lr/1": 0.001, "train/loss": 1.5,
                                         "train/distill": 1.2, "train/ssot": 0.25, "epoch": 0.0}
    assert "train/ssot" not in entry_metrics(ENTRIES[3])  # non-finite values are not sent
    assert logger_names("tensorboard, MLflow,tensorboard") == ["tensorboard", "mlflow"]
    assert logger_names(["mlflow"]) == ["mlflow"] and logger_names([]) == logger_names(None) == []
    with pytest.raises(ConfigError, match="unknown logger.*wandb.*known: tensorboard, mlflow"):
        logger_names("tensorboard,wandb")


def test_tensorboard_event_file_holds_every_term_at_its_optimiser_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _log(tmp_path, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/distill", "train/ssot", "train/lr/0", "train/lr/1", "eval/image_auroc",
            "eval/pixel_auroc", "final/image_auroc", "epoch"} <= tags
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("train/ssot")] == [(1, 0.25), (2, pytest.approx(0.2))]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/lr/1")][-1] == (3, 0.0001)
    assert [(e.step, e.value) for e in events.Scalars("final/image_auroc")] == [(3, 0.875)]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: rdpp" in text and "accumulate: 2" in text


def test_mlflow_file_store_holds_metrics_params_and_config(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "reconad-test")
    run_dir = _log(tmp_path, "mlflow")
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "reconad-test"
    assert run.data.params["train.accumulate"] == "2" and run.data.params["data.category"] == "stripes"
    assert run.data.params["train.loggers"] == "['tensorboard', 'mlflow']"
    assert run.data.tags["reconad.method"] == "rdpp" and run.data.tags["reconad.seed"] == "11"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/image_auroc")] == [(2, 0.75)]
    config = json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read())
    assert config == CONFIG

    # a resumed run continues the same MLflow run (params are immutable: not sent twice)
    with open_trackers(["mlflow"], run_dir, CONFIG) as trackers:
        trackers.log_entry({"batch": 8, "epoch": 1, "kind": "train", "lr": [1e-4, 1e-5], "loss": 0.25})
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == saved["run_id"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history[-1] == (4, 0.25) and len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "shared-store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = _log(tmp_path, "mlflow")
    assert not (run_dir / "mlruns").exists()
    runs = MlflowClient(tracking_uri=store).search_runs(
        [MlflowClient(tracking_uri=store).get_experiment_by_name("reconad").experiment_id])
    assert [r.data.metrics["final/image_auroc"] for r in runs] == [0.875]


def test_no_logger_opens_nothing(tmp_path):
    with open_trackers([], tmp_path, CONFIG) as trackers:
        trackers.log_entry(ENTRIES[0])
    assert list(tmp_path.iterdir()) == []


def test_command_line_loggers_reach_open_trackers():
    from reconad.config import config_from_dict, config_to_dict, parse_fit_args

    cfg = parse_fit_args(["--config", "rd4ad", "--train.loggers", "tensorboard,mlflow"])
    assert logger_names(cfg.train.loggers) == ["tensorboard", "mlflow"]
    assert logger_names(config_from_dict(config_to_dict(cfg)).train.loggers) == ["tensorboard", "mlflow"]
    listed = parse_fit_args(["--config", "rd4ad", "--train.loggers", "[mlflow]"])
    assert logger_names(listed.train.loggers) == ["mlflow"]
    assert parse_fit_args(["--config", "rd4ad"]).train.loggers == []


def test_fit_sends_every_log_entry_to_tensorboard_and_mlflow(tiny_mvtec, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reconad.config import make_config
    from reconad.engine import fit

    from .conftest import tiny_run_overrides

    sections = tiny_run_overrides(tiny_mvtec, iterations=3, loggers="tensorboard,mlflow")
    sections["eval"] = {"overlays": 0, "plots": False, "examples": 0}
    result = fit(make_config("rd4ad", **sections), tmp_path / "run")
    logged = [e["loss"] for e in result.history if e["kind"] == "train"]
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [pytest.approx(e.value) for e in events.Scalars("train/loss")] == logged
    assert events.Scalars("final/image_auroc")[0].value == pytest.approx(result.metrics["image_auroc"])
    saved = json.loads((result.run_dir / "mlflow_run.json").read_text())
    client, run_id = MlflowClient(tracking_uri=saved["tracking_uri"]), saved["run_id"]
    history = client.get_metric_history(run_id, "train/loss")
    assert [pytest.approx(m.value) for m in sorted(history, key=lambda m: m.step)] == logged
    with pytest.raises(ConfigError, match="nope"):
        fit(make_config("rd4ad", **{**sections, "train": {**sections["train"], "loggers": "nope"}}), tmp_path / "x")
    assert not (tmp_path / "x").exists()
