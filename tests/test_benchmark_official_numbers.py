"""benchmarks/official_numbers.py: the official code's own timings beside a speed.py run (format, checks, ratios)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    name = "benchmarks_official_numbers"  # not on sys.path: loaded from its file, registered for its dataclasses
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "official_numbers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


on = _module()

CASE = "rd4ad:efficientnet_lite0:32"


def _write(tmp_path: Path, data: dict, name: str = "official.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _valid(**case) -> dict:
    numbers = case or {"train_batch": 2, "train_step_s": 0.5, "train_images_per_s": 8.0,
                       "eval_images_per_s": {"1": 20.0}}
    return {"source": "hq-deng/RD4AD @ abc: main.py timed", "env": {"device": "cpu", "threads": 1, "cpu": "CPU A"},
            "cases": {CASE: numbers}}


def test_a_valid_file_is_read_with_its_batches_as_integers(tmp_path):
    official = on.load(_write(tmp_path, _valid()))
    assert (official.device, official.threads, official.machine) == ("cpu", 1, "CPU A")
    case = official.cases[CASE]
    assert (case.train_batch, case.train_step_s, case.train_images_per_s) == (2, 0.5, 8.0)
    assert case.eval_images_per_s == {1: 20.0}


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d.pop("source"), "'source' must say"),
    (lambda d: d.update(extra=1), "unknown key(s) ['extra']"),
    (lambda d: d["env"].update(device="tpu"), "env.device: must be 'cpu' or 'cuda'"),
    (lambda d: d["env"].pop("threads"), "env.threads: must be the torch thread count"),
    (lambda d: d["env"].update(threads=True), "env.threads"),
    (lambda d: d.update(cases={}), "'cases' must map"),
    (lambda d: d.update(cases={"rd4ad:wrn": {"train_step_s": 1.0}}), "'rd4ad:wrn' is not 'method:backbone:size'"),
    (lambda d: d["cases"][CASE].update(train_step_s=-1), "train_step_s: must be a positive number, not -1"),
    (lambda d: d["cases"][CASE].update(train_images_per_s=float("nan")), "train_images_per_s: must be a positive"),
    (lambda d: d["cases"][CASE].pop("train_batch"), "train_batch: must be the batch size"),
    (lambda d: d["cases"][CASE].update(eval_images_per_s={"b1": 3.0}), "key 'b1' is not a batch size"),
    (lambda d: d["cases"][CASE].update(speed=3), "unknown key(s) ['speed']"),
    (lambda d: d["cases"].update({CASE: {"train_batch": 2}}), "has none of"),
])
def test_a_bad_file_is_an_error_naming_the_file_and_the_entry(tmp_path, mutate, expected):
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(on.OfficialNumbersError) as err:
        on.load(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(on.OfficialNumbersError, match="no such file"):
        on.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(on.OfficialNumbersError, match="broken.json: not a readable JSON file"):
        on.load(broken)


def test_a_run_on_another_setup_is_refused(tmp_path):
    official = on.load(_write(tmp_path, _valid()))
    with pytest.raises(on.OfficialNumbersError, match="measured on cpu, this run is on cuda"):
        on.check_setup(official, "cuda:0", 1, 2, [CASE])
    with pytest.raises(on.OfficialNumbersError, match="pass --threads 1"):
        on.check_setup(official, "cpu", 2, 2, [CASE])
    with pytest.raises(on.OfficialNumbersError, match="pass --train-batch 2"):
        on.check_setup(official, "cpu", 1, 4, [CASE])
    # a case the run does not cover is only a warning, and its training batch does not matter
    assert on.check_setup(official, "cpu", 1, 4, ["gnl:efficientnet_lite0:32"]) == [
        f"no run for the official case(s) {CASE} (add them to --cases)"]
    assert on.check_setup(official, "cpu", 1, 2, [CASE]) == []
    assert "'CPU A'" in on.machine_warning(official, "CPU B")
    assert on.machine_warning(official, "CPU A") is None


def test_ratios_are_speed_ratios_from_both_sides_numbers(tmp_path):
    official = on.load(_write(tmp_path, _valid(train_batch=2, train_step_s=0.5, train_images_per_s=8.0,
                                               eval_images_per_s={"1": 20.0, "4": 25.0})))
    row = {"method": "rd4ad", "backbone": "efficientnet_lite0", "size": 32, "train_step_s": 0.25,
           "train_e2e_images_per_s": 12.0, "eval_b1_images_per_s": 30.0, "eval_b8_images_per_s": 90.0}
    other = {**row, "method": "gnl"}  # not in the file: no entries
    entries = {e["measure"]: e for e in on.comparisons([row, other], official)}
    assert entries["train step s"]["speedup"] == pytest.approx(0.5 / 0.25)  # official time ÷ ours
    assert entries["train e2e img/s"]["speedup"] == pytest.approx(12.0 / 8.0)
    assert entries["eval b1 img/s"]["speedup"] == pytest.approx(30.0 / 20.0)
    assert "eval b4 img/s" not in entries  # ours did not run batch 4
    throughput = entries["eval throughput img/s (ours b8, official b4)"]
    assert throughput["speedup"] == pytest.approx(90.0 / 25.0)
    assert {e["case"] for e in entries.values()} == {CASE}
    assert "| rd4ad:efficientnet_lite0:32 | train step s | 0.250 | 0.500 | 2.00 |" in on.table(list(entries.values()))


def _speed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_speed_py_sets_a_run_beside_the_official_numbers_end_to_end(tmp_path):
    official = _write(tmp_path, _valid(train_batch=2, train_step_s=0.5, train_images_per_s=8.0,
                                       eval_images_per_s={"1": 20.0, "2": 30.0}))
    out = tmp_path / "run.json"
    done = _speed("--cases", CASE, "--train-batch", "2", "--eval-batches", "1", "2", "--e2e-batches", "1",
                  "--e2e-epochs", "1", "--repeats", "1", "--warmup", "0", "--switches", "--train-switches",
                  "--official", str(official), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    row = result["results"][0]
    got = {e["measure"]: e["speedup"] for e in result["official"]["comparisons"]}
    assert got["train step s"] == pytest.approx(0.5 / row["train_step_s"])
    assert got["train e2e img/s"] == pytest.approx(row["train_e2e_images_per_s"] / 8.0)
    assert got["eval b1 img/s"] == pytest.approx(row["eval_b1_images_per_s"] / 20.0)
    assert got["eval b2 img/s"] == pytest.approx(row["eval_b2_images_per_s"] / 30.0)
    assert result["official"]["source"] == "hq-deng/RD4AD @ abc: main.py timed"
    assert "against the official code's own numbers" in done.stdout and "×official" in done.stdout
    # an earlier run's JSON gives the same ratios without timing
    again = _speed("--print", str(out), "--official", str(official), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"| {CASE} | train step s | {row['train_step_s']:.3f} | 0.500 |" in again.stdout


def test_speed_py_refuses_other_threads_before_timing(tmp_path):
    data = _valid()
    data["env"]["threads"] = 2
    out = tmp_path / "run.json"
    done = _speed("--cases", CASE, "--threads", "1", "--official", str(_write(tmp_path, data)), "--out", str(out),
                  cwd=tmp_path)
    assert done.returncode == 2
    assert "ran 2 thread(s), this run 1; pass --threads 2" in done.stderr
    assert not out.exists()
