"""The command line: listing, fitting, testing, predicting, and one clear error for each kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconad.cli import main
from reconad.config import make_config, parse_fit_args

TINY = ["--backbone.name", "resnet18", "--backbone.weights", "null", "--data.image_size", "32",
        "--data.batch_size", "4", "--data.eval_batch_size", "4", "--train.iterations", "2",
        "--train.accelerator", "cpu", "--eval.overlays", "1"]


def fit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "rd4ad", "--data.root", str(root), "--data.category", "stripes", *TINY,
            "--output_dir", str(out), "--name", "run", *extra]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    assert "rd4ad" in out and "wide_resnet50_2" in out and "efficientnet_lite0" in out


def test_preset_values_are_the_official_recipe():
    cfg = make_config("rd4ad")
    assert (cfg.optim.name, cfg.optim.lr, tuple(cfg.optim.betas)) == ("adam", 0.005, (0.5, 0.999))
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.data.image_size) == (16, 200, 256)
    assert (cfg.model.maps.sigma, cfg.model.maps.score, cfg.data.mask_threshold) == (4.0, "max", 0.5)
    assert cfg.backbone.name == "wide_resnet50_2" and cfg.model.loss == "global"


def test_dotted_overrides_and_unknown_keys():
    cfg = parse_fit_args(["--config", "rd4ad", "--train.epochs", "3", "--model.loss", "regional"])
    assert cfg.train.epochs == 3 and cfg.model.loss == "regional"
    with pytest.raises(ValueError, match="epoch"):
        parse_fit_args(["--config", "rd4ad", "--train.epoch", "3"])
    with pytest.raises(ValueError, match="bogus"):
        make_config("rd4ad", train={"bogus": 1})


def test_fit_test_predict_end_to_end(tiny_mvtec, tmp_path, capsys):
    code, out, err = run_cli(fit_args(tiny_mvtec, tmp_path / "runs"), capsys)
    assert code == 0, err
    assert "image_auroc" in out.lower().replace(" ", "_") or "I-AUROC" in out
    run = tmp_path / "runs" / "run"
    assert len(list((run / "examples").glob("*.png"))) == 4 and len(list((run / "examples").glob("*.svg"))) == 4
    code, out, err = run_cli(["test", str(run)], capsys)
    assert code == 0, err
    assert (run / "test_metrics.json").is_file()
    code, out, err = run_cli(["predict", str(run), str(tiny_mvtec / "stripes" / "test" / "blob"),
                              "--output", str(tmp_path / "pred")], capsys)
    assert code == 0, err
    assert (tmp_path / "pred" / "scores.csv").is_file()


def test_resume_from_cli(tiny_mvtec, tmp_path, capsys):
    from reconad.engine import fit

    cfg = parse_fit_args(fit_args(tiny_mvtec, tmp_path / "runs")[1:])
    fit(cfg, tmp_path / "runs" / "run", stop_after=1)
    code, out, err = run_cli(["fit", "--resume", str(tmp_path / "runs" / "run")], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "run" / "metrics.json").is_file()


def _expect_error(capsys, args, *fragments):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_missing_root(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _expect_error(capsys, fit_args(missing, tmp_path / "runs"), str(missing))
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_missing_category_lists_found_ones(tiny_mvtec, tmp_path, capsys):
    args = fit_args(tiny_mvtec, tmp_path / "runs")
    args[args.index("stripes")] = "bottle"
    _expect_error(capsys, args, "bottle", "stripes")


def test_empty_train_folder(tiny_mvtec, tmp_path, capsys):
    good = tiny_mvtec / "stripes" / "train" / "good"
    shutil.rmtree(good)
    good.mkdir()
    _expect_error(capsys, fit_args(tiny_mvtec, tmp_path / "runs"), str(good))
    assert not (tmp_path / "runs").exists()


def test_truncated_image(tiny_mvtec, tmp_path, capsys):
    victim = tiny_mvtec / "stripes" / "train" / "good" / "003.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _expect_error(capsys, fit_args(tiny_mvtec, tmp_path / "runs"), "003.png")
    assert not list((tmp_path / "runs").rglob("metrics.json"))
    assert not list((tmp_path / "runs").rglob("*.safetensors"))


def test_mask_size_mismatch(tiny_mvtec, tmp_path, capsys):
    mask = tiny_mvtec / "stripes" / "ground_truth" / "blob" / "001_mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    _expect_error(capsys, fit_args(tiny_mvtec, tmp_path / "runs"), "001_mask.png")


def test_unknown_method_backbone_and_key(tiny_mvtec, tmp_path, capsys):
    _expect_error(capsys, [*fit_args(tiny_mvtec, tmp_path / "runs"), "--method", "nope"], "nope", "rd4ad")
    args = fit_args(tiny_mvtec, tmp_path / "runs")
    args[args.index("resnet18")] = "resnet1000"
    _expect_error(capsys, args, "resnet1000", "wide_resnet50_2")
    _expect_error(capsys, [*fit_args(tiny_mvtec, tmp_path / "runs"), "--train.epohcs", "1"], "epohcs")
    _expect_error(capsys, ["fit", "--config", "no_such_preset"], "no_such_preset", "rd4ad")


def test_unknown_command(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command" in err


def test_per_category_overrides_apply_only_to_their_category(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("method: rd4ad\ntrain: {epochs: 200}\nper_category:\n  carpet: {train: {epochs: 10}, "
                      "model: {loss: regional}}\n")
    carpet = make_config(str(preset), data={"category": "carpet"})
    bottle = make_config(str(preset), data={"category": "bottle"})
    assert (carpet.train.epochs, carpet.model.loss) == (10, "regional")
    assert (bottle.train.epochs, bottle.model.loss) == (200, "global")
    cli = parse_fit_args(["--config", str(preset), "--data.category", "carpet", "--train.seed", "5"])
    assert cli.train.epochs == 10 and cli.train.seed == 5 and cli.per_category == {}
    # explicit settings beat the per-category entry, on the command line and in Python
    args = ["--config", str(preset), "--data.category", "carpet", "--train.epochs", "3"]
    assert parse_fit_args(args).train.epochs == 3
    assert make_config(str(preset), data={"category": "carpet"}, train={"epochs": 3}).train.epochs == 3
    with pytest.raises(ValueError, match="epohcs"):
        make_config(str(preset), data={"category": "carpet"}, per_category={"carpet": {"train": {"epohcs": 1}}})


def test_preset_inheritance_and_dropping_per_category(tmp_path):
    (tmp_path / "parent.yaml").write_text("method: rd4ad\ntrain: {epochs: 7, seed: 3}\n"
                                          "per_category: {carpet: {train: {epochs: 1}}}\n")
    (tmp_path / "child.yaml").write_text(f"base: {tmp_path / 'parent.yaml'}\ntrain: {{seed: 4}}\n")
    (tmp_path / "plain.yaml").write_text(f"base: {tmp_path / 'parent.yaml'}\nper_category: null\n")
    child = make_config(str(tmp_path / "child.yaml"), data={"category": "carpet"})
    assert (child.train.epochs, child.train.seed) == (1, 4)
    assert parse_fit_args(["--config", str(tmp_path / "child.yaml")]).train.epochs == 7
    assert make_config(str(tmp_path / "plain.yaml"), data={"category": "carpet"}).train.epochs == 7
    (tmp_path / "loop.yaml").write_text(f"base: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ValueError, match="cycle"):
        make_config(str(tmp_path / "loop.yaml"))


def test_ulsad_official_parity_preset_is_labelled_test_set_use():
    cfg = make_config("ulsad_official", data={"category": "bottle"})
    assert cfg.method == "ulsad" and cfg.data.holdout_fraction == 0.0
    assert (cfg.eval.calibrate_on, cfg.eval.selection, cfg.eval.selection_metrics) == \
        ("test_good", "best_test", ["image_auroc"])
    assert make_config("ulsad").eval.calibrate_on == "holdout"  # the clean default
