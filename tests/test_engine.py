"""End-to-end training runs on tiny generated data: run folder, exact resume, load/predict, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reconad.api import predict
from reconad.config import make_config
from reconad.engine import fit, load, read_run_config
from reconad.errors import ReconadError, RunFolderError
from reconad.fileio import atomic_write, load_weights

from .conftest import tiny_run_overrides


def test_fit_writes_a_complete_run_folder(tiny_mvtec, tmp_path):
    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, eval_every=2))
    result = fit(cfg, tmp_path / "run")
    run = result.run_dir
    for name in ("config.yaml", "log.jsonl", "metrics.json", "checkpoints/model.safetensors",
                 "checkpoints/state.json", "checkpoints/state.safetensors", "test_scores.csv", "curves.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "aupro", "aupro_per_image"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if e["kind"] == "train"]
    assert [e["batch"] for e in train] == [1, 2, 3, 4] and all("loss" in e for e in train)
    assert [e["batch"] for e in log if e["kind"] == "eval"] == [2]
    assert log[-1]["kind"] == "final"
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert read_run_config(run) == cfg
    curves = json.loads((run / "curves.json").read_text())
    assert curves["image_roc"]["fpr"][0] == 0 and curves["image_roc"]["tpr"][-1] == 1
    assert curves["pro"]["fpr"][0] == 0 and max(curves["pro"]["pro"]) <= 1
    assert len((run / "test_scores.csv").read_text().splitlines()) == 1 + 6


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "checkpoints" / "model.safetensors")


@pytest.mark.parametrize("accumulate,stop", [(1, 3), (2, 2)])
def test_resume_continues_exactly(tiny_mvtec, tmp_path, accumulate, stop):
    # 8 training images at batch 4 = 2 batches per epoch: the interruption and the resume cross epochs
    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, iterations=6, accumulate=accumulate))
    full = fit(cfg, tmp_path / "full")
    partial = fit(cfg, tmp_path / "resumed", stop_after=stop)
    assert partial.metrics == {} and not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = fit(cfg, tmp_path / "resumed", resume=True)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics == full.metrics
    losses_full = [e["loss"] for e in full.history if e["kind"] == "train"]
    losses_resumed = [e["loss"] for e in resumed.history if e["kind"] == "train"]
    assert losses_resumed == losses_full


def test_resume_of_a_folder_that_is_no_run_is_a_clear_error(tiny_mvtec, tmp_path):
    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec))
    with pytest.raises(RunFolderError, match="cannot resume"):
        fit(cfg, tmp_path / "never-ran", resume=True)


def test_resume_before_the_first_checkpoint_starts_again_and_equals_a_full_run(tiny_mvtec, tmp_path):
    from reconad.run import write_config

    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, iterations=2))
    full = fit(cfg, tmp_path / "full")
    write_config(tmp_path / "started", cfg)  # killed before its first checkpoint: a config, nothing else
    (tmp_path / "started" / "log.jsonl").write_text('{"batch": 1, "kind": "train", "loss": 9.0}\n{"batch": 2, "ki')
    again = fit(cfg, tmp_path / "started", resume=True)
    assert again.metrics == full.metrics
    assert [e["loss"] for e in again.history if e["kind"] == "train"] == \
        [e["loss"] for e in full.history if e["kind"] == "train"]


def test_load_and_predict_a_folder(tiny_mvtec, tmp_path):
    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec))
    run = fit(cfg, tmp_path / "run").run_dir
    model = load(run)
    assert not model.training
    out = tmp_path / "pred"
    rows = predict(run, tiny_mvtec / "stripes" / "test", out)
    assert len(rows) == 6
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("path,score,normalised_score,label")
    assert len(list((out / "maps").rglob("*.tiff"))) == 6  # good/000 and blob/000 do not collide
    assert all(row["label"] in ("", None) for row in rows)  # no calibration: no decision is invented
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReconadError, match="no images"):
        predict(run, tmp_path / "empty", tmp_path / "pred2")


def test_bf16_mixed_precision_on_cpu(tiny_mvtec, tmp_path):
    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec, iterations=2, precision="bf16-mixed"))
    result = fit(cfg, tmp_path / "run")
    assert "image_auroc" in result.metrics


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def broken(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_parity_options_calibrate_on_good_test_images_and_select_by_chosen_metric(tiny_mvtec, tmp_path, monkeypatch):
    from reconad.methods.rd4ad import RD4AD

    seen: list[str] = []

    def record(self, loader):
        for batch in loader:
            seen.extend(batch["path"])
            assert batch["label"].eq(0).all()

    monkeypatch.setattr(RD4AD, "calibrate", record)
    sections = tiny_run_overrides(tiny_mvtec, iterations=4)
    sections["eval"] = {"calibrate_on": "test_good", "selection": "best_test", "selection_metrics": ["image_auroc"],
                        "overlays": 0, "plots": False, "examples": 0}
    cfg = make_config("rd4ad", **sections)
    fit(cfg, tmp_path / "run")
    assert sorted(Path(p).parent.name for p in seen) == ["good"] * 3  # the test set's good images, nothing else
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["calibration"]["data"] == "test_good" and "leakage" in saved["calibration"]["label"]
    assert saved["selection"]["keys"] == ["image_auroc"] and "test-set" in saved["selection"]["label"]

    seen.clear()
    sections = tiny_run_overrides(tiny_mvtec, iterations=2)
    sections["data"]["holdout_fraction"] = 0.25
    sections["eval"] = {"overlays": 0, "plots": False, "examples": 0}
    cfg = make_config("rd4ad", **sections)
    fit(cfg, tmp_path / "clean")
    assert len(seen) == 2 and all("/train/good/" in p for p in seen)  # default: held-out training normals only


@pytest.mark.parametrize("method_name", ["rd4ad", "recontrast"])  # Adam (RD4AD) and AdamW with two groups
def test_the_optimizer_steps_exactly_as_the_plain_per_parameter_loop(method_name, tiny_backbone):
    """make_optimizer's multi-tensor (foreach) updates equal PyTorch's per-parameter loop bit for bit."""
    import copy

    from reconad.engine.training import make_optimizer
    from reconad.registry import create_method, get_method_class

    cfg = make_config(method_name)
    trainable = get_method_class(method_name).trainable_backbone
    method = create_method(method_name, backbone=tiny_backbone(trainable=trainable)).train()
    ours, plain = method, copy.deepcopy(method)
    optimizers = [make_optimizer(ours, cfg)]
    assert optimizers[0].defaults["foreach"] is True
    kwargs = {k: v for k, v in optimizers[0].defaults.items() if k in ("lr", "betas", "eps", "weight_decay",
                                                                       "amsgrad")}
    optimizers.append(type(optimizers[0])(plain.param_groups(cfg.optim), **kwargs, foreach=False))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for model, optimizer in zip((ours, plain), optimizers):
            model.loss(model.training_batch(images), step / 3)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


def test_predict_dataset_collects_every_batch_in_order(tiny_mvtec, tiny_backbone):
    # the readback of each batch is collected one batch late (on CUDA it overlaps the next forward): the first,
    # the middle and the last, partial batch must all arrive, in dataset order, equal to one forward per image
    from reconad.data import build_datasets
    from reconad.engine import predict_dataset
    from reconad.registry import create_method

    cfg = make_config("rd4ad", **tiny_run_overrides(tiny_mvtec))
    _, _, test_set = build_datasets(cfg.data)
    method = create_method("rd4ad", backbone=tiny_backbone()).eval()
    n = len(test_set)
    assert n % 4 not in (0, n)  # several batches of 4 and a partial last one
    out = predict_dataset(method, test_set, 4, torch.device("cpu"))
    with torch.inference_mode():
        single = [method(test_set[i]["image"][None]) for i in range(n)]
    assert out.paths == [test_set[i]["path"] for i in range(n)]
    assert out.labels.tolist() == [test_set[i]["label"] for i in range(n)]
    torch.testing.assert_close(torch.from_numpy(out.maps), torch.cat([p.anomaly_map[:, 0] for p in single]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(out.scores), torch.cat([p.score for p in single]), rtol=0, atol=1e-5)
