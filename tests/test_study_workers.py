"""Studies over many processes, for real: a local Ray cluster, torchrun shards, the shared work queue (3 worker
processes, one killed with SIGKILL mid-cell), and a study folder that grows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reconad import study as st
from reconad.run import checkpoint_step
from reconad.study.workqueue import read_claim

from .conftest import write_tiny_mvtec

RECONAD = str(Path(sys.executable).parent / "reconad")
TINY = {"data": {"image_size": 32, "batch_size": 4, "eval_batch_size": 4},
        "backbone": {"name": "resnet18", "weights": None},
        "train": {"iterations": 2, "accelerator": "cpu", "log_every": 1, "threads": 1, "checkpoint_every": 1},
        "eval": {"overlays": 0, "plots": False, "examples": 0}}
SETS = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=4", "backbone.name=resnet18",
        "backbone.weights=null", "train.accelerator=cpu", "train.threads=1", "train.checkpoint_every=1",
        "eval.overlays=0", "eval.plots=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(output: Path) -> dict[tuple, dict]:
    return {(r["run"], r["category"], r["seed"]): {k: v for k, v in r.items() if k.endswith("auroc") or
                                                   k.startswith("aupro")}
            for r in json.loads((output / "results.json").read_text()) if r["status"] == "done"}


def _broken_category(root: Path) -> None:
    write_tiny_mvtec(root, "broken")
    (root / "broken" / "train" / "good" / "000.png").write_bytes(b"not a png")


def test_ray_launcher_on_a_local_cluster_equals_sequential_and_records_failures(tmp_path):
    import ray  # the dev extra installs it; without it this test fails, as it should
    root = write_tiny_mvtec(tmp_path / "data", "stripes")
    _broken_category(root)
    study = st.study_from_dict({"runs": ["rd4ad"], "root": str(root), "seeds": [1], "overrides": TINY,
                                "n_resamples": 100})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = st.run_study(study, tmp_path / "ray", launcher="ray")
        address = ray.get_runtime_context().gcs_address
        joined = subprocess.run([RECONAD, "study", "--presets", "rd4ad", "--data.root", str(root), "--categories",
                                 "stripes", "--seeds", "1", "--set", "train.iterations=2", *SETS, "--launcher", "ray",
                                 "--output", str(tmp_path / "joined"), "--report", "false"],
                                env={**_env(), "RAY_ADDRESS": address, "RECONAD_LOG": "INFO"}, capture_output=True,
                                text=True, timeout=120)
    finally:
        ray.shutdown()
    status = {r["category"]: r["status"] for r in rows}
    assert status == {"broken": "failed", "stripes": "done"}
    failure = json.loads((tmp_path / "ray" / "rd4ad" / "broken" / "seed1" / "failed.json").read_text())
    assert "broken" in failure["error"] or "000.png" in failure["error"]
    sequential = st.run_study(study, tmp_path / "seq")
    assert _metrics(tmp_path / "ray") == _metrics(tmp_path / "seq") and _metrics(tmp_path / "seq")
    assert [r["status"] for r in sequential] == [r["status"] for r in rows]
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert f"cluster at {address}" in joined.stderr  # joined the running cluster instead of starting one
    assert _metrics(tmp_path / "joined") == {k: v for k, v in _metrics(tmp_path / "seq").items() if k[1] == "stripes"}


def test_torchrun_shards_run_every_cell_once(tmp_path):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "one"), "two")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--nproc_per_node", "2", RECONAD, "study", "--presets", "rd4ad",
                           "--data.root", str(root), "--seeds", "1", "--set", "train.iterations=2", *SETS,
                           "--shard", "torchrun", "--output", str(tmp_path / "s")],
                          env=_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    pids = {json.loads((tmp_path / "s" / "rd4ad" / c / "seed1" / "cell.json").read_text())["pid"]
            for c in ("one", "two")}
    assert len(pids) == 2  # one cell per torchrun worker


def _worker(root: Path, output: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RECONAD, "study", "--presets", "rd4ad", "--data.root", str(root), "--seeds", "1", "2",
                             "--set", "train.iterations=12", *SETS, "--output", str(output), "--worker",
                             "--heartbeat", "2", "--report", "false"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))


def test_work_queue_three_workers_each_cell_once_and_a_killed_workers_cell_is_redone(tmp_path):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "one"), "two")
    output = tmp_path / "s"
    workers = [_worker(root, output, tmp_path / f"w{i}.log") for i in range(3)]
    victim, victim_cell = None, None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:  # a worker that has checkpointed its cell
        for claim in (output / st.CLAIMS_DIR).glob("*.json") if (output / st.CLAIMS_DIR).is_dir() else ():
            held = read_claim(claim)
            run, category, seed = claim.stem.split("__")
            cell = output / run / category / seed
            if held and checkpoint_step(cell) is not None and not (cell / "metrics.json").exists():
                victim = next((w for w in workers if w.pid == held["pid"]), None)
                victim_cell = cell
                break
        time.sleep(0.1)
    assert victim is not None, "no worker was caught mid-cell"
    os.kill(victim.pid, signal.SIGKILL)
    for w in workers:
        assert w.wait(timeout=150) in (0, -signal.SIGKILL)
    cells = [output / "rd4ad" / c / f"seed{s}" for c in ("one", "two") for s in (1, 2)]
    assert all((c / "metrics.json").is_file() for c in cells)
    info = json.loads((victim_cell / "cell.json").read_text())
    assert info["resumed"] is True and info["pid"] != victim.pid  # taken over, resumed from its checkpoint
    def train_batches(cell: Path) -> list[int]:
        return [e["batch"] for e in map(json.loads, (cell / "log.jsonl").read_text().splitlines())
                if e["kind"] == "train"]

    assert train_batches(victim_cell) == [10, 12] == train_batches(next(c for c in cells if c != victim_cell))
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(3))
    for c in cells:
        label = f"rd4ad · {c.parent.name} · seed {c.name.removeprefix('seed')}"
        finished = logs.count(f"{label} — done in")
        assert finished == 1, (label, finished)  # every cell finished exactly once
    assert "taking over" in logs and not list((output / st.CLAIMS_DIR).glob("*.json"))


def test_study_folder_grows_refuses_contradictions_and_runs_one_chosen_cell(tmp_path):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "one"), "two")
    calls = []

    def fake_fit(cfg, run_dir, resume=False, stop_after=None):
        from reconad.config import config_to_dict
        from reconad.fileio import write_json, write_yaml

        calls.append(Path(run_dir).relative_to(tmp_path / "s").as_posix())
        write_yaml(Path(run_dir) / "config.yaml", config_to_dict(cfg))
        write_json(Path(run_dir) / "metrics.json", {"metrics": {"image_auroc": 0.5}})

    first = st.study_from_dict({"runs": ["rd4ad"], "root": str(root), "categories": ["one"], "seeds": [1],
                                "overrides": TINY})
    st.run_study(first, tmp_path / "s", fit=fake_fit)
    grown = st.study_from_dict({"runs": ["rd4ad", {"preset": "rd4ad", "name": "r2"}], "root": str(root),
                                "categories": ["two"], "seeds": [2], "overrides": TINY})
    rows = st.run_study(grown, tmp_path / "s", fit=fake_fit, order="seed")
    saved = yaml.safe_load((tmp_path / "s" / "study.yaml").read_text())
    assert saved["categories"] == ["one", "two"] and saved["seeds"] == [1, 2]
    assert [r["name"] or r["preset"] for r in saved["runs"]] == ["rd4ad", "r2"]
    assert [h["categories"] for h in saved["history"]] == [["one"], ["two"]] and saved["history"][1]["runs"] == ["r2"]
    assert len(rows) == 2 * 2 * 2 and all(r["status"] == "done" for r in rows)
    assert calls[1:] == ["r2/one/seed1", "rd4ad/two/seed1", "r2/two/seed1", "rd4ad/one/seed2", "r2/one/seed2",
                         "rd4ad/two/seed2", "r2/two/seed2"]  # order=seed: seed 1 everywhere first
    contradicting = st.study_from_dict({"runs": ["rd4ad"], "root": str(root), "categories": ["one"], "seeds": [1],
                                        "overrides": {**TINY, "train": {**TINY["train"], "iterations": 3}}})
    with pytest.raises(st.StudyError, match="train.iterations: 2 → 3"):
        st.run_study(contradicting, tmp_path / "s", fit=fake_fit)
    assert yaml.safe_load((tmp_path / "s" / "study.yaml").read_text()) == saved  # refused: nothing written
    (tmp_path / "s" / "r2" / "two" / "seed2" / "metrics.json").unlink()
    calls.clear()
    st.run_study(grown, tmp_path / "s", fit=fake_fit, cell="r2/two/seed2")
    assert calls == ["r2/two/seed2"]
    with pytest.raises(st.StudyError, match="not a cell"):
        st.run_study(grown, tmp_path / "s", fit=fake_fit, cell="r3/two/2")
